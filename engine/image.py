"""Reference image -> model input: scale to cover the generation size, centre-crop, [-1, 1].

Unlike upstream, which pads the short side with black bars when the aspects differ, the image is
scaled to cover the target and centre-cropped. The size itself comes from `engine.sizing`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError


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
