"""One pacer per session: the frame to present at each frame time, and its audio, on the clock.

At wall time t0 + delay + n/25 it takes frame n from the session's `FrameStore` (the newest one at
or before n: the last frame repeats while the engine is late; none before the first frame) and
the 40 ms of playout audio that go with it, and hands both to every subscriber at once. A
subscriber is a plain callback and must not block: encoders take the frame to their own task
(stream/media/fanout.py). If the loop wakes more than two frames late the pacer jumps to the
present (latest frame wins): frame indexes stay media time, so a jump is visible in the PTS.
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
    """Media frame time `index`: the picture to show then (None before the first frame), and
    the playout audio for [index * 1920, (index + 1) * 1920) at 48 kHz."""

    index: int
    rgb: np.ndarray | None
    audio: np.ndarray  # int16 [1920]

    @property
    def pts_ms(self) -> int:
        return self.index * 1000 // FPS


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
        self.jumps = 0

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

    async def _run(self) -> None:
        n = self.clock.frame_playing_now()
        while True:
            delay = self.clock.wall_for(n / FPS) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.clock.frame_playing_now()
            if now - n > MAX_LATE_FRAMES:
                self.jumps += 1
                n = now
            found = self.frames.at_or_before(n)
            tick = Tick(n, found[1] if found is not None else None,
                        self.playout.read(n * SAMPLES_PER_VIDEO_FRAME, SAMPLES_PER_VIDEO_FRAME))
            self.ticks += 1
            for callback in list(self._subscribers):
                try:
                    callback(tick)
                except Exception:  # one broken subscriber must not stop the others
                    log.exception("%s: a subscriber failed at frame %d", self.name, n)
            n += 1
