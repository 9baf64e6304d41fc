"""Find the face in an avatar picture, once per avatar, for the preview engine. CPU, no download.

The detector is OpenCV's Haar cascades, which ship inside the `opencv-python-headless` wheel
(`cv2.data.haarcascades`; OpenCV 5 no longer bundles them, hence the `<5` pin). A frontal-face
cascade is tried first, then the profile cascade on the picture and on its mirror image (it only
knows faces turned to one side). The largest face wins. Inside the face box the features the
preview animates are then placed: the lip line (refined by the smile cascade and the darkest row
between the lips), the chin, and the eyes (refined by the eye cascade). Where a refinement finds
nothing, proportions of an average face stand in. Everything is in pixels of the searched picture.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

MIN_FACE = 24  # pixels: the cascades' own training window; smaller faces are not looked for
REMEMBERED = 64  # avatars whose face is kept (a session with a known avatar skips detection)


@dataclass(frozen=True)
class Eye:
    cx: float
    cy: float
    rx: float  # half-width of the eye opening
    ry: float  # half-height of the eye opening


@dataclass(frozen=True)
class FaceLayout:
    """One detected face and where its animated features are (pixels of the searched picture)."""

    box: tuple[int, int, int, int]  # (x, y, w, h) as the detector reports it
    view: str  # "frontal", "profile-left" or "profile-right" (the way the face is turned)
    detector: str  # the cascade that found it
    mouth: tuple[float, float]  # centre of the lip line
    mouth_width: float
    chin: float  # y of the chin
    eyes: tuple[Eye, ...]

    @property
    def max_jaw_drop(self) -> float:
        """How far the lower lip moves down at full opening (pixels)."""
        return 0.09 * self.box[3]

    def info(self) -> dict[str, object]:
        """JSON-ready summary for the session's info."""
        return {"found": True, "view": self.view, "detector": self.detector,
                "box": list(self.box), "mouth": [round(self.mouth[0]), round(self.mouth[1])]}


@dataclass(frozen=True)
class _Proportions:
    """An average face in units of the detector's box: the lip line's centre, the mouth's
    width, the chin's distance below the lip line, eyes as (x, y, half-width)."""

    mouth: tuple[float, float]
    mouth_width: float
    chin: float
    eyes: tuple[tuple[float, float, float], ...]

    def mirrored(self) -> _Proportions:
        return _Proportions((1 - self.mouth[0], self.mouth[1]), self.mouth_width, self.chin,
                            tuple((1 - x, y, r) for x, y, r in self.eyes))


# measured on frontal and three-quarter portraits against the alt2 and profile cascades; the
# profile cascade finds faces turned to the picture's left (nose towards x = 0), whose far eye
# is mostly hidden behind the nose (so only the near eye blinks)
FRONTAL = _Proportions((0.50, 0.80), 0.36, 0.27, ((0.31, 0.40, 0.07), (0.69, 0.40, 0.07)))
PROFILE_LEFT = _Proportions((0.29, 0.66), 0.18, 0.20, ((0.48, 0.43, 0.07),))


