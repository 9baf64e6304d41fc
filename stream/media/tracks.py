"""aiortc tracks of one viewer: the avatar's video and audio, both paced by the session clock.

`recv` sleeps until the next frame's presentation time t0 + delay + media time, so every viewer
of a session shows the same media time at the same wall time, and audio and video agree. Video
modes: "paced" sends every frame in order and skips only when more than two frames late;
"latest" (OBS) always sends the frame for the current time (latest frame wins). On underrun the
last frame repeats; before the first frame, black. Encoding runs on the dedicated executor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from fractions import Fraction

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.api import FPS
from stream.config import MediaConfig
from stream.media.encoder import VIDEO_TIME_BASE, H264Encoder
from stream.media.timeline import PLAYOUT_RATE, FrameStore, MediaClock, PlayoutAudio

AUDIO_PTIME = 0.020
AUDIO_SAMPLES = int(PLAYOUT_RATE * AUDIO_PTIME)  # 960
AUDIO_TIME_BASE = Fraction(1, PLAYOUT_RATE)


async def _sleep_until(wall: float) -> None:
    delay = wall - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, clock: MediaClock, frames: FrameStore, media: MediaConfig,
                 executor: Executor, mode: str = "paced",
                 on_sent: Callable[[int], None] | None = None):
        super().__init__()
        self.clock = clock
        self.frames = frames
        self.media = media
        self.executor = executor
        self.mode = mode
        self.on_sent = on_sent
        self.codec = "VP8"  # set to "H264" once negotiated: then packets are pre-encoded here
        self._encoder: H264Encoder | None = None
        self._next: int | None = None
        self.sent = 0
        self.skipped = 0
        self.repeated = 0

    def _pick(self, n: int) -> np.ndarray:
        frame = self.frames.get(n)
        if frame is not None:
            return frame
        self.repeated += 1
        found = self.frames.at_or_before(n)
        if found is not None:
            return found[1]
        w, h = self.frames.size or (64, 64)
        return np.zeros((h, w, 3), np.uint8)

    async def recv(self) -> av.Packet | av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            now_frame = self.clock.frame_playing_now()
            if self._next is None:
                self._next = now_frame
            elif self.mode == "latest" or now_frame - self._next > 2:
                self.skipped += max(0, now_frame - self._next)
                self._next = max(self._next, now_frame)
            n = self._next
            await _sleep_until(self.clock.wall_for(n / FPS))
            if self.readyState != "live":
                raise MediaStreamError
            rgb = self._pick(n)
            self._next = n + 1
            out = await self._encode(rgb, n)
            if out is not None:
                self.sent += 1
                if self.on_sent is not None:
                    self.on_sent(n)
                return out

    async def _encode(self, rgb: np.ndarray, n: int) -> av.Packet | av.VideoFrame | None:
        if self.codec != "H264":
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = n
            frame.time_base = VIDEO_TIME_BASE
            return frame
        size = (rgb.shape[1], rgb.shape[0])
        if self._encoder is None or self._encoder.size != size:
            self._encoder = H264Encoder(size[0], size[1], self.media)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._encoder.encode, rgb, n)


class AvatarAudioTrack(MediaStreamTrack):
    """The session's input audio, played out at the same media time as the video."""

    kind = "audio"

    def __init__(self, clock: MediaClock, playout: PlayoutAudio):
        super().__init__()
        self.clock = clock
        self.playout = playout
        self._next: int | None = None  # index of the next 20 ms packet

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = max(0, int(self.clock.playing_now() / AUDIO_PTIME) + 1)
        if self._next is None or now - self._next > 5:  # start, or > 100 ms late: catch up
            self._next = now
        k = self._next
        await _sleep_until(self.clock.wall_for(k * AUDIO_PTIME))
        if self.readyState != "live":
            raise MediaStreamError
        samples = self.playout.read(k * AUDIO_SAMPLES, AUDIO_SAMPLES)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = PLAYOUT_RATE
        frame.pts = k * AUDIO_SAMPLES
        frame.time_base = AUDIO_TIME_BASE
        self._next = k + 1
        return frame
