"""Output variants of a session: one encoder each, feeding every consumer of that variant.

A video variant is (codec, width, height, frame rate, bitrate). The session's ladder comes from
[media] variants (pixel-area budgets in the session's aspect), and a WebSocket client may ask
for a size of its own. A variant encodes on the dedicated executor, one frame at a time, in
order; a late event loop hands it a few ticks at once (the pacer catches up), and those are all
encoded, but beyond `ENCODE_BACKLOG` waiting ticks the oldest is skipped (stale video drops,
latency stays bounded). Every packet is offered to every consumer without waiting for any.

Keyframes: the first frame, every `keyframe_interval_s` (the encoder's GOP), and on request:
a consumer joining or resynchronising, a WebRTC viewer's PLI or FIR. Requests pass token
buckets per variant (repairs: a burst of `KEYFRAME_BURST`, then `keyframe_requests_per_s`;
joins: a budget of their own), so a viewer that floods PLIs cannot turn everyone's stream into
keyframes nor hold back a newcomer's first picture; a request beyond its budget waits for the
next token (it is never lost), and every request waiting is served by the next keyframe,
whatever made it. Each keyframe is counted by its cause.

An audio variant (Opus for WebRTC, AAC for MPEG-TS) encodes every 40 ms slice, in order:
audio is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from engine.api import FPS
from stream.config import MediaConfig, Rung
from stream.governor import OutputVariant
from stream.media.consumer import MediaConsumer, MediaPacket
from stream.media.encoder import (
    AacEncoder,
    AudioEncoder,
    Encoded,
    H264Encoder,
    JpegEncoder,
    OpusEncoder,
    VideoEncoder,
    Vp8Encoder,
)
from stream.media.pacer import MAX_LATE_FRAMES, Tick
from stream.media.timeline import PLAYOUT_RATE, SAMPLES_PER_VIDEO_FRAME

log = logging.getLogger(__name__)

CODECS = ("h264", "vp8", "jpeg")
AUDIO_CODECS = ("pcm", "opus", "aac")
KEYFRAME_BURST = 2  # repairs (PLI, FIR, resync): this many at once, then keyframe_requests_per_s
JOIN_BURST, JOIN_KEYFRAMES_PER_S = 4, 2.0  # consumers joining: their own, separate budget
ENCODE_BACKLOG = MAX_LATE_FRAMES + 1  # what the pacer delivers at once before it jumps ahead
RATE_WINDOW_S = 5.0  # the measured bitrate of a variant covers this much recent time


# 1. Keys and the ladder -------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantKey:
    """One output variant of a session's video. `bitrate_kbps` 0: the size's default
    (`bitrate_for`); JPEG has none."""

    codec: str  # "h264" | "vp8" | "jpeg"
    width: int
    height: int
    fps: float  # <= 25: frames are taken from the 25 fps clock with their own PTS
    bitrate_kbps: int = 0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r}: accepted {CODECS}")
        if not 0 < self.fps <= FPS:
            raise ValueError(f"fps={self.fps}: accepted 0 < fps <= {FPS}")
        if self.width < 2 or self.height < 2:
            raise ValueError(f"size {self.width}x{self.height}: accepted 2x2 and more")

    @classmethod
    def of(cls, codec: str, rung: OutputVariant) -> VariantKey:
        return cls(codec, rung.width, rung.height, rung.fps, rung.bitrate_kbps)

    def takes(self, index: int) -> bool:
        """Does this variant show media frame `index`? (evenly decimated from 25 fps)"""
        return int((index + 1) * self.fps / FPS) > int(index * self.fps / FPS)

    @property
    def name(self) -> str:
        rate = f"-{self.bitrate_kbps}k" if self.bitrate_kbps else ""
        return f"{self.codec}-{self.width}x{self.height}@{self.fps:g}{rate}"


def _even(x: float) -> int:
    return max(2, int(round(x)) // 2 * 2)


def ladder_for(rungs: Iterable[Rung], size: tuple[int, int]) -> tuple[OutputVariant, ...]:
    """The session's ladder: each rung's pixel area in the session's aspect (never larger than
    the session's frames), both sides even (4:2:0 chroma needs it)."""
    sw, sh = size
    out = []
    for rung in rungs:
        scale = min(1.0, math.sqrt(rung.area / (sw * sh)))
        out.append(OutputVariant(_even(sw * scale), _even(sh * scale), rung.fps,
                                 rung.bitrate_kbps))
    return tuple(out)


def bitrate_for(media: MediaConfig, size: tuple[int, int], width: int, height: int) -> int:
    """A size of a client's own choosing: media.bitrate_kbps at the session's full size,
    scaled by area."""
    full = max(1, size[0] * size[1])
    return max(100, round(media.bitrate_kbps * width * height / full))


# 2. Keyframe requests ---------------------------------------------------------------------------


