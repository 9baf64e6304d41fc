"""One pacer per session: the frame to present at each frame time, and its audio, on the clock.

This is the only place that decides *when* media goes out: every output of a session (WebRTC
video and audio, MPEG-TS, WebSocket media) is fed from its ticks (stream/media/fanout.py).

At wall time t0 + delay + n/25 it takes frame n from the session's `FrameStore` (the newest one
at or before n: the last frame repeats while the engine is late; none before the first frame)
and the 40 ms of playout audio that go with it, and hands both to every subscriber at once. A
subscriber is a plain callback and must not block: encoders take the frame to their own task.

A loop that wakes late delivers the ticks it missed, in order, at once. Audio is never dropped:
if the loop is more than `MAX_LATE_FRAMES` frames late, the missed ticks go out with their audio
but without a picture (`shown=False`), and only the present one carries video (latest frame
wins); frame indexes stay media time, so the skip is visible in the video PTS, never in the audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.api import FPS
from stream.media.timeline import SAMPLES_PER_VIDEO_FRAME, FrameStore, MediaClock, PlayoutAudio

log = logging.getLogger(__name__)

MAX_LATE_FRAMES = 2


@dataclass(frozen=True)
class Tick:
    """Media frame time `index`: the picture to show then and the playout audio for
    [index * 1920, (index + 1) * 1920) at 48 kHz.

    rgb: None before the engine's first frame; source: the index of the frame `rgb` is (less
    than `index` when the last frame repeats, -1 without one); shown: False for a tick the
    pacer delivers late only for its audio (its picture is skipped).
    """

    index: int
    rgb: np.ndarray | None
    audio: np.ndarray  # int16 [1920]
    source: int = -1
    shown: bool = True

    @property
    def pts_ms(self) -> int:
        return self.index * 1000 // FPS

    @property
    def repeated(self) -> bool:
        return self.rgb is not None and self.source != self.index


Subscriber = Callable[[Tick], None]


class FramePacer:
    def __init__(self, clock: MediaClock, frames: FrameStore, playout: PlayoutAudio,
                 name: str = "pacer"):
        self.clock = clock
        self.frames = frames
        self.playout = playout
        self.name = name
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.jumps = 0  # times the loop was so late that pictures were skipped
        self.skipped = 0  # ticks delivered for their audio only
        self.repeated = 0  # ticks whose picture is an older frame (the engine was late)

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def unsubscribe(self, callback: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)
        if not self._subscribers:
            await self.aclose()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _tick(self, n: int, shown: bool) -> Tick:
        audio = self.playout.read(n * SAMPLES_PER_VIDEO_FRAME, SAMPLES_PER_VIDEO_FRAME)
        if not shown:
            return Tick(n, None, audio, shown=False)
        found = self.frames.at_or_before(n)
        if found is None:
            return Tick(n, None, audio)
        return Tick(n, found[1], audio, source=found[0])

    def _deliver(self, tick: Tick) -> None:
        self.ticks += 1
        self.skipped += not tick.shown
        self.repeated += tick.repeated
        for callback in list(self._subscribers):
            try:
                callback(tick)
            except Exception:  # one broken subscriber must not stop the others
                log.exception("%s: a subscriber failed at frame %d", self.name, tick.index)

    async def _run(self) -> None:
        n = self.clock.frame_playing_now()
        while True:
            delay = self.clock.wall_for(n / FPS) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.clock.frame_playing_now()
            if now - n > MAX_LATE_FRAMES:
                self.jumps += 1
                for missed in range(n, now):  # their audio still goes out, in order
                    self._deliver(self._tick(missed, shown=False))
                n = now
            self._deliver(self._tick(n, shown=True))
            n += 1
