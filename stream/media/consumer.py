"""What one receiver of a session's media gets: encoded packets in a bounded queue of its own.

A `MediaConsumer` is fed by the session's fan-out (stream/media/fanout.py) and emptied by its
owner (a WebRTC track, the MPEG-TS feed, a bot's WebSocket writer). Nothing it does can slow the
encoder or another consumer:

- video joins at a keyframe (the variant is asked for one); when more than `max_video` frames
  wait, the receiver is behind: everything queued is stale and goes, and it waits for the next
  keyframe (the tail of the GOP is dropped for it alone; the variant is asked for a keyframe);
- audio is never dropped: a consumer whose audio backs up past `max_audio_s` is `stalled`, and
  its owner disconnects it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.api import FPS

if TYPE_CHECKING:
    from stream.media.variant import VideoVariant

FRAME_MS = 1000 // FPS


@dataclass(frozen=True)
class MediaPacket:
    kind: str  # "video" | "audio"
    pts_ms: int  # session media time
    duration_ms: int
    data: bytes  # an H.264 Annex-B access unit, a VP8 frame, a JPEG image, PCM (s16le mono
    # 48 kHz), an Opus packet or AAC-LC frames behind ADTS headers
    codec: str = "pcm"  # "h264" | "vp8" | "jpeg" | "pcm" | "opus" | "aac"
    keyframe: bool = True
    discontinuity: bool = False  # video frames were dropped (for this consumer) before this one
    repeated: bool = False  # the picture is an older frame again (the engine was late)
    # audio: the 48 kHz index of its first sample on the output timeline (exact timing; for
    # PCM, which follows media time, its media sample)
    sample: int | None = None
    out_index: int | None = None  # video: its frame on the output timeline (None: index)
    encoded_at: float = 0.0  # time.monotonic() the encoder made it (latency accounting)

    @property
    def index(self) -> int:
        """The media frame index of a video packet (pts_ms is a multiple of 40)."""
        return self.pts_ms // FRAME_MS

    @property
    def out(self) -> int:
        """A video packet's frame on the output timeline (what RTP and MPEG-TS count)."""
        return self.index if self.out_index is None else self.out_index


class MediaConsumer:
    """One receiver's queue. `get_nowait` returns packets in the order they were offered."""

    def __init__(self, name: str, max_video: int = 8, max_audio_s: float = 5.0,
                 kind: str = "viewer"):
        self.name = name
        self.kind = kind  # who owns it ("webrtc", "mpegts", "websocket", ...): for metrics
        self.max_video = max_video
        self.max_audio = max(1, round(max_audio_s * FPS))  # 40 ms slices
        self.variant: VideoVariant | None = None
        self.audio_codec: str | None = None  # set by the fan-out on subscribe
        self._queue: deque[MediaPacket] = deque()
        self._videos = 0
        self._audios = 0
        self._wake = asyncio.Event()
        self.notify: asyncio.Event | None = None  # also set when a packet is queued (a writer)
        self._need_key = True  # join at a keyframe
        self._gap = False
        self._last_index: int | None = None
        self.closed = False
        self.stalled = False
        # figures: what this receiver saw
        self.video_dropped = 0  # offered to it but not queued (before a keyframe, or stale)
        self.video_taken = 0
        self.audio_taken = 0
        self.repeated = 0  # frames taken whose picture repeats an older one
        self.skipped = 0  # frame times of its variant it got no frame for

    def join(self, variant: VideoVariant | None) -> None:
        """Start receiving `variant`'s video (None: none) from its next keyframe."""
        self.variant = variant
        self._need_key = True
        self._queue = deque(p for p in self._queue if p.kind != "video")
        self._videos = 0
        if variant is not None:
            variant.request_keyframe("join")

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
            if not packet.keyframe:  # the frames after a gap need a fresh keyframe
                self._need_key = True
                if self.variant is not None:
                    self.variant.request_keyframe("resync")
                return
        if self._gap:
            packet = replace(packet, discontinuity=True)
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

    def close(self) -> None:
        """Wake a waiter for good (its owner is going away)."""
        self.closed = True
        self._signal()

    def pending(self) -> int:
        return len(self._queue)

    def pending_video(self) -> int:
        """Video frames waiting: this receiver's send-queue depth."""
        return self._videos

    def get_nowait(self) -> MediaPacket | None:
        if not self._queue:
            return None
        packet = self._queue.popleft()
        if packet.kind == "video":
            self._videos -= 1
            self._count_video(packet)
        else:
            self._audios -= 1
            self.audio_taken += 1
        return packet

    def _count_video(self, packet: MediaPacket) -> None:
        self.video_taken += 1
        self.repeated += packet.repeated
        index = packet.index
        if self._last_index is not None and self.variant is not None:
            step = FPS / self.variant.key.fps
            self.skipped += max(0, round((index - self._last_index) / step) - 1)
        self._last_index = index

    async def wait(self) -> None:
        """Until a packet is queued (or the consumer is closed)."""
        while not self._queue and not self.closed:
            self._wake.clear()
            await self._wake.wait()

    def figures(self) -> dict[str, int]:
        return {"frames_sent": self.video_taken, "frames_repeated": self.repeated,
                "frames_skipped": self.skipped, "frames_dropped": self.video_dropped,
                "queue_frames": self._videos, "audio_slices": self.audio_taken}