class TokenBucket:
    def __init__(self, per_s: float, burst: int, clock: Callable[[], float]):
        self.per_s = per_s
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def spend(self) -> bool:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.per_s)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class KeyframeRequests:
    """Requested keyframes of one variant, through two token buckets: one for consumers
    joining, one for repairs (PLI, FIR, a consumer resynchronising), so a viewer that keeps
    losing packets cannot delay the first picture of one that joins. Requests made while one
    waits share the keyframe that serves it."""

    def __init__(self, per_s: float, burst: int = KEYFRAME_BURST,
                 clock: Callable[[], float] = time.monotonic):
        self._buckets = {"join": TokenBucket(JOIN_KEYFRAMES_PER_S, JOIN_BURST, clock),
                         "repair": TokenBucket(per_s, burst, clock)}
        self._pending: dict[str, str] = {}  # bucket -> the cause of its first waiting request
        self.requested: Counter[str] = Counter()
        self.coalesced = 0  # requests served by a keyframe another request had asked for

    @property
    def pending(self) -> str | None:
        """The cause of the first request waiting for a keyframe, if any."""
        return next(iter(self._pending.values()), None)

    def request(self, cause: str) -> None:
        self.requested[cause] += 1
        bucket = "join" if cause == "join" else "repair"
        if self._pending:
            self.coalesced += 1
        self._pending.setdefault(bucket, cause)

    def served(self) -> None:
        """A keyframe went out (periodic, or for another request): what waits is served too."""
        if self._pending:
            self.coalesced += 1
            self._pending.clear()

    def take(self) -> str | None:
        """The cause of the keyframe to make now, if one is due (spends a token)."""
        for bucket, cause in list(self._pending.items()):
            if self._buckets[bucket].spend():
                self._pending.clear()  # this keyframe serves every waiting request
                return cause
        return None


class Failures:
    """An encoder's failures: one is logged and skipped (a frame lost to a glitch); a run of
    MAX_FAILURES in a row (a second of frames) means it cannot go on, and `on_failure` ends
    its session (the server and every other session go on)."""

    MAX_FAILURES = 25

    def __init__(self, name: str, on_failure: Callable[[BaseException], None] | None):
        self.name = name
        self.on_failure = on_failure
        self.in_a_row = 0

    def failed(self, exc: BaseException, what: str) -> bool:
        """Count one failure; True when the encoder must stop."""
        self.in_a_row += 1
        if self.in_a_row == 1:
            log.exception("%s: encoding %s failed", self.name, what, exc_info=exc)
        if self.in_a_row < self.MAX_FAILURES:
            return False
        log.error("%s: %d encodes in a row failed: giving up", self.name, self.in_a_row)
        if self.on_failure is not None:
            self.on_failure(exc)
        return True

    def succeeded(self) -> None:
        self.in_a_row = 0


# 3. Video ---------------------------------------------------------------------------------------


