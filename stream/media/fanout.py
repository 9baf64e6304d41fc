"""A session's media fan-out: one encoder per output variant, shared by every consumer of it.

    FramePacer (one per session, on the clock) --tick--> VideoVariant (codec, size, fps)
        --encoded access unit--> MediaConsumer, MediaConsumer, ...   (each its own bounded queue)
    FramePacer --40 ms audio slice--> every consumer that asked for audio

N consumers of a variant cost one encode. The encoder never waits for a consumer: each variant
encodes the newest tick on its own task (a tick that arrives while it is busy is skipped, stale
video drops) and offers the result to every consumer without blocking. A consumer joins at a
keyframe (the variant is asked for one), and one that falls behind drops stale video for itself
only: its queued frames go, and it waits for the next keyframe. Audio is never dropped: a consumer
whose audio backs up past its bound is `stalled`, and its owner disconnects it.

Today the WebSocket API consumes it (stream/ws/); WebRTC senders and MPEG-TS readers still encode
for themselves and can move onto it by subscribing a consumer each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

from engine.api import FPS
from stream.config import MediaConfig
from stream.media.encoder import H264Encoder, JpegEncoder
from stream.media.pacer import FramePacer, Tick
from stream.media.timeline import FrameStore, MediaClock, PlayoutAudio

log = logging.getLogger(__name__)

CODECS = ("h264", "jpeg")
KEYFRAME_REQUEST_GAP_S = 0.25  # a consumer's keyframe requests coalesce to at most this often


@dataclass(frozen=True)
class VariantKey:
    """One output variant of a session's video."""

    codec: str  # "h264" | "jpeg"
    width: int
    height: int
    fps: float  # <= 25: frames are taken from the 25 fps clock with their own PTS

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r}: accepted {CODECS}")
        if not 0 < self.fps <= FPS:
            raise ValueError(f"fps={self.fps}: accepted 0 < fps <= {FPS}")

    def takes(self, index: int) -> bool:
        """Does this variant show media frame `index`? (evenly decimated from 25 fps)"""
        return int((index + 1) * self.fps / FPS) > int(index * self.fps / FPS)


@dataclass(frozen=True)
class MediaPacket:
    kind: str  # "video" | "audio"
    pts_ms: int  # session media time
    duration_ms: int
    data: bytes  # an H.264 Annex-B access unit, a JPEG image, or s16le mono 48 kHz PCM
    codec: str = "pcm"  # "h264" | "jpeg" | "pcm"
    keyframe: bool = True
    discontinuity: bool = False  # video frames were dropped (for this consumer) before this one


class MediaConsumer:
    """One receiver's queue. `get` returns packets in the order they were offered."""

    def __init__(self, name: str, max_video: int = 8, max_audio_s: float = 5.0):
        self.name = name
        self.max_video = max_video
        self.max_audio = max(1, round(max_audio_s * FPS))  # 40 ms slices
        self.variant: VideoVariant | None = None
        self._queue: deque[MediaPacket] = deque()
        self._videos = 0
        self._audios = 0
        self._wake = asyncio.Event()
        self.notify: asyncio.Event | None = None  # also set when a packet is queued (a writer)
        self._need_key = True  # join at a keyframe
        self._gap = False
        self.stalled = False
        self.video_dropped = 0

    def join(self, variant: VideoVariant | None) -> None:
        """Start receiving `variant`'s video (None: none) from its next keyframe."""
        self.variant = variant
        self._need_key = True
        self._queue = deque(p for p in self._queue if p.kind != "video")
        self._videos = 0
        if variant is not None:
            variant.request_keyframe(force=True)

    def offer_video(self, packet: MediaPacket) -> None:
        if self._need_key and not packet.keyframe:
            self.video_dropped += 1
            return
        if self._videos >= self.max_video:  # behind: everything queued is stale
            dropped = [p for p in self._queue if p.kind == "video"]
            self.video_dropped += len(dropped) + 1
            self._queue = deque(p for p in self._queue if p.kind != "video")
            self._videos = 0
            self._gap = True
            if not packet.keyframe:  # H.264: the frames after a gap need a fresh keyframe
                self._need_key = True
                if self.variant is not None:
                    self.variant.request_keyframe()
                return
        if self._gap:
            packet = MediaPacket(packet.kind, packet.pts_ms, packet.duration_ms, packet.data,
                                 packet.codec, packet.keyframe, discontinuity=True)
            self._gap = False
        self._need_key = False
        self._queue.append(packet)
        self._videos += 1
        self._signal()

    def offer_audio(self, packet: MediaPacket) -> None:
        if self._audios >= self.max_audio:
            self.stalled = True  # audio is never dropped: the owner disconnects instead
        self._queue.append(packet)
        self._audios += 1
        self._signal()

    def _signal(self) -> None:
        self._wake.set()
        if self.notify is not None:
            self.notify.set()

    def pending(self) -> int:
        return len(self._queue)

    def get_nowait(self) -> MediaPacket | None:
        if not self._queue:
            return None
        packet = self._queue.popleft()
        if packet.kind == "video":
            self._videos -= 1
        else:
            self._audios -= 1
        return packet

    async def wait(self) -> None:
        """Until a packet is queued."""
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()


