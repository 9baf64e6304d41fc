"""Stage timing without host syncs: CUDA events on the GPU, the wall clock on the CPU.

A `StageClock` is marked at stage boundaries as work is enqueued; on CUDA each mark is an event
recorded on the current stream, so marking never waits for the GPU. Durations are read once the
last mark has completed (`seconds()` waits for it), which for a block is when its frames are on
the host anyway. Marks may come from several streams of one device: elapsed times between them
are still on one clock.
"""

from __future__ import annotations

import time

import torch


class StageClock:
    """Named marks; `seconds()` gives the time from each mark to the next, in seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, torch.cuda.Event | float]] = []

    def mark(self, name: str) -> None:
        """Record the boundary `name` (the end of the stage that precedes it)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def done(self) -> bool:
        """Has the last mark been reached (never waits)?"""
        if not self.marks or not self.cuda:
            return True
        last = self.marks[-1][1]
        assert isinstance(last, torch.cuda.Event)
        return bool(last.query())

    def between(self, first: str, last: str) -> float:
        """Seconds from mark `first` to mark `last` (waits for `last` on CUDA)."""
        at = dict(self.marks)
        a, b = at[first], at[last]
        if isinstance(a, float) and isinstance(b, float):
            return b - a
        assert isinstance(a, torch.cuda.Event) and isinstance(b, torch.cuda.Event)
        b.synchronize()
        return a.elapsed_time(b) / 1000.0

    def seconds(self) -> dict[str, float]:
        """{stage: seconds} where stage n ends at mark n and starts at mark n-1."""
        return {self.marks[i][0]: self.between(self.marks[i - 1][0], self.marks[i][0])
                for i in range(1, len(self.marks))}
