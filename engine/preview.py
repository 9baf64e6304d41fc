"""The preview engine: the embedded default when no checkpoint is configured. CPU, no weights.

It animates the avatar picture from the loudness of exactly the audio of each frame (frame n <-
samples [640 n, 640 n + 640)), behind the same `Engine` protocol and block clock as the real
engine (12 frames per 0.48 s block):

- a picture with a face (found once per session by `engine.face_detect`): the jaw of that face
  opens with the loudness, the eyes blink and the head sways slightly (`engine.face_animate`);
- a picture in which no face is found: shown still, marked "NO FACE FOUND", and said so in the
  session's info;
- no picture: a drawn face whose mouth is a dark ellipse at a fixed place (`mouth_box`), plus an
  idle blink; the end-to-end and A/V-sync tests measure that mouth.

Every frame carries a "PREVIEW" mark. It is fast enough for several real-time sessions on one
core (`avatar preview-bench` prints the figures).

Like the real engine it changes tier at a block boundary (`set_tier`: frames of the new size from
the next block on) and it can be made slow on purpose ([engine] preview_speed S > 0) to test and
demonstrate the latency governor: a block then takes `PreviewCost.seconds` of wall time on the
engine thread (drawing, then sleeping the rest), 0.48 / S s at max_size and the configured steps
and proportionally less at smaller areas and fewer steps, like the real engine's cost; a new
size costs one more such block (the real engine re-makes its sink). With [engine] preview_marks
it stamps audio onsets and frame numbers into the picture (`engine.preview_marks`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.api import (
    BLOCK_SECONDS,
    FRAMES_PER_BLOCK,
    SAMPLES_PER_FRAME,
    AudioChunk,
    BlockCost,
    BlockTimings,
    FrameBlock,
    SessionParams,
)
from engine.audio_buffer import AudioBuffer
from engine.config import EngineConfig
from engine.errors import InputError
from engine.face_animate import MOUTH_INTERIOR, FaceRig
from engine.face_detect import FaceDetector
from engine.preview_marks import OnsetDetector, draw_marks
from engine.sizing import generation_size, parse_area

# 1. Geometry shared with tests ------------------------------------------------------------------

MOUTH_CENTER = (0.5, 0.68)  # (x, y) as fractions of the frame
MOUTH_WIDTH = 0.14  # fraction of the frame width
MOUTH_MAX_HEIGHT = 0.10  # fraction of the frame height when fully open
MOUTH_COLOR = MOUTH_INTERIOR.astype(np.uint8)
SILENCE_DB, LOUD_DB = -50.0, -12.0  # loudness mapped to closed .. fully open


def mouth_opening(samples: np.ndarray) -> float:
    """Loudness of one frame's audio -> mouth opening in [0, 1] (RMS in dBFS, linear map)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    db = 20.0 * np.log10(rms + 1e-9)
    return float(np.clip((db - SILENCE_DB) / (LOUD_DB - SILENCE_DB), 0.0, 1.0))


