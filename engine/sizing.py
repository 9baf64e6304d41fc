"""Generation size: a pixel-area budget and the image's aspect ratio -> (H, W). Torch-free.

The rule follows Live-Avatar: a budget such as "704*384", the image's own aspect ratio, sides
multiples of 64 (the latent grid must be a multiple of 8 for FramePack). The largest scale
(searched downward in 1% steps) whose size, rounded up to multiples of 64, fits the budget wins.
"""

from __future__ import annotations

import math

from engine.errors import InputError

DIVISOR = 64


def parse_size(size: str) -> tuple[int, int]:
    """'704*384' (or '704x384') -> (704, 384): (width, height)."""
    parts = size.lower().replace("x", "*").split("*")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"size {size!r}: expected WIDTH*HEIGHT such as '704*384'") from None
    if w < DIVISOR or h < DIVISOR:
        raise InputError(f"size {size!r}: both sides must be at least {DIVISOR}")
    return w, h


def parse_area(size: str) -> int:
    """'704*384' (or '704x384') -> 270336 pixels."""
    w, h = parse_size(size)
    return w * h


def _round_up(x: int, d: int) -> int:
    return -(-x // d) * d


def generation_size(height: int, width: int, area: int, divisor: int = DIVISOR) -> tuple[int, int]:
    """(H, W) for an image of height x width under a pixel-area budget; sides multiples of 64."""
    if height < 1 or width < 1:
        raise InputError(f"image of {width}x{height} pixels is empty")
    if area < divisor * divisor:
        raise InputError(f"area budget {area} is below one {divisor}x{divisor} tile")
    if height * width <= area:
        lo, hi = 0.1, 1.0
    else:
        # smallest scale worth trying: the one at which padding up to the divisor could fill
        # the whole budget; the largest: the scale that fits without any padding
        d = divisor - 1
        a, b, c = height * width, d * (height + width), d * d - area
        lo = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        hi = math.sqrt(area / (height * width))
    for i in range(100):
        s = hi - (hi - lo) * i / 100
        h = _round_up(int(height * s), divisor)
        w = _round_up(int(width * s), divisor)
        if h * w <= area:
            return h, w
    aspect = width / height
    w = max(divisor, int(math.sqrt(area * aspect)) // divisor * divisor)
    h = max(divisor, int(math.sqrt(area / aspect)) // divisor * divisor)
    return h, w
