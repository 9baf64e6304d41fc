"""Reference image -> generation size and model input (resize to cover, centre crop, [-1, 1]).

The generation size follows Live-Avatar: a pixel-area budget such as "704*384", the image's own
aspect ratio, sides multiples of 64 (the latent grid must be a multiple of 8 for FramePack). The
largest scale (searched downward in 1% steps) whose size, rounded up to multiples of 64, fits the
budget wins. Unlike upstream, which pads the short side with black bars when the aspects differ,
the image is scaled to cover the target and centre-cropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError

DIVISOR = 64


def parse_area(size: str) -> int:
    """'704*384' (or '704x384') -> 270336 pixels."""
    parts = size.lower().replace("x", "*").split("*")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"size {size!r}: expected WIDTH*HEIGHT such as '704*384'") from None
    if w < DIVISOR or h < DIVISOR:
        raise InputError(f"size {size!r}: both sides must be at least {DIVISOR}")
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


def check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InputError("reference image must be a uint8 numpy array [H, W, 3] (RGB)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"reference image has shape {image.shape}; expected [H, W, 3] RGB")
    if min(image.shape[:2]) < 16:
        raise InputError(f"reference image of {image.shape[1]}x{image.shape[0]} is too small "
                         "(at least 16 pixels a side)")
    return image[:, :, :3]


def prepare_reference(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [h, w, 3] -> float32 [1, 3, 1, H, W] in [-1, 1]: scale to cover, centre-crop."""
    image = check_image(image)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0.0, 1.0)
    return (x * 2.0 - 1.0)[:, :, None]
