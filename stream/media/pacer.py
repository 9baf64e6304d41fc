"""One pacer per session: the frame to present at each frame time, and its audio, on the clock.

This is the only place that decides *when* media goes out: every output of a session (WebRTC
video and audio, MPEG-TS, WebSocket media) is fed from its ticks (stream/media/fanout.py).

Two timelines. Media time is the session's (video frame n covers [n/25, (n+1)/25) of the input
audio). The output timeline is wall time: output frame o is due at t0 + base delay + o/25, and
RTP and MPEG-TS timestamps count output frames, so receivers see a steady 25 fps clock. Normally
media frame n = o - shift goes out at output frame o, that is at t0 + delay + n/25 with the
playout delay `delay = base + shift/25` (`MediaClock.delay`, which the pacer keeps).

The playout delay follows `target_delay` (set by the session's latency controller,
stream/latency.py), one frame (40 ms) at a time and only at a pause, so no sound is ever cut
or stretched: the pacer looks at the playout audio around the next media frame, and only where
it is quiet (under `pause_dbfs` over [n - 2, n + 3)) does it

- grow the delay by inserting a tick of silence (`inserted`: silent audio on the output
  timeline, no picture, the media frame waits), or
- shrink it by dropping media frame n (`dropped`: its audio, silence, never reaches a receiver
  on the output timeline; the next media frame goes out in its place).

At each tick it takes frame n from the session's `FrameStore` (the newest one at or before n:
the last frame repeats while the engine is late; none before the first frame) and the 40 ms of
playout audio that go with it, and hands both to every subscriber at once. A subscriber is a
plain callback and must not block: encoders take the frame to their own task.

A loop that wakes late delivers the ticks it missed, in order, at once. Audio is never dropped:
if the loop is more than `MAX_LATE_FRAMES` frames late, the missed ticks go out with their audio
but without a picture (`shown=False`), and only the present one carries video (latest frame
wins); the skip is visible in the video timestamps, never in the audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.api import FPS
from stream.media.timeline import SAMPLES_PER_VIDEO_FRAME, FrameStore, MediaClock, PlayoutAudio

log = logging.getLogger(__name__)

MAX_LATE_FRAMES = 2
PAUSE_BEFORE, PAUSE_AFTER = 2, 3  # frames of quiet around a change: [n - 2, n + 3)


@dataclass(frozen=True)
class Tick:
    """Media frame time `index`: the picture to show then and the playout audio for
    [index * 1920, (index + 1) * 1920) at 48 kHz, at output frame `out`.

    rgb: None before the engine's first frame; source: the index of the frame `rgb` is (less
    than `index` when the last frame repeats, -1 without one); shown: False for a tick the
    pacer delivers late only for its audio (its picture is skipped), and for the two kinds of
    delay change: `inserted` (a tick of silence on the output timeline; `index` is the media
    frame that waits) and `dropped` (media frame `index` leaves the output timeline: only
    receivers of media time, a socket's PCM, get its audio).
    """

    index: int
    rgb: np.ndarray | None
    audio: np.ndarray  # int16 [1920]
    source: int = -1
    shown: bool = True
    out: int | None = None  # the output frame (None: the same as index)
    inserted: bool = False
    dropped: bool = False

    @property
    def pts_ms(self) -> int:
        """Media time of the tick."""
        return self.index * 1000 // FPS

    @property
    def out_index(self) -> int:
        return self.index if self.out is None else self.out

    @property
    def repeated(self) -> bool:
        return self.rgb is not None and self.source != self.index


Subscriber = Callable[[Tick], None]


def quiet_threshold(dbfs: float) -> float:
    """Mean square of int16 samples at `dbfs` (full scale 32768)."""
    return (32768.0 * 10 ** (dbfs / 20)) ** 2


class FramePacer:
    def __init__(self, clock: MediaClock, frames: FrameStore, playout: PlayoutAudio,
                 name: str = "pacer", pause_dbfs: float = -40.0):
        self.clock = clock
        self.frames = frames
        self.playout = playout
        self.name = name
        self._quiet = quiet_threshold(pause_dbfs)
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task | None = None
        self.base_delay = clock.delay  # output frame o is due at t0 + base_delay + o/25
        self.shift = 0  # output frames ahead of media frames: delay = base + shift / 25
        self.target_delay: float | None = None  # where the delay goes, at pauses (None: stay)
        self.ticks = 0
        self.jumps = 0  # times the loop was so late that pictures were skipped
        self.skipped = 0  # ticks delivered for their audio only
        self.repeated = 0  # ticks whose picture is an older frame (the engine was late)
        self.inserted = 0  # ticks of silence inserted at pauses (the delay grew)
        self.dropped = 0  # media frames dropped at pauses (the delay shrank)

    # 1. the delay ----------------------------------------------------------------------------

    def _target_shift(self) -> int:
        if self.target_delay is None:
            return self.shift
        return round((self.target_delay - self.base_delay) * FPS)

    def _set_shift(self, shift: int) -> None:
        self.shift = shift
        self.clock.delay = self.base_delay + shift / FPS

    def quiet(self, n: int) -> bool:
        """Is the playout audio around media frame n ([n - 2, n + 3)) a pause?"""
        start = max(0, n - PAUSE_BEFORE)
        span = self.playout.read(start * SAMPLES_PER_VIDEO_FRAME,
                                 (n + PAUSE_AFTER - start) * SAMPLES_PER_VIDEO_FRAME)
        return float(np.mean(np.square(span, dtype=np.float64))) < self._quiet

    def at_pause(self) -> bool:
        """Is the audio being presented now a pause (where the delay may change)?"""
        return self.quiet(self.clock.frame_playing_now())

    def set_target_delay(self, seconds: float) -> None:
        """Move the playout delay to `seconds`, at pauses (at once while no one watches)."""
        self.target_delay = seconds
        if self._task is None:
            self._set_shift(self._target_shift())

    # 2. subscribers --------------------------------------------------------------------------

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

    # 3. ticks --------------------------------------------------------------------------------

    def _tick(self, n: int, out: int, shown: bool) -> Tick:
        audio = self.playout.read(n * SAMPLES_PER_VIDEO_FRAME, SAMPLES_PER_VIDEO_FRAME)
        if not shown:
            return Tick(n, None, audio, shown=False, out=out)
        found = self.frames.at_or_before(n)
        if found is None:
            return Tick(n, None, audio, out=out)
        return Tick(n, found[1], audio, source=found[0], out=out)

    def _deliver(self, tick: Tick) -> None:
        self.ticks += 1
        self.skipped += not tick.shown and not (tick.inserted or tick.dropped)
        self.repeated += tick.repeated
        for callback in list(self._subscribers):
            try:
                callback(tick)
            except Exception:  # one broken subscriber must not stop the others
                log.exception("%s: a subscriber failed at frame %d", self.name, tick.index)

    def _change_delay(self, o: int) -> None:
        """At output frame o: insert a tick of silence, or drop a media frame, if the delay
        should change and the audio there is a pause."""
        want = self._target_shift()
        if want == self.shift:
            return
        n = o - self.shift
        if not self.quiet(n):
            return
        silence = np.zeros(SAMPLES_PER_VIDEO_FRAME, np.int16)
        if want > self.shift:  # grow: output frame o is silence, media frame n waits
            self._deliver(Tick(n, None, silence, shown=False, out=o, inserted=True))
            self.inserted += 1
            self._set_shift(self.shift + 1)
        else:  # shrink: media frame n leaves the output timeline
            audio = self.playout.read(n * SAMPLES_PER_VIDEO_FRAME, SAMPLES_PER_VIDEO_FRAME)
            self._deliver(Tick(n, None, audio, shown=False, out=o, dropped=True))
            self.dropped += 1
            self._set_shift(self.shift - 1)

    def _out_now(self) -> int:
        return max(0, math.floor((time.monotonic() - self.clock.t0 - self.base_delay) * FPS))

    async def _run(self) -> None:
        o = self._out_now()
        while True:
            delay = self.clock.t0 + self.base_delay + o / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self._out_now()
            if now - o > MAX_LATE_FRAMES:
                self.jumps += 1
                for missed in range(o, now):  # their audio still goes out, in order
                    self._deliver(self._tick(missed - self.shift, missed, shown=False))
                o = now
            grew = self.shift
            self._change_delay(o)
            if self.shift > grew:  # this output frame was silence
                o += 1
                continue
            self._deliver(self._tick(o - self.shift, o, shown=True))
            o += 1
