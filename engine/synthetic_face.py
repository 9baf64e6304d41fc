"""Synthetic pictures for the preview's face tests and benchmark: a shaded face, a "photo", a
landscape. No photographs ship with the project, so these stand in for users' portraits.

The face is drawn in natural proportions (eyes at 40% of the head's height, mouth at 75%) with the
light-and-shadow pattern a frontal-face detector keys on: a bright forehead and nose bridge,
shadowed eye sockets, dark brows and pupils, lit cheeks, a darker lip line and a shaded chin.
`Face` records where everything was drawn, for tests to compare with what the detector finds.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SKIN = np.array([214, 168, 136], np.float32)  # RGB
HAIR = np.array([70, 46, 32], np.float32)


@dataclass(frozen=True)
class Face:
    """Where a drawn face is, in pixels of the picture it was drawn on."""

    cx: float  # centre of the head ellipse
    cy: float
    width: float  # head width (ear to ear)
    height: float  # head height (hairline to chin)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the head ellipse."""
        return (round(self.cx - self.width / 2), round(self.cy - self.height / 2),
                round(self.cx + self.width / 2), round(self.cy + self.height / 2))

    @property
    def mouth(self) -> tuple[float, float]:
        return self.cx, self.cy + 0.25 * self.height

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        y = self.cy - 0.10 * self.height
        return (self.cx - 0.21 * self.width, y), (self.cx + 0.21 * self.width, y)


# 1. Drawing helpers -----------------------------------------------------------------------------


def _blend(img: np.ndarray, mask: np.ndarray, color: np.ndarray | tuple[float, ...],
           alpha: float = 1.0) -> None:
    """img = img * (1 - a m) + color * a m, with a soft mask m in [0, 1], in place."""
    m = (mask * alpha)[:, :, None]
    img *= 1.0 - m
    img += m * np.asarray(color, np.float32)


def _soft_ellipse(shape: tuple[int, int], cx: float, cy: float, rx: float, ry: float,
                  feather: float = 1.5) -> np.ndarray:
    """A filled ellipse in [0, 1] with edges blurred over about `feather` pixels."""
    mask = np.zeros(shape, np.float32)
    cv2.ellipse(mask, (round(cx * 16), round(cy * 16)),
                (max(1, round(rx * 16)), max(1, round(ry * 16))), 0, 0, 360, 1.0, -1,
                cv2.LINE_AA, 4)
    k = 2 * max(1, round(feather)) + 1
    return cv2.GaussianBlur(mask, (k, k), 0)


# 2. The face ------------------------------------------------------------------------------------