class FaceDetector:
    """The cascades, loaded once per engine; `find` is safe to call from several threads."""

    def __init__(self) -> None:
        root = cv2.data.haarcascades  # type: ignore[attr-defined]  # (missing from its stubs)
        self._cascades = {name: cv2.CascadeClassifier(root + f"haarcascade_{name}.xml")
                          for name in ("frontalface_alt2", "profileface", "smile", "eye")}
        for name, cascade in self._cascades.items():
            if cascade.empty():
                raise RuntimeError(f"OpenCV's haarcascade_{name}.xml did not load from {root}; "
                                   "reinstall opencv-python-headless (>=4.13,<5)")
        self._lock = threading.Lock()  # a CascadeClassifier is not safe to share across threads
        self._known: OrderedDict[bytes, FaceLayout | None] = OrderedDict()  # LRU, by picture

    def find(self, rgb: np.ndarray) -> FaceLayout | None:
        """The largest face in uint8 RGB `rgb` and its features, or None. Once per avatar: the
        answer for the last `REMEMBERED` pictures is kept, keyed by their pixels."""
        rgb = np.ascontiguousarray(rgb)
        key = hashlib.blake2b(str(rgb.shape).encode() + rgb.tobytes(), digest_size=16).digest()
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
            face = self._search(rgb)
            self._known[key] = face
            while len(self._known) > REMEMBERED:
                self._known.popitem(last=False)
            return face

    def _search(self, rgb: np.ndarray) -> FaceLayout | None:
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        box = self._largest("frontalface_alt2", gray)
        if box is not None:
            return self._layout(gray, box, FRONTAL, "frontal", "haarcascade_frontalface_alt2")
        left = self._largest("profileface", gray)
        mirrored = self._largest("profileface", np.ascontiguousarray(gray[:, ::-1]))
        if mirrored is not None and (left is None or mirrored[2] > left[2]):
            x, y, w, h = mirrored
            return self._layout(gray, (gray.shape[1] - x - w, y, w, h), PROFILE_LEFT.mirrored(),
                                "profile-right", "haarcascade_profileface (mirrored)")
        if left is not None:
            return self._layout(gray, left, PROFILE_LEFT, "profile-left",
                                "haarcascade_profileface")
        return None

    # 1. detection ---------------------------------------------------------------------------

    def _detect(self, name: str, gray: np.ndarray, neighbors: int, min_size: tuple[int, int],
                scale: float = 1.1) -> list[tuple[int, int, int, int]]:
        found = self._cascades[name].detectMultiScale(gray, scaleFactor=scale,
                                                      minNeighbors=neighbors, minSize=min_size)
        return [(int(x), int(y), int(w), int(h)) for x, y, w, h in found]

    def _largest(self, name: str, gray: np.ndarray) -> tuple[int, int, int, int] | None:
        found = self._detect(name, gray, 4, (MIN_FACE, MIN_FACE))
        return max(found, key=lambda b: b[2] * b[3]) if found else None

    # 2. features inside the face box --------------------------------------------------------

    def _layout(self, gray: np.ndarray, box: tuple[int, int, int, int], p: _Proportions,
                view: str, detector: str) -> FaceLayout:
        x, y, w, h = box
        mx, my = x + p.mouth[0] * w, y + p.mouth[1] * h
        mouth_w = p.mouth_width * w
        if view == "frontal":  # the smile cascade knows frontal mouths only
            mouth = self._mouth(gray, box, (mx, my))
            if mouth is not None:
                mx, my = mouth[0], mouth[1]
                mouth_w = float(np.clip(0.55 * mouth[2], 0.28 * w, 0.45 * w))
        my = _lip_line(gray, mx, my, mouth_w, h)
        eyes = self._eyes(gray, box, [Eye(x + ex * w, y + ey * h, r * w, 0.43 * r * w)
                                      for ex, ey, r in p.eyes])
        return FaceLayout(box, view, detector, (mx, my), mouth_w, my + p.chin * h, eyes)

    def _mouth(self, gray: np.ndarray, box: tuple[int, int, int, int],
               prior: tuple[float, float]) -> tuple[float, float, float] | None:
        """(x, y, width) of the smile cascade's mouth nearest `prior` where mouths are, or None."""
        x, y, w, h = box
        x0, y0 = max(0, x + w // 8), max(0, y + h // 2)
        roi = gray[y0:min(gray.shape[0], y + h * 5 // 4), x0:min(gray.shape[1], x + w * 7 // 8)]
        if min(roi.shape) < 12:
            return None
        found = [(x0 + sx + sw / 2, y0 + sy + sh / 2, float(sw)) for sx, sy, sw, sh in
                 self._detect("smile", roi, 10, (max(8, w // 5), max(4, w // 10)), 1.05)]
        found = [m for m in found
                 if abs(m[0] - (x + w / 2)) < 0.2 * w and y + 0.62 * h < m[1] < y + 1.15 * h]
        return min(found, key=lambda m: abs(m[1] - prior[1])) if found else None

    def _eyes(self, gray: np.ndarray, box: tuple[int, int, int, int],
              prior: list[Eye]) -> tuple[Eye, ...]:
        """`prior`, each eye replaced by the eye cascade's nearest find within 0.15 w of it."""
        x, y, w, h = box
        top = y + h // 6
        roi = gray[max(0, top):y + h * 3 // 5, max(0, x):x + w]
        found = [] if min(roi.shape) < 12 else [
            Eye(max(0, x) + ex + ew / 2, max(0, top) + ey + eh / 2, 0.28 * ew, 0.12 * eh)
            for ex, ey, ew, eh in self._detect("eye", roi, 4, (max(6, w // 10),) * 2, 1.05)]
        eyes = []
        for eye in prior:
            near = [e for e in found if math.hypot(e.cx - eye.cx, e.cy - eye.cy) < 0.15 * w]
            best = min(near, key=lambda e: math.hypot(e.cx - eye.cx, e.cy - eye.cy),
                       default=None)
            if best is not None:
                found.remove(best)
            eyes.append(best or eye)
        return tuple(eyes)


def _lip_line(gray: np.ndarray, mx: float, my: float, mouth_w: float, face_h: int) -> float:
    """The darkest row between the lips near `my` (the parting line), smoothed over 3 rows."""
    reach = max(2, round(0.06 * face_h))
    x0, x1 = max(0, round(mx - mouth_w * 0.3)), min(gray.shape[1], round(mx + mouth_w * 0.3))
    y0, y1 = max(0, round(my) - reach), min(gray.shape[0], round(my) + reach + 1)
    if x1 - x0 < 3 or y1 - y0 < 5:
        return my
    rows = gray[y0:y1, x0:x1].astype(np.float32).mean(axis=1)
    rows = np.convolve(rows, np.ones(3, np.float32) / 3, mode="same")[1:-1]
    return float(y0 + 1 + int(np.argmin(rows)))
