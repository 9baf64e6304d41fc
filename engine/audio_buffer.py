"""A session's input audio on an absolute sample timeline, bounded in memory. Numpy only."""

from __future__ import annotations

import numpy as np

from engine.api import SAMPLE_RATE


class AudioBuffer:
    """Mono 16 kHz float32 samples of one session with absolute indexing; old samples dropped.

    A write more than `max_gap` samples past the end starts afresh there instead of storing the
    gap (the gap reads as silence either way), so memory stays bounded whatever the timestamps.
    """

    def __init__(self, max_gap: int = 60 * SAMPLE_RATE) -> None:
        self.max_gap = max_gap
        self._data = np.zeros(0, dtype=np.float32)
        self._start = 0  # absolute index of _data[0]

    @property
    def end(self) -> int:
        """Absolute index one past the last sample received."""
        return self._start + len(self._data)

    def write(self, samples: np.ndarray, at: int | None = None) -> None:
        """Place samples at absolute index `at` (default: right after the end).

        A gap before `at` reads as silence; samples overlapping what is already there (audio that
        arrived after its span was padded with silence) replace it, so later windows see them.
        """
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        at = self.end if at is None else at
        if at - self.end > self.max_gap:
            self._data, self._start = np.zeros(0, dtype=np.float32), at
        if at > self.end:
            self._data = np.concatenate([self._data, np.zeros(at - self.end, np.float32)])
        if at < self._start:  # older than anything any later window can use
            samples, at = samples[self._start - at:], self._start
        overlap = min(len(samples), self.end - at)
        if overlap > 0:
            self._data[at - self._start:at - self._start + overlap] = samples[:overlap]
        self._data = np.concatenate([self._data, samples[max(overlap, 0):]])

    def pad_to(self, end: int) -> int:
        """Append silence up to absolute index `end`; returns how many samples were added."""
        missing = max(0, end - self.end)
        if missing:
            self.write(np.zeros(missing, dtype=np.float32))
        return missing

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop); anything before the buffer or after its end reads as zeros."""
        out = np.zeros(max(0, stop - start), dtype=np.float32)
        lo, hi = max(start, self._start), min(stop, self.end)
        if hi > lo:
            out[lo - start:hi - start] = self._data[lo - self._start:hi - self._start]
        return out

    def forget_before(self, index: int) -> None:
        if index > self._start:
            cut = min(index - self._start, len(self._data))
            self._data = self._data[cut:]
            self._start += cut

    @property
    def nbytes(self) -> int:
        return self._data.nbytes