def draw_face(img: np.ndarray, cx: float, cy: float, width: float) -> Face:
    """Draw a shaded frontal face (head `width` pixels wide) centred at (cx, cy) on uint8 RGB
    `img`, in place; return where it is."""
    face = Face(cx, cy, width, width * 1.3)
    canvas = img.astype(np.float32)
    shape = img.shape[:2]
    w, h = face.width, face.height
    s = w / 100.0  # drawing unit: 1/100 of the head width
    _blend(canvas, _soft_ellipse(shape, cx, cy - 0.06 * h, 0.56 * w, 0.52 * h, 2 * s), HAIR)
    _blend(canvas, _soft_ellipse(shape, cx, cy + 0.62 * h, 0.2 * w, 0.3 * h, s), SKIN * 0.62)
    head = _soft_ellipse(shape, cx, cy, w / 2, h / 2, s)
    _blend(canvas, head, SKIN)
    # light from the front: bright centre, the sides of the head turning away
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    r2 = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2
    _blend(canvas, head * np.clip(r2, 0, 1) ** 1.5, SKIN * 0.55, 0.8)
    _blend(canvas, _soft_ellipse(shape, cx, cy - 0.43 * h, 0.5 * w, 0.16 * h, 2 * s), HAIR)
    ey = cy - 0.10 * h
    for side in (-1, 1):
        ex = cx + side * 0.21 * w
        _blend(canvas, _soft_ellipse(shape, ex, ey - 0.01 * h, 13 * s, 8 * s, 3 * s),
               SKIN * 0.55, 0.9)  # eye socket shadow
        _blend(canvas, _soft_ellipse(shape, ex, ey, 9 * s, 3.6 * s, 0.6 * s), (235, 228, 222))
        _blend(canvas, _soft_ellipse(shape, ex, ey, 3.6 * s, 3.6 * s, 0.5 * s), (70, 50, 40))
        _blend(canvas, _soft_ellipse(shape, ex, ey, 1.6 * s, 1.6 * s, 0.4 * s), (15, 10, 10))
        _blend(canvas, _soft_ellipse(shape, ex, ey - 0.085 * h, 11 * s, 2.2 * s, 0.8 * s),
               (60, 40, 30))  # brow
        _blend(canvas, _soft_ellipse(shape, cx + side * 5 * s, cy + 0.07 * h, 2.5 * s, 11 * s,
                                     2 * s), SKIN * 0.7, 0.8)  # side of the nose
        _blend(canvas, _soft_ellipse(shape, cx + side * 4 * s, cy + 0.15 * h, 2.4 * s, 1.6 * s,
                                     0.6 * s), (90, 50, 45))  # nostril
    _blend(canvas, _soft_ellipse(shape, cx, cy + 0.04 * h, 3 * s, 12 * s, 2 * s),
           SKIN * 1.12, 0.7)  # lit bridge of the nose
    my = cy + 0.25 * h
    _blend(canvas, _soft_ellipse(shape, cx, my - 2.2 * s, 14 * s, 3.0 * s, s), (170, 80, 80))
    _blend(canvas, _soft_ellipse(shape, cx, my + 2.6 * s, 13 * s, 3.6 * s, s), (185, 90, 90))
    _blend(canvas, _soft_ellipse(shape, cx, my, 14 * s, 0.9 * s, 0.5 * s), (80, 30, 35))
    _blend(canvas, _soft_ellipse(shape, cx, cy + 0.42 * h, 20 * s, 6 * s, 3 * s),
           SKIN * 0.75, 0.6)  # under the chin
    img[:] = canvas.round().clip(0, 255).astype(np.uint8)
    return face


# 3. Whole pictures ------------------------------------------------------------------------------


def textured_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An indoor-looking background: a wall gradient with blurred blobs and fine noise."""
    rng = np.random.default_rng(seed)
    grad = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = np.array([180, 170, 150], np.float32) * (1 - grad) + np.array([120, 110, 100]) * grad
    img = np.broadcast_to(img, (height, width, 3)).copy()
    for _ in range(12):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.25) * min(width, height)
        _blend(img, _soft_ellipse((height, width), x, y, r, r * rng.uniform(0.5, 1.5), r / 3),
               rng.uniform(60, 230, 3), 0.5)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return img.round().clip(0, 255).astype(np.uint8)


def portrait_photo(width: int, height: int, cx: float, cy: float, face_width: float,
                   seed: int = 0) -> tuple[np.ndarray, Face]:
    """A synthetic "photo": a face (centre and width as fractions of the picture's width and
    height) with a body below it, on a textured background."""
    img = textured_background(width, height, seed)
    fx, fy, fw = cx * width, cy * height, face_width * width
    canvas = img.astype(np.float32)
    _blend(canvas, _soft_ellipse(img.shape[:2], fx, fy + 1.45 * fw, 0.95 * fw, 0.8 * fw, 3),
           (90, 100, 140))  # shoulders
    img[:] = canvas.round().clip(0, 255).astype(np.uint8)
    face = draw_face(img, fx, fy, fw)
    return img, face


def landscape(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A picture with no face in it: sky, hills and grass texture."""
    rng = np.random.default_rng(seed)
    xs = np.arange(width, dtype=np.float32)
    sky = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = np.array([110, 160, 225], np.float32) * (1 - sky) + np.array([200, 220, 240]) * sky
    img = np.broadcast_to(img, (height, width, 3)).copy()
    yy = np.arange(height, dtype=np.float32)[:, None]
    for i, color in enumerate(((90, 120, 90), (60, 110, 50), (70, 130, 40))):
        ridge = height * (0.45 + 0.15 * i) + height * 0.08 * np.sin(
            xs / width * rng.uniform(4, 9) + rng.uniform(0, 6))
        hill = np.clip(yy - ridge[None, :], 0, 2) / 2
        _blend(img, hill, color)
    grass = rng.normal(0, 14, (height, width, 1)).astype(np.float32)
    img += grass * (yy[:, :, None] > height * 0.6)
    return img.round().clip(0, 255).astype(np.uint8)
