"""Animate a detected face in a still picture: lips that part with the audio, blinks, a slight
head sway. CPU (OpenCV + numpy), deterministic, about a millisecond a frame.

Every frame is one backward warp of the head region of the still: for each output pixel, where in
the still to read it from. The displacement is a sum of fields precomputed once per avatar:

- sway: a smooth weight, 1 over the head and 0 at the region's border (so nothing tears), times
  a small translation and a rotation about the chin that follow slow incommensurate sines;
- jaw: rows move away from the lip line, the lower lip and chin down by three quarters of the
  opening, the upper lip up by a quarter. Near the line a pixel is read from the line itself
  (min(distance, shift)), so the gap between the lips is filled by stretching the line. The
  shift is a lens across the mouth (the corners stay put) and tapers to nothing past the chin
  (the neck stays) and below the nose;
- blink: around each eye, rows are read from beyond the lids, so the lids close over it.

Then the gap between the lips is shaded as the mouth's dark interior and, during a blink, a lash
line is drawn where the lids meet. Idle motion is a pure function of the frame number and the
opening of the frame's loudness, so the same audio gives the same frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from engine.face_detect import Eye, FaceLayout

MOUTH_INTERIOR = np.array([45, 8, 18], np.float32)  # RGB, the drawn face's mouth colour too
UPPER_LIP_SHARE = 0.25  # of the opening, the upper lip rises this much; the jaw drops the rest
LASH_SHADE = 0.55  # at a full blink the lash line multiplies the picture by this

# blinks: frames from the start of one blink to the next (cycled: 2.6 to 5.4 s at 25 fps), and
# the closure over the frames of one blink (about 160 ms, as people blink)
BLINK_GAPS = (87, 121, 66, 104, 135, 79)
BLINK_SHAPE = (0.55, 1.0, 1.0, 0.45)

# head sway: (amplitude, period in frames, phase) of each sine; shifts in face-box widths,
# the tilt in radians
SWAY_SHIFT = ((0.007, 103.0, 0.0), (0.003, 59.0, 1.3))
SWAY_LIFT = ((0.004, 83.0, 0.7),)
SWAY_TILT = ((0.006, 131.0, 2.1), (0.002, 47.0, 0.4))


def blink_amount(frame: int) -> float:
    """Eyelid closure in [0, 1] at frame `frame`."""
    pos = frame % sum(BLINK_GAPS)
    for gap in BLINK_GAPS:  # each gap ends with a blink (so frame 0 has open eyes)
        if pos < gap:
            closing = pos - (gap - len(BLINK_SHAPE))
            return BLINK_SHAPE[closing] if closing >= 0 else 0.0
        pos -= gap
    return 0.0


def _waves(frame: int, terms: tuple[tuple[float, float, float], ...]) -> float:
    return sum(a * math.sin(2 * math.pi * frame / period + phase) for a, period, phase in terms)


def sway(frame: int) -> tuple[float, float, float]:
    """(shift x, shift y) in face-box widths and the tilt in radians at frame `frame`."""
    return _waves(frame, SWAY_SHIFT), _waves(frame, SWAY_LIFT), _waves(frame, SWAY_TILT)


def _ramp(t: np.ndarray) -> np.ndarray:
    """0 for t <= 0, 1 for t >= 1, smooth (cosine) in between."""
    return (0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))).astype(np.float32)


@dataclass(frozen=True)
class _Part:
    """A rectangle of the head region, in the region's rows and columns."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class _EyeFields:
    part: _Part
    shift: np.ndarray  # how much farther from the eye's midline a row is read at a full blink
    lash: np.ndarray  # darkness of the lash line at a full blink, in [0, 1]


