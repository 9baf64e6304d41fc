"""Measurement marks the preview engine can stamp into its frames ([engine] preview_marks).

Two marks, both made to survive H.264 at low bitrates and any scaling of the frame:

- the **onset patch**: a square in the top-right corner, black, turning white for the frame
  whose audio starts a sound after a quiet stretch (an onset) and the three frames after it. A
  probe that knows when it made the sound (a click in a browser's fake microphone, a tone burst
  from a test's caller) and sees when the white patch is shown measures glass-to-glass latency
  (`avatar latency-probe`, client/web/probe.js).
- the **frame code**: the frame number (16 bits, least significant first, and a parity cell)
  as black and white cells along the bottom edge, so a receiver knows which generated frame it
  is showing: a frame shown again (the engine was late) reads the same number twice. The cells
  are 1/32 of the width, fractional, so they are read back at any output rung's scale (with
  whole-pixel cells a 344-wide rung of a 448-wide frame was read a growing part of a cell off,
  and its higher bits shifted: numbers about twice the real ones).

`read_frame_code` and `onset_patch_lit` read them back from a decoded picture (tests).
Numpy only.
"""

from __future__ import annotations

import numpy as np

ONSET_DBFS = -30.0  # a frame this loud...
QUIET_DBFS = -45.0  # ...after QUIET_FRAMES frames all quieter than this is an onset
QUIET_FRAMES = 3
ONSET_SHOWN = 4  # frames the patch stays white (a receiver may miss a frame or two)
CODE_BITS = 16
CODE_CELLS = CODE_BITS + 1  # and a parity cell


def frame_dbfs(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20.0 * np.log10(rms + 1e-9)


class OnsetDetector:
    """Onsets in a session's audio, frame by frame (the state carries across blocks)."""

    def __init__(self) -> None:
        self.quiet = QUIET_FRAMES  # quiet frames just before the next one (a start is quiet)
        self.lit = 0  # frames the patch stays white

    def frame(self, samples: np.ndarray) -> bool:
        """Feed one frame's audio; True while the patch is white for it."""
        db = frame_dbfs(samples)
        if db >= ONSET_DBFS and self.quiet >= QUIET_FRAMES:
            self.lit = ONSET_SHOWN
        self.quiet = self.quiet + 1 if db < QUIET_DBFS else 0
        lit, self.lit = self.lit > 0, max(0, self.lit - 1)
        return lit

    def reset(self) -> None:
        """A cut in the timeline (a seek): what came before says nothing about what follows."""
        self.quiet, self.lit = QUIET_FRAMES, 0


def patch_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the onset patch."""
    side = max(8, min(width, height) // 5)
    return width - side, 0, width, side


def code_cell(width: int) -> float:
    """The side of a code cell: 1/32 of the width, kept fractional so that a reader of a scaled
    picture (a smaller output rung) finds the cells where the scaling put them."""
    return max(4.0, width / 32)


def _px(v: float) -> int:
    """Half up, as the page's Math.round (Python's round goes to even)."""
    return int(np.floor(v + 0.5))


def _cell_span(i: int, cell: float) -> tuple[int, int]:
    """Columns of cell i (the code starts one cell in from the left edge)."""
    return _px((i + 1) * cell), _px((i + 2) * cell)


def draw_marks(frame: np.ndarray, n: int, onset: bool) -> None:
    """Stamp frame number `n` and the onset patch into `frame` (uint8 [H, W, 3]), in place."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = patch_box(w, h)
    frame[y0:y1, x0:x1] = 255 if onset else 0
    cell = code_cell(w)
    bits = [(n >> i) & 1 for i in range(CODE_BITS)]
    bits.append(sum(bits) % 2)
    top = h - _px(cell)
    for i, bit in enumerate(bits):
        a, b = _cell_span(i, cell)
        frame[top:h, a:b] = 255 if bit else 0


def _luma(region: np.ndarray) -> float:
    return float(region.astype(np.float32).mean()) if region.size else 0.0


def onset_patch_lit(rgb: np.ndarray) -> bool:
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = patch_box(w, h)
    side = x1 - x0  # the inner half: edges blur in the codec
    return _luma(rgb[y0 + side // 4:y1 - side // 4, x0 + side // 4:x1 - side // 4]) > 160


def read_frame_code(rgb: np.ndarray) -> int | None:
    """The frame number stamped in a decoded picture, or None if it does not read back."""
    h, w = rgb.shape[:2]
    cell = code_cell(w)
    q = max(1, _px(cell / 4))  # the inner half: edges blur in the codec and the scaler
    top = h - _px(cell)
    bits = []
    for i in range(CODE_CELLS):
        a, b = _cell_span(i, cell)
        bits.append(_luma(rgb[top + q:h - q, a + q:b - q]) > 128)
    if sum(bits[:CODE_BITS]) % 2 != bits[CODE_BITS]:
        return None
    return sum(1 << i for i, bit in enumerate(bits[:CODE_BITS]) if bit)
