"""A session's one media clock, and the stores that live on it: frames and playout audio.

Media time 0 is the session's start (`t0`, monotonic). Video frame n covers [n/25, (n+1)/25) and
audio sample s (48 kHz for playout) sits at s/48000. Everything a viewer plays is scheduled at
wall time t0 + delay + media time, for video and audio alike, so the two stay in sync by
construction (audio is master: it is never dropped or stretched; video repeats or skips frames).

The playout store is a ring: it refuses a write that would overwrite samples not yet played
(`PlayoutOverflow`) instead of losing them, so a source sending ahead of real time (a bot's TTS)
must be paced by its writer (stream/media/utterances.py does that).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from engine.api import FPS, SAMPLE_RATE, FrameBlock

PLAYOUT_RATE = 48000
SAMPLES_PER_VIDEO_FRAME = PLAYOUT_RATE // FPS  # 1920


@dataclass
class MediaClock:
    t0: float  # time.monotonic() at media time 0
    delay: float  # playout delay: media time t is presented at t0 + delay + t

    @classmethod
    def start(cls, delay: float) -> MediaClock:
        return cls(time.monotonic(), delay)

    def media_now(self) -> float:
        """Media time being captured now (for stamping incoming audio)."""
        return time.monotonic() - self.t0

    def playing_now(self) -> float:
        """Media time being presented now."""
        return time.monotonic() - self.t0 - self.delay

    def wall_for(self, media_t: float) -> float:
        return self.t0 + self.delay + media_t

    def frame_playing_now(self) -> int:
        """The video frame on screen now: frame n is presented during [n/25, (n+1)/25)."""
        return max(0, math.floor(self.playing_now() * FPS))

    def engine_samples_now(self) -> int:
        return max(0, round(self.media_now() * SAMPLE_RATE))


class FrameStore:
    """Generated frames by index; keeps the newest `capacity` frames (older ones are stale).

    Each frame remembers when it arrived (monotonic), so latency can be measured from it.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._frames: dict[int, np.ndarray] = {}
        self._arrived: dict[int, float] = {}
        self.newest = -1
        self.size: tuple[int, int] | None = None  # (width, height) of the frames

    def put(self, block: FrameBlock) -> None:
        now = time.monotonic()
        for i, frame in enumerate(block.frames):
            self._frames[block.first_frame + i] = frame
            self._arrived[block.first_frame + i] = now
        self.newest = max(self.newest, block.first_frame + len(block.frames) - 1)
        self.size = block.size
        floor = self.newest - self.capacity
        for n in [n for n in self._frames if n <= floor]:
            del self._frames[n]
            del self._arrived[n]

    def get(self, n: int) -> np.ndarray | None:
        return self._frames.get(n)

    def arrived(self, n: int) -> float | None:
        """When frame n reached the store (time.monotonic()), if it is (still) here."""
        return self._arrived.get(n)

    def at_or_before(self, n: int) -> tuple[int, np.ndarray] | None:
        """The newest frame with index <= n (to repeat on underrun)."""
        candidates = [i for i in self._frames if i <= n]
        if not candidates:
            return None
        best = max(candidates)
        return best, self._frames[best]

    def __len__(self) -> int:
        return len(self._frames)


class PlayoutOverflow(RuntimeError):
    """A write would overwrite playout audio that has not been played yet."""


class PlayoutAudio:
    """The session's input audio at 48 kHz mono int16, by absolute sample index, bounded.

    With a `clock`, a write that would overwrite a sample not yet played (or played less than
    `keep_played_s` ago, for viewers running a little late) raises `PlayoutOverflow`: the writer
    is ahead of real time by more than the ring holds, and losing audio silently is never right.
    """

    def __init__(self, seconds: float, clock: MediaClock | None = None,
                 keep_played_s: float = 0.5):
        self.capacity = int(seconds * PLAYOUT_RATE)
        self.clock = clock
        self.keep_played = int(keep_played_s * PLAYOUT_RATE)
        self._buf = np.zeros(self.capacity, np.int16)
        self._written = np.zeros(self.capacity, bool)
        self.end = 0  # one past the newest sample written

    def play_position(self) -> int:
        """The 48 kHz sample being presented now (0 without a clock)."""
        return 0 if self.clock is None else max(0, int(self.clock.playing_now() * PLAYOUT_RATE))

    def room_until(self) -> int | None:
        """One past the last sample index a write may reach now (None: no clock, no bound)."""
        if self.clock is None:
            return None
        return self.play_position() - self.keep_played + self.capacity

    def write(self, start: int, samples: np.ndarray) -> None:
        limit = self.room_until()
        if limit is not None and start + len(samples) > limit and self.end > limit - self.capacity:
            raise PlayoutOverflow(
                f"playout write of samples {start}..{start + len(samples)} would overwrite audio "
                f"not yet played (the ring holds {self.capacity / PLAYOUT_RATE:.1f} s; writes may "
                f"reach sample {limit} now): pace the source to real time")
        samples = samples[-self.capacity:] if len(samples) > self.capacity else samples
        if start + len(samples) <= self.end - self.capacity:
            return  # entirely older than what is kept
        idx = (np.arange(start, start + len(samples))) % self.capacity
        # clear slots between the old end and this write: they belong to a gap (silence)
        if start > self.end:
            gap = np.arange(max(self.end, start - self.capacity), start) % self.capacity
            self._buf[gap] = 0
            self._written[gap] = False
        self._buf[idx] = samples
        self._written[idx] = True
        self.end = max(self.end, start + len(samples))

    def silence(self, start: int, stop: int) -> None:
        """Samples [start, stop) become silence (an interrupted utterance's cut-off tail)."""
        lo, hi = max(start, self.end - self.capacity, 0), min(stop, self.end)
        if hi > lo:
            self._written[np.arange(lo, hi) % self.capacity] = False

    def read(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start + count); never-written or expired samples read as silence."""
        out = np.zeros(count, np.int16)
        lo, hi = max(start, self.end - self.capacity, 0), min(start + count, self.end)
        if hi > lo:
            idx = np.arange(lo, hi) % self.capacity
            out[lo - start:hi - start] = np.where(self._written[idx], self._buf[idx], 0)
        return out