class FaceRig:
    """Warp fields for one avatar picture and its face, precomputed; `render` draws a frame."""

    def __init__(self, still: np.ndarray, face: FaceLayout):
        self.still = still
        self.face = face
        height, width = still.shape[:2]
        x, y, w, h = face.box
        # the head region: hair above, chin and beard below, ears at the sides
        self.x0, self.x1 = max(0, round(x - 0.6 * w)), min(width, round(x + 1.6 * w))
        self.y0, self.y1 = max(0, round(y - 0.7 * h)), min(height, round(face.chin + 0.5 * h))
        ys = np.arange(self.y0, self.y1, dtype=np.float32)[:, None]
        xs = np.arange(self.x0, self.x1, dtype=np.float32)[None, :]
        shape = (len(ys), xs.shape[1])
        self.grid_x = np.broadcast_to(xs, shape).copy()
        self.grid_y = np.broadcast_to(ys, shape).copy()
        self._sway_fields(xs, ys, shape)
        self._jaw_fields(xs, ys)
        self.eyes = [self._eye_fields(eye, xs, ys) for eye in face.eyes]

    # 1. precomputed fields ------------------------------------------------------------------

    def _sway_fields(self, xs: np.ndarray, ys: np.ndarray, shape: tuple[int, int]) -> None:
        x, y, w, h = self.face.box
        cx, cy = x + w / 2, y + 0.4 * h
        r = np.sqrt(((xs - cx) / (0.85 * w)) ** 2 + ((ys - cy) / (0.95 * h)) ** 2)
        border = np.minimum(np.minimum(xs - self.x0, self.x1 - 1 - xs),
                            np.minimum(ys - self.y0, self.y1 - 1 - ys))
        # 1 over head and hair, fading out around them and to 0 at the region's border
        weight = _ramp((1.25 - r) / 0.4) * _ramp(border / max(2.0, 0.15 * w))
        self.sway_weight = np.broadcast_to(weight, shape).copy()
        px, py = self.face.mouth[0], self.face.chin  # the head turns about the chin
        self.tilt_x = -(ys - py) * self.sway_weight
        self.tilt_y = (xs - px) * self.sway_weight

    def _jaw_fields(self, xs: np.ndarray, ys: np.ndarray) -> None:
        f = self.face
        mx, lip = f.mouth
        drop = f.max_jaw_drop
        half = 0.5 * f.mouth_width
        top = lip - 2.0 * UPPER_LIP_SHARE * drop - 0.12 * (f.chin - lip)  # below the nose
        end = f.chin + 0.25 * max(f.chin - lip, 2.0 * drop)  # past the chin the neck stays
        self.jaw = self._part(mx - half, top, mx + half, end)
        jy, jx = ys[self.jaw.y0:self.jaw.y1], xs[:, self.jaw.x0:self.jaw.x1]
        # the share of the opening per column: two arcs meeting at the mouth's corners
        self.jaw_lens = np.clip(1.0 - ((jx - mx) / half) ** 2, 0.0, 1.0)
        self.jaw_dy = (jy - lip).astype(np.float32)  # signed distance from the lip line
        lower_lip = lip + drop + 0.3 * (f.chin - lip)
        self.jaw_taper = np.where(jy >= lip, _ramp((end - jy) / max(1.0, end - lower_lip)),
                                  _ramp((jy - top) / max(1.0, lip - top))).astype(np.float32)
        self.jaw_share = np.where(jy >= lip, 1.0 - UPPER_LIP_SHARE, UPPER_LIP_SHARE).astype(
            np.float32)
        # rows that the mouth's interior can reach (the shading touches only these)
        gap = self._part(mx - half, lip - UPPER_LIP_SHARE * drop - 1, mx + half, lip + drop + 2)
        self.gap_rows = slice(max(gap.y0, self.jaw.y0) - self.jaw.y0,
                              min(gap.y1, self.jaw.y1) - self.jaw.y0)

    def _eye_fields(self, eye: Eye, xs: np.ndarray, ys: np.ndarray) -> _EyeFields:
        part = self._part(eye.cx - 1.3 * eye.rx, eye.cy - 3 * eye.ry, eye.cx + 1.3 * eye.rx,
                          eye.cy + 3 * eye.ry)
        dy = ys[part.y0:part.y1] - eye.cy
        ex = np.abs(xs[:, part.x0:part.x1] - eye.cx)
        across = _ramp((1.3 * eye.rx - ex) / (0.3 * eye.rx))
        # rows of the eye read from beyond its lids; the shift fades out over two more heights
        reach = np.clip(1.0 - (np.abs(dy) - eye.ry) / (2.0 * eye.ry), 0.0, 1.0)
        shift = (np.sign(dy) * 1.15 * eye.ry * reach * across).astype(np.float32)
        lash = np.exp(-(dy / (0.5 + 0.1 * eye.ry)) ** 2) * _ramp((1.05 * eye.rx - ex)
                                                                 / (0.25 * eye.rx))
        return _EyeFields(part, shift, lash.astype(np.float32))

    def _part(self, x0: float, y0: float, x1: float, y1: float) -> _Part:
        """The rectangle clipped to the head region, in region coordinates."""
        w, h = self.x1 - self.x0, self.y1 - self.y0
        cx0 = int(np.clip(math.floor(x0) - self.x0, 0, w))
        cy0 = int(np.clip(math.floor(y0) - self.y0, 0, h))
        return _Part(cy0, int(np.clip(math.ceil(y1) - self.y0, cy0, h)),
                     cx0, int(np.clip(math.ceil(x1) - self.x0, cx0, w)))

    # 2. one frame ---------------------------------------------------------------------------

    def render(self, out: np.ndarray, frame: int, opening: float) -> None:
        """Draw frame `frame` with the mouth open by `opening` in [0, 1] into `out`, a copy of
        the still (only the head region is written)."""
        shift_x, shift_y, tilt = sway(frame)
        w = self.face.box[2]
        map_x = self.grid_x + self.sway_weight * (shift_x * w) + tilt * self.tilt_x
        map_y = self.grid_y + self.sway_weight * (shift_y * w) + tilt * self.tilt_y
        drop = opening * self.face.max_jaw_drop
        if drop > 0:
            reach = drop * self.jaw_share * self.jaw_lens
            map_y[self.jaw.slices] -= (np.sign(self.jaw_dy) * np.minimum(np.abs(self.jaw_dy),
                                                                          reach) * self.jaw_taper)
        blink = blink_amount(frame)
        for eye in self.eyes if blink > 0 else ():
            map_y[eye.part.slices] += blink * eye.shift
        region = cv2.remap(self.still, map_x, map_y, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        if drop >= 0.5:
            self._shade_mouth(region, drop)
        for eye in self.eyes if blink > 0 else ():
            view = region[eye.part.slices]
            shade = 1.0 - (1.0 - LASH_SHADE) * blink * eye.lash
            view[:] = (view * shade[:, :, None]).astype(np.uint8)
        out[self.y0:self.y1, self.x0:self.x1] = region

    def _shade_mouth(self, region: np.ndarray, drop: float) -> None:
        """Shade the gap the lips opened: soft 1-pixel edges, darkest along the middle."""
        rows = self.gap_rows
        gap = drop * self.jaw_lens
        dy = self.jaw_dy[rows]
        inside = np.minimum(dy + UPPER_LIP_SHARE * gap, (1.0 - UPPER_LIP_SHARE) * gap - dy)
        alpha = (np.clip(inside, 0.0, 1.0)
                 * (0.6 + 0.3 * np.clip(inside / (0.25 * drop + 0.5), 0.0, 1.0)))[:, :, None]
        view = region[self.jaw.slices][rows]
        view[:] = (view * (1.0 - alpha) + MOUTH_INTERIOR * alpha).astype(np.uint8)