class VideoVariant:
    """One encoder of a session's video at (codec, size, fps, bitrate), and its consumers."""

    def __init__(self, key: VariantKey, media: MediaConfig, executor: Executor, name: str,
                 bitrate_kbps: int | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.failures = Failures(name, on_failure)
        self.key = key
        self.media = media
        self.executor = executor
        self.name = name
        self.bitrate_kbps = key.bitrate_kbps or bitrate_kbps or media.bitrate_kbps
        self.consumers: set[MediaConsumer] = set()
        self.keyframe_requests = KeyframeRequests(media.keyframe_requests_per_s)
        self.keyframes: Counter[str] = Counter()  # made, by cause
        self._waiting: deque[Tick] = deque()
        self._wake = asyncio.Event()
        self._started = False
        self._encoder: VideoEncoder | None = None
        self._black = np.zeros((key.height, key.width, 3), np.uint8)
        self._sizes: deque[tuple[float, int]] = deque()
        self.encoded = 0
        self.skipped = 0  # ticks not encoded: ENCODE_BACKLOG were already waiting
        self.encode_seconds = 0.0
        self.bytes = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def request_keyframe(self, cause: str = "request") -> None:
        """Make a keyframe soon (rate-limited; see KeyframeRequests)."""
        self.keyframe_requests.request(cause)

    def on_tick(self, tick: Tick) -> None:
        if not tick.shown or not self.key.takes(tick.index):
            return
        if len(self._waiting) >= ENCODE_BACKLOG:
            self._waiting.popleft()  # the encoder cannot keep up: the oldest tick is stale
            self.skipped += 1
        self._waiting.append(tick)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        duration = round(1000 / self.key.fps)
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            tick = self._waiting.popleft()
            cause = "start" if not self._started else self.keyframe_requests.take()
            try:
                out, seconds = await loop.run_in_executor(self.executor, self._encode, tick,
                                                          cause is not None)
            except Exception as exc:
                if self.failures.failed(exc, f"frame {tick.index}"):
                    return
                continue
            self.failures.succeeded()
            self.encode_seconds += seconds
            if out is None:
                if cause is not None:  # the encoder buffered: ask again with the next frame
                    self.keyframe_requests.request(cause)
                continue
            self._started = True
            self.encoded += 1
            self.bytes += len(out.data)
            self._measure(len(out.data))
            if out.keyframe and self.key.codec != "jpeg":  # (every JPEG stands alone)
                self.keyframes[cause or "periodic"] += 1
                # whoever asked while this one was made gets it: no second keyframe for them
                self.keyframe_requests.served()
            packet = MediaPacket("video", tick.pts_ms, duration, out.data, self.key.codec,
                                 out.keyframe, repeated=tick.repeated, out_index=tick.out_index,
                                 encoded_at=time.monotonic())
            for consumer in list(self.consumers):
                consumer.offer_video(packet)

    def _encode(self, tick: Tick, keyframe: bool) -> tuple[Encoded | None, float]:
        """On the encoder pool; one at a time per variant (the task awaits each)."""
        start = time.perf_counter()
        if self._encoder is None:
            self._encoder = self._make_encoder()
        rgb = tick.rgb if tick.rgb is not None else self._black  # before the first frame
        out = self._encoder.encode(rgb, tick.out_index, keyframe=keyframe)
        return out, time.perf_counter() - start

    def _make_encoder(self) -> VideoEncoder:
        k = self.key
        if k.codec == "jpeg":
            return JpegEncoder(k.width, k.height, self.media.jpeg_qscale)
        if k.codec == "vp8":
            return Vp8Encoder(k.width, k.height, self.media, self.bitrate_kbps, k.fps)
        return H264Encoder(k.width, k.height, self.media, self.bitrate_kbps, k.fps)

    def _measure(self, size: int) -> None:
        now = time.monotonic()
        self._sizes.append((now, size))
        while self._sizes and self._sizes[0][0] < now - RATE_WINDOW_S:
            self._sizes.popleft()

    def sent_kbps(self) -> float | None:
        """What this variant actually produced over the last RATE_WINDOW_S (None: too little
        to tell). Encoders of still-ish avatar pictures often stay well under their target."""
        if len(self._sizes) < 2:
            return None
        span = max(self._sizes[-1][0] - self._sizes[0][0], 1.0 / self.key.fps)
        return sum(s for _, s in self._sizes) * 8 / 1000 / span

    def figures(self) -> dict:
        return {"variant": self.key.name, "consumers": len(self.consumers),
                "frames_encoded": self.encoded, "frames_skipped_busy": self.skipped,
                "encode_seconds": round(self.encode_seconds, 4),
                "encode_ms_avg": round(1000 * self.encode_seconds / max(1, self.encoded), 2),
                "bytes": self.bytes, "keyframes": dict(self.keyframes),
                "keyframe_requests": dict(self.keyframe_requests.requested),
                "keyframe_requests_coalesced": self.keyframe_requests.coalesced}

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# 4. Audio ---------------------------------------------------------------------------------------


class AudioVariant:
    """One audio encoder of a session (Opus or AAC) and its consumers. Every 40 ms slice is
    encoded, in order; after a stall the backlog goes to the executor in one call."""

    def __init__(self, codec: str, media: MediaConfig, executor: Executor, name: str,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.failures = Failures(name, on_failure)
        if codec not in ("opus", "aac"):
            raise ValueError(f"audio codec {codec!r}: accepted opus, aac")
        self.codec = codec
        self.media = media
        self.executor = executor
        self.name = name
        self.consumers: set[MediaConsumer] = set()
        self._pending: deque[tuple[int, np.ndarray]] = deque()
        self._wake = asyncio.Event()
        self._encoder: AudioEncoder | None = None
        self.encoded = 0
        self.encode_seconds = 0.0
        self.backlog_max = 0  # the most slices that ever waited for the encoder
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def on_tick(self, tick: Tick) -> None:
        if tick.dropped:  # left the output timeline (the delay shrank at a pause)
            return
        self._pending.append((tick.out_index, tick.audio))
        self.backlog_max = max(self.backlog_max, len(self._pending))
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = list(self._pending)
            self._pending.clear()
            if not batch:
                continue
            try:
                packets, seconds = await loop.run_in_executor(self.executor, self._encode,
                                                              batch)
            except Exception as exc:
                if self.failures.failed(exc, f"audio at frame {batch[0][0]}"):
                    return
                continue
            self.failures.succeeded()
            self.encode_seconds += seconds
            for packet in packets:
                self.encoded += 1
                for consumer in list(self.consumers):
                    consumer.offer_audio(packet)

    def _encode(self, batch: list[tuple[int, np.ndarray]]) -> tuple[list[MediaPacket], float]:
        start = time.perf_counter()
        if self._encoder is None:
            self._encoder = (OpusEncoder(self.media.opus_bitrate_kbps) if self.codec == "opus"
                             else AacEncoder(self.media.aac_bitrate_kbps))
        out = []
        for index, samples in batch:
            got = self._encoder.encode(samples, index * SAMPLES_PER_VIDEO_FRAME)
            if got is not None:
                out.append(MediaPacket("audio", got.sample * 1000 // PLAYOUT_RATE,
                                       max(1, got.samples * 1000 // PLAYOUT_RATE), got.data,
                                       self.codec, sample=got.sample))
        return out, time.perf_counter() - start

    def figures(self) -> dict:
        return {"variant": self.codec, "consumers": len(self.consumers),
                "packets_encoded": self.encoded, "encode_seconds": round(self.encode_seconds, 4),
                "backlog_max": self.backlog_max}

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
