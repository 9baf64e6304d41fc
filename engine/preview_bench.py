"""`avatar preview-bench`: how fast the preview engine animates a photo, on one CPU core.

It runs whole sessions block by block, as the server does, on speech-like audio: the animated
photo (a detected face: jaw, blinks, sway), and as baselines measured in the same run the drawn
default face and a still picture with no face (frames copied, nothing animated). It prints the
time per frame and the speed as a multiple of real time (25 fps). OpenCV is limited to
`--threads` threads (default 1, the "one core" figure); numpy's element-wise work is
single-threaded anyway.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from engine.api import FPS, FRAMES_PER_BLOCK, SAMPLE_RATE, AudioChunk, SessionParams
from engine.preview import PreviewEngine
from engine.synthetic_face import landscape, portrait_photo


@dataclass
class CaseResult:
    case: str
    frame_size: str
    face_box: list[int] | None
    open_ms: float  # session set-up: resize, face detection, warp fields
    frame_ms_median: float
    frame_ms_p95: float
    realtime_factor: float  # media seconds per wall second (blocks only)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced syllables at about 4 Hz with pauses: loudness swinging from silence to loud."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    syllables = rng.uniform(0.0, 1.0, int(seconds * 4) + 1) * (rng.random(int(seconds * 4) + 1)
                                                               > 0.2)
    envelope = np.repeat(syllables, SAMPLE_RATE // 4)[:len(t)] * np.sin(np.pi * 4 * t) ** 2
    voice = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 520 * t)
    return (0.4 * envelope * voice).astype(np.float32)


def run_case(engine: PreviewEngine, case: str, image: np.ndarray | None, size: str,
             audio: np.ndarray) -> CaseResult:
    started = time.perf_counter()
    session = engine.open_session(SessionParams(image=image, size=size))
    open_ms = (time.perf_counter() - started) * 1000
    session.push_audio(AudioChunk(audio, 0))
    per_block = []
    while session.ready():
        t0 = time.perf_counter()
        session.next_block()
        per_block.append(time.perf_counter() - t0)
    face = session.info["face"]
    frame_ms = sorted(b / FRAMES_PER_BLOCK * 1000 for b in per_block)
    return CaseResult(
        case=case, frame_size=f"{session.width}x{session.height}",
        face_box=list(face["box"]) if isinstance(face, dict) and "box" in face else None,
        open_ms=round(open_ms, 1), frame_ms_median=round(statistics.median(frame_ms), 3),
        frame_ms_p95=round(frame_ms[int(0.95 * (len(frame_ms) - 1))], 3),
        realtime_factor=round(len(per_block) * FRAMES_PER_BLOCK / FPS / sum(per_block), 1))


def cases(image: str | None) -> list[tuple[str, np.ndarray | None]]:
    """(name, picture) to run: `image`, or two synthetic photos (a head-and-shoulders shot and a
    close-up, the preview's costliest case), then the baselines."""
    photos: list[tuple[str, np.ndarray | None]]
    if image:
        bgr = cv2.imread(image, cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"error: {image!r} is not a picture OpenCV can read (JPEG, PNG, "
                             "WebP, ...)")
        photos = [("photo", np.ascontiguousarray(bgr[:, :, ::-1]))]
    else:
        photos = [("photo", portrait_photo(1280, 720, 0.38, 0.36, 0.16)[0]),
                  ("close-up photo", portrait_photo(1280, 720, 0.5, 0.45, 0.45)[0])]
    return [*photos, ("drawn face", None), ("no face (still)", landscape(1280, 720))]


def command(args: argparse.Namespace) -> int:
    cv2.setNumThreads(args.threads)
    engine = PreviewEngine()
    audio = speech_like(args.seconds)
    results = [run_case(engine, name, image, args.size, audio) for name, image in cases(args.image)]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    print(f"preview engine, {args.seconds:.0f} s of speech-like audio, OpenCV threads: "
          f"{cv2.getNumThreads()}")
    base = next(r.frame_ms_median for r in results if r.case == "drawn face")
    for r in results:
        ratio = r.frame_ms_median / base if base > 0 else float("nan")
        face = f"  face {r.face_box}" if r.face_box and "photo" in r.case else ""
        print(f"  {r.case:16s} {r.frame_size:>8s}  set-up {r.open_ms:7.1f} ms  frame "
              f"{r.frame_ms_median:6.2f} ms (p95 {r.frame_ms_p95:6.2f})  "
              f"{r.realtime_factor:6.1f}x real time  {ratio:5.1f}x the drawn face's frame "
              f"time{face}")
    return 0