def mouth_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the region the mouth can occupy."""
    cx, cy = MOUTH_CENTER[0] * width, MOUTH_CENTER[1] * height
    half_w = max(4.0, MOUTH_WIDTH * width / 2)
    half_h = max(3.0, MOUTH_MAX_HEIGHT * height / 2)
    return (int(cx - half_w), int(cy - half_h), int(np.ceil(cx + half_w)),
            int(np.ceil(cy + half_h)))


# 2. Drawing -------------------------------------------------------------------------------------


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + 0.5 - cx) / max(rx, 1e-6)) ** 2 + ((yy + 0.5 - cy) / max(ry, 1e-6)) ** 2 <= 1.0


def draw_default_face(width: int, height: int, eyes_closed: bool = False) -> np.ndarray:
    """A plain cartoon face (no mouth: the mouth is drawn per frame)."""
    img = np.zeros((height, width, 3), np.float32)
    grad = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img[:] = np.array([58, 78, 110]) * (1 - grad) + np.array([28, 36, 52]) * grad
    cx = width / 2
    s = min(width, height)
    img[_ellipse(height, width, cx, height * 0.95, s * 0.42, s * 0.25)] = (70, 90, 140)  # shoulders
    img[_ellipse(height, width, cx, height * 0.52, s * 0.30, s * 0.38)] = (226, 186, 152)  # head
    hair = _ellipse(height, width, cx, height * 0.30, s * 0.32, s * 0.2)
    hair &= ~_ellipse(height, width, cx, height * 0.44, s * 0.27, s * 0.16)
    img[hair] = (60, 40, 30)
    for side in (-1, 1):
        ex = cx + side * s * 0.11
        if eyes_closed:
            img[_ellipse(height, width, ex, height * 0.47, s * 0.055, s * 0.006)] = (90, 60, 50)
        else:
            img[_ellipse(height, width, ex, height * 0.47, s * 0.055, s * 0.035)] = (250, 250, 250)
            img[_ellipse(height, width, ex, height * 0.47, s * 0.022, s * 0.022)] = (50, 70, 90)
        img[_ellipse(height, width, ex, height * 0.40, s * 0.06, s * 0.01)] = (70, 50, 40)
    nose = _ellipse(height, width, cx, height * 0.57, s * 0.02, s * 0.045)
    img[nose] = img[nose] * 0.85
    return img.clip(0, 255).astype(np.uint8)


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale uint8 [h, w, 3] to cover width x height (box prefilter + bilinear), centre-crop."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    factor = int(1 / scale) if scale < 0.5 else 1
    img = image[: h - h % factor, : w - w % factor].astype(np.float32)
    if factor > 1:  # average-pool first so strong downscaling does not alias
        img = img.reshape(img.shape[0] // factor, factor, img.shape[1] // factor, factor, 3)
        img = img.mean(axis=(1, 3))
    h, w = img.shape[:2]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    ys = np.clip((np.arange(rh) + 0.5) / scale - 0.5, 0, h - 1)
    xs = np.clip((np.arange(rw) + 0.5) / scale - 0.5, 0, w - 1)
    y0, x0 = ys.astype(int), xs.astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    out = (img[y0][:, x0] * (1 - fy) * (1 - fx) + img[y0][:, x1] * (1 - fy) * fx
           + img[y1][:, x0] * fy * (1 - fx) + img[y1][:, x1] * fy * fx)
    top, left = (rh - height) // 2, (rw - width) // 2
    return out[top:top + height, left:left + width].round().clip(0, 255).astype(np.uint8)


_GLYPHS = {  # 5x7 bitmap font, enough for the marks
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "V": ["10001", "10001", "10001", "10001", "10001", "01010", "00100"],
    "I": ["11111", "00100", "00100", "00100", "00100", "00100", "11111"],
    "W": ["10001", "10001", "10001", "10101", "10101", "11011", "10001"],
    "N": ["10001", "11001", "10101", "10011", "10001", "10001", "10001"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
    "F": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "C": ["01110", "10001", "10000", "10000", "10000", "10001", "01110"],
    "U": ["10001", "10001", "10001", "10001", "10001", "10001", "01110"],
    "D": ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
    " ": ["00000"] * 7,
}
NO_FACE_MARK = "NO FACE FOUND"


def draw_label(img: np.ndarray, *lines: str) -> tuple[int, int]:
    """Stamp `lines` (default "PREVIEW") in the top-left corner, white on a dark box, in place.
    Returns the box's (width, height); (0, 0) when the picture is too small for it."""
    lines = lines or ("PREVIEW",)
    scale = max(1, img.shape[0] // 160)
    pad, cw, lh = 2 * scale, 6 * scale, 9 * scale
    box_w = pad * 2 + cw * max(len(t) for t in lines) - scale
    box_h = pad * 2 + lh * len(lines) - 2 * scale
    if box_w >= img.shape[1] or box_h >= img.shape[0]:
        return 0, 0
    img[:box_h, :box_w] = (img[:box_h, :box_w] * 0.3).astype(np.uint8)
    for row, text in enumerate(lines):
        y = pad + row * lh
        for i, ch in enumerate(text):
            bits = np.array([[c == "1" for c in r] for r in _GLYPHS[ch]])
            glyph = np.kron(bits, np.ones((scale, scale), bool))
            x = pad + i * cw
            img[y:y + glyph.shape[0], x:x + glyph.shape[1]][glyph] = 255
    return box_w, box_h


# 3. Engine and session --------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewCost:
    """The slow preview's cost model: `top_s` seconds a block at `top_area` pixels and
    `top_steps` steps, proportional to area x steps below (the real engine's DiT steps and VAE
    decode both scale about linearly with the area over the ladder's range)."""

    top_s: float
    top_area: int
    top_steps: int

    def seconds(self, area: int, steps: int) -> float:
        return self.top_s * area / self.top_area * steps / self.top_steps


class DrawnFace:
    """The default avatar's animation: a dark ellipse for a mouth at `mouth_box`, opening with
    the loudness, and a closed-eyes picture every 4 s. Frame n is drawn onto a copy of `base`."""

    def __init__(self, width: int, height: int):
        self.base = draw_default_face(width, height)
        self.blink = draw_default_face(width, height, eyes_closed=True)
        self.box = mouth_box(width, height)
        x0, y0, x1, y1 = self.box
        cx, cy = MOUTH_CENTER[0] * width, MOUTH_CENTER[1] * height
        yy, xx = np.mgrid[y0:y1, x0:x1]
        self._dx = (xx + 0.5 - cx) / max(4.0, MOUTH_WIDTH * width / 2)
        self._dy = yy + 0.5 - cy
        self._half_h = max(3.0, MOUTH_MAX_HEIGHT * height / 2)
        s = min(width, height)  # the head ellipse of `draw_default_face`, as (x, y, w, h)
        self.head = (round(width / 2 - 0.30 * s), round(height * 0.52 - 0.38 * s),
                     round(0.60 * s), round(0.76 * s))

    def render(self, frame: np.ndarray, n: int, opening: float) -> None:
        if n % 100 in (50, 51):
            frame[:] = self.blink
        x0, y0, x1, y1 = self.box
        ry = max(0.6, opening * self._half_h)
        mask = self._dx**2 + (self._dy / ry) ** 2 <= 1.0
        frame[y0:y1, x0:x1][mask] = MOUTH_COLOR


class PreviewSession:
    """An `engine.api.EngineSession` that draws frames from loudness.

    `animator` is the face rig of a picture's face, the drawn face, or None (a picture without
    a face: shown still). `info` says which, with the face's box.
    """

    def __init__(self, params: SessionParams, default_avatar: np.ndarray | None,
                 detector: FaceDetector | None = None, cost: PreviewCost | None = None,
                 steps: int = 4, marks: bool = False):
        self.image = params.image if params.image is not None else default_avatar
        self.detector = detector
        self.cost = cost
        self.steps = params.steps or steps
        self.onsets = OnsetDetector() if marks else None
        self._draw_at(params.size)
        self.audio = AudioBuffer()
        self.block = 0
        self._setup_s = 0.0  # a tier change's set-up, paid by the next block

    def _draw_at(self, size: str) -> None:
        self.budget = size
        image = self.image
        # the same size rule as the real engine; the drawn face is 16:9 and fills the budget
        h_img, w_img = image.shape[:2] if image is not None else (9 * 1024, 16 * 1024)
        self.height, self.width = generation_size(h_img, w_img, parse_area(size))
        self.animator: FaceRig | DrawnFace | None = None
        marks: tuple[str, ...] = ("PREVIEW",)
        if image is None:
            drawn = DrawnFace(self.width, self.height)
            self.animator, self.base = drawn, drawn.base.copy()
            self.info: dict[str, object] = {
                "source": "drawn", "animation": ["mouth", "blinks"],
                "face": {"found": True, "view": "frontal", "detector": "none (drawn)",
                         "box": list(drawn.head)}}
        else:
            still = resize_cover(np.ascontiguousarray(image[:, :, :3]), self.width, self.height)
            face = (self.detector or FaceDetector()).find(still)
            self.base = still.copy()
            if face is None:
                marks = ("PREVIEW", NO_FACE_MARK)
                self.info = {"source": "image", "face": {"found": False}, "animation": [],
                             "note": "no face was found in the avatar picture, so the preview "
                                     "shows it still (marked NO FACE FOUND); use a picture with "
                                     "a clear face at least 24 pixels high at the session size "
                                     f"of {self.width}x{self.height}"}
            else:
                self.animator = FaceRig(still, face)
                self.info = {"source": "image", "face": face.info(),
                             "animation": ["jaw", "blinks", "head sway"]}
        self.label = draw_label(self.base, *marks)  # (w, h) of the mark, kept on top

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def push_audio(self, chunk: AudioChunk) -> None:
        self.audio.write(chunk.samples, chunk.start)

    def ready(self) -> bool:
        return self.audio.end >= (self.block + 1) * FRAMES_PER_BLOCK * SAMPLES_PER_FRAME

    def seek(self, block: int) -> None:
        if block != self.block and self.onsets is not None:
            self.onsets.reset()
        self.block = block

    def set_tier(self, size: str | None = None, steps: int | None = None) -> None:
        """Frames of a new size from the next block on (which pays one block of set-up when
        the preview is slow); steps only change the cost."""
        if steps is not None:
            if not 1 <= steps <= 50:
                raise InputError(f"steps={steps}: accepted 1..50")
            self.steps = steps
        if size is not None and parse_area(size) != parse_area(self.budget):
            self._draw_at(size)
            self._setup_s = self.block_seconds()

    def block_seconds(self) -> float:
        """Engine time a block takes now (0: as fast as it draws)."""
        if self.cost is None:
            return 0.0
        return self.cost.seconds(self.width * self.height, self.steps)

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        started = time.perf_counter()
        first = self.block * FRAMES_PER_BLOCK
        end = (first + FRAMES_PER_BLOCK) * SAMPLES_PER_FRAME
        silent = self.audio.pad_to(end) if pad_silence else 0
        if self.audio.end < end:
            raise RuntimeError(f"audio for frames {first}..{first + 11} has not arrived")
        audio = self.audio.read(first * SAMPLES_PER_FRAME, end)
        frames = np.repeat(self.base[None], FRAMES_PER_BLOCK, axis=0)
        for i in range(FRAMES_PER_BLOCK):
            samples = audio[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME]
            self.draw_frame(frames[i], first + i, mouth_opening(samples))
            if self.onsets is not None:
                draw_marks(frames[i], first + i, self.onsets.frame(samples))
        self.audio.forget_before(end)
        self.block += 1
        setup, self._setup_s = self._setup_s, 0.0
        wait = started + setup + self.block_seconds() - time.perf_counter()
        if wait > 0:  # the slow preview: the engine thread is busy for the modelled time
            time.sleep(wait)
        total = time.perf_counter() - started
        return FrameBlock(self.block - 1, first, frames,
                          BlockTimings(denoise=total - setup, total=total, busy=total - setup,
                                       setup=setup), silent, tier=(self.budget, self.steps))

    def draw_frame(self, frame: np.ndarray, n: int, opening: float) -> None:
        """Animate frame number `n`, a copy of `base`, for a mouth `opening` in [0, 1]."""
        if self.animator is not None:
            self.animator.render(frame, n, opening)
            w, h = self.label
            frame[:h, :w] = self.base[:h, :w]  # the mark stays on top of a swaying head

    def close(self) -> None:
        pass


class PreviewEngine:
    """`engine.api.Engine` with no model. `default_avatar` replaces the drawn face if given."""

    name = "preview"
    description = ("preview engine (CPU, no model: the face in the picture opens its mouth with "
                   "the loudness)")
    lookahead_s = 0.0  # a frame needs only its own 40 ms of audio

    def __init__(self, config: EngineConfig | None = None,
                 default_avatar: np.ndarray | None = None):
        self.config = config or EngineConfig()
        self.default_avatar = default_avatar
        self.max_sessions = self.config.max_sessions or 8
        self.max_size = self.config.max_size
        speed = self.config.preview_speed
        self.cost = PreviewCost(BLOCK_SECONDS / speed, parse_area(self.max_size),
                                self.config.sampling.steps) if speed > 0 else None
        if speed > 0:
            self.description += (f"; made {1 / speed:g}x slower than real time at "
                                 f"{self.max_size} on purpose ([engine] preview_speed)")
        self._detector: FaceDetector | None = None
        self._lock = threading.Lock()
        self._block_cost: BlockCost | None = None

    @property
    def detector(self) -> FaceDetector:
        """The face detector, loaded at the first session with a picture."""
        with self._lock:
            if self._detector is None:
                self._detector = FaceDetector()
            return self._detector

    def open_session(self, params: SessionParams) -> PreviewSession:
        pictured = params.image is not None or self.default_avatar is not None
        return PreviewSession(params, self.default_avatar, self.detector if pictured else None,
                              self.cost, self.config.sampling.steps, self.config.preview_marks)

    def block_cost(self) -> BlockCost:
        """A block's cost at max_size: the cost model's when slow, else one block timed (the
        first time it is asked: a few milliseconds of drawing)."""
        steps = self.config.sampling.steps
        if self.cost is not None:
            return BlockCost(self.max_size, steps, self.cost.top_s, "cost model")
        with self._lock:
            if self._block_cost is None:
                session = PreviewSession(SessionParams(size=self.max_size), None, steps=steps)
                session.push_audio(AudioChunk(np.zeros(FRAMES_PER_BLOCK * SAMPLES_PER_FRAME,
                                                       np.float32), 0))
                block = session.next_block()
                self._block_cost = BlockCost(self.max_size, steps, block.timings.total,
                                             "warm-up")
            return self._block_cost

    def close(self) -> None:
        pass