class VideoVariant:
    """One encoder of a session's video at (codec, size, fps), and the consumers it feeds."""

    def __init__(self, key: VariantKey, media: MediaConfig, executor: Executor, name: str):
        self.key = key
        self.media = media
        self.executor = executor
        self.name = name
        self.consumers: set[MediaConsumer] = set()
        self._latest: Tick | None = None
        self._wake = asyncio.Event()
        self._keyframe = True
        self._last_key_request = 0.0
        self._encoder: H264Encoder | JpegEncoder | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
        self.encoded = 0
        self.skipped = 0

    def request_keyframe(self, force: bool = False) -> None:
        """The next encoded frame is a keyframe (requests from lagging consumers coalesce)."""
        now = time.monotonic()
        if force or now - self._last_key_request >= KEYFRAME_REQUEST_GAP_S:
            self._last_key_request = now
            self._keyframe = True

    def on_tick(self, tick: Tick) -> None:
        if tick.rgb is None or not self.key.takes(tick.index):
            return
        if self._latest is not None:
            self.skipped += 1  # the encoder is still busy: the older tick is stale
        self._latest = tick
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            tick, self._latest = self._latest, None
            if tick is None or tick.rgb is None:
                continue
            key, self._keyframe = self._keyframe, False
            try:
                data, is_key = await loop.run_in_executor(self.executor, self._encode, tick, key)
            except Exception:
                log.exception("%s: encoding frame %d failed", self.name, tick.index)
                continue
            if not data:
                continue
            self.encoded += 1
            packet = MediaPacket("video", tick.pts_ms, round(1000 / self.key.fps), data,
                                 self.key.codec, is_key)
            for consumer in list(self.consumers):
                consumer.offer_video(packet)

    def _encode(self, tick: Tick, keyframe: bool) -> tuple[bytes, bool]:
        """On the encoder pool; one at a time per variant (the task awaits each)."""
        assert tick.rgb is not None
        w, h = self.key.width, self.key.height
        if self.key.codec == "jpeg":
            if self._encoder is None:
                self._encoder = JpegEncoder(w, h, self.media.jpeg_qscale)
            assert isinstance(self._encoder, JpegEncoder)
            return self._encoder.encode(tick.rgb, tick.index), True
        if self._encoder is None:
            self._encoder = H264Encoder(w, h, self.media)
        assert isinstance(self._encoder, H264Encoder)
        packet = self._encoder.encode(tick.rgb, tick.index, keyframe=keyframe)
        if packet is None:
            return b"", False
        return bytes(packet), bool(packet.is_keyframe)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class SessionMedia:
    """The fan-out of one session: a pacer, variants made on demand, audio for who wants it."""

    def __init__(self, clock: MediaClock, frames: FrameStore, playout: PlayoutAudio,
                 media: MediaConfig, executor: Executor, name: str):
        self.media = media
        self.executor = executor
        self.name = name
        self.pacer = FramePacer(clock, frames, playout, name=f"pacer-{name}")
        self.variants: dict[VariantKey, VideoVariant] = {}
        self._audio: set[MediaConsumer] = set()
        self._subscribed = False

    def _on_tick(self, tick: Tick) -> None:
        for variant in self.variants.values():
            variant.on_tick(tick)
        if self._audio:
            packet = MediaPacket("audio", tick.pts_ms, 1000 // FPS, tick.audio.tobytes())
            for consumer in list(self._audio):
                consumer.offer_audio(packet)

    async def subscribe(self, consumer: MediaConsumer, video: VariantKey | None,
                        audio: bool) -> None:
        """(Re)subscribe `consumer` to `video` (None: no video) and/or the audio."""
        await self.unsubscribe(consumer, keep_pacer=True)
        if video is not None:
            variant = self.variants.get(video)
            if variant is None:
                variant = self.variants[video] = VideoVariant(
                    video, self.media, self.executor,
                    f"encode-{self.name}-{video.codec}-{video.width}x{video.height}@{video.fps:g}")
            variant.consumers.add(consumer)
            consumer.join(variant)
        if audio:
            self._audio.add(consumer)
        if not self._subscribed and (self.variants or self._audio):
            self.pacer.subscribe(self._on_tick)
            self._subscribed = True
        elif self._subscribed and not (self.variants or self._audio):
            await self._stop_pacer()

    async def unsubscribe(self, consumer: MediaConsumer, keep_pacer: bool = False) -> None:
        self._audio.discard(consumer)
        variant = consumer.variant
        consumer.join(None)
        if variant is not None:
            variant.consumers.discard(consumer)
            if not variant.consumers:  # the last viewer of this variant: its encoder goes
                del self.variants[variant.key]
                await variant.aclose()
        if not keep_pacer and self._subscribed and not (self.variants or self._audio):
            await self._stop_pacer()

    async def _stop_pacer(self) -> None:
        self._subscribed = False
        await self.pacer.unsubscribe(self._on_tick)

    async def aclose(self) -> None:
        for variant in list(self.variants.values()):
            await variant.aclose()
        self.variants.clear()
        self._audio.clear()
        self._subscribed = False
        await self.pacer.aclose()
