"""Progress of long work (loading weights, rendering) on stderr. Torch-free."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[str, int, int], None]  # (what, done, total) in bytes or items


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class ProgressPrinter:
    """Progress lines on stderr: a live bar on a terminal, a line per 10% otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream: TextIO = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        now = time.monotonic()
        if self.tty:
            if done < total and now - self._last.get(label, 0.0) < 0.2:
                return
            self._last[label] = now
            end = "\n" if done >= total else ""
            self.stream.write(f"\rloading {label}: {int(frac * 1000) / 10:5.1f}% ({human_bytes(done)} / "
                              f"{human_bytes(total)}){end}")
        else:
            step = int(frac * 10)
            if step == self._last.get(label, -1):
                return
            self._last[label] = step
            self.stream.write(f"loading {label}: {int(frac * 100)}% ({human_bytes(done)} / "
                              f"{human_bytes(total)})\n")
        self.stream.flush()
