"""`avatar render`: a reference image and an audio file in, an H.264 + AAC MP4 out.

The file is fed to the same streaming engine session the server uses, in 0.1 s chunks, exactly as
live audio would arrive; blocks are encoded as they come (with a pipelined engine, several in
flight, as the server's runtime keeps them). Video frame n has PTS n/25 s and the
audio track starts at 0, so they are in sync by construction; the video is trimmed to the audio's
duration (to the nearest frame).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TextIO

import av
import numpy as np

from engine.api import (
    DEFAULT_PROMPT,
    FPS,
    FRAMES_PER_BLOCK,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioChunk,
    Engine,
    FrameBlock,
    PendingBlock,
    PipelinedSession,
    SessionParams,
    session_info,
)
from stream.media.decode import MediaError, read_audio, read_image
from stream.server import add_layout_argument

log = logging.getLogger(__name__)

CHUNK_SAMPLES = SAMPLE_RATE // 10  # feed 0.1 s at a time, like a live source
AAC_RATE = 48000


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    width: int
    height: int
    audio_seconds: float
    wall_seconds: float


class _Muxer:
    """H.264 (yuv420p, 25 fps) + AAC (48 kHz mono) into an MP4, PTS-stamped."""

    def __init__(self, path: Path, width: int, height: int, crf: int = 18):
        self.container = av.open(str(path), "w", format="mp4")
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        self.video.time_base = Fraction(1, FPS)
        self.video.options = {"preset": "veryfast", "crf": str(crf)}
        self.audio = self.container.add_stream("aac", rate=AAC_RATE, layout="mono")
        self.audio.time_base = Fraction(1, AAC_RATE)
        self.frames = 0

    def add_frame(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = self.frames
        frame.time_base = Fraction(1, FPS)
        self.container.mux(self.video.encode(frame))
        self.frames += 1

    def add_audio(self, samples: np.ndarray) -> None:
        step = 1024
        for start in range(0, len(samples), step):
            part = samples[start:start + step]
            frame = av.AudioFrame.from_ndarray(part[None].astype(np.float32), format="flt",
                                               layout="mono")
            frame.sample_rate = AAC_RATE
            frame.pts = start
            frame.time_base = Fraction(1, AAC_RATE)
            self.container.mux(self.audio.encode(frame))

    def close(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.mux(self.audio.encode(None))
        self.container.close()


def render(engine: Engine, image: np.ndarray, audio: np.ndarray, out: Path,
           params: SessionParams, aac_audio: np.ndarray | None = None,
           report: TextIO | None = None, quiet: bool = False) -> RenderResult:
    """Render `audio` (16 kHz mono float32) with the avatar `image` into `out`.

    Progress goes to `report` (default stderr) unless `quiet`.
    """
    report = None if quiet else (report or sys.stderr)
    total = int(round(len(audio) / SAMPLES_PER_FRAME))
    if total < 1:
        raise MediaError(f"the audio is {len(audio) / SAMPLE_RATE:.3f} s long; at least one "
                         f"video frame ({1 / FPS:.2f} s) is needed")
    started = time.monotonic()
    session = engine.open_session(SessionParams(image=image, prompt=params.prompt,
                                                size=params.size, seed=params.seed,
                                                steps=params.steps))
    width, height = session.size
    if report is not None:
        _describe_avatar(session_info(session), report)
    out.parent.mkdir(parents=True, exist_ok=True)
    mux = _Muxer(out, width, height)
    blocks_total = -(-total // 12)
    done = queued = 0  # frames written; frames of the blocks submitted
    tty = report is not None and hasattr(report, "isatty") and report.isatty()
    last_tenth = -1
    # a pipelined engine gets as many blocks in flight as its runtime would give it (a pipeline
    # of ranks: one per stage), so the render goes at the pipeline's pace
    depth = getattr(engine, "max_in_flight", 2) if isinstance(session, PipelinedSession) else 1
    pending: deque[PendingBlock | FrameBlock] = deque()

    def emit(pad: bool) -> None:
        nonlocal queued
        if isinstance(session, PipelinedSession):
            block: PendingBlock | FrameBlock = session.submit_block(pad_silence=pad)
        else:
            block = session.next_block(pad_silence=pad)
        pending.append(block)
        queued += FRAMES_PER_BLOCK
        while len(pending) >= depth:
            write(pending.popleft())

    def write(item: PendingBlock | FrameBlock) -> None:
        nonlocal done, last_tenth
        block = item if isinstance(item, FrameBlock) else item.result()
        for rgb in block.frames[: max(0, total - block.first_frame)]:
            mux.add_frame(rgb)
        done = min(total, block.first_frame + len(block.frames))
        tenth = 10 * done // total
        if report is not None and (tty or tenth != last_tenth):
            last_tenth = tenth
            speed = (done / FPS) / max(time.monotonic() - started, 1e-9)
            start, end = ("\r", "") if tty else ("", "\n")
            report.write(f"{start}rendering: block {block.index + 1}/{blocks_total}, "
                         f"{done}/{total} frames, {speed:.2f}x real time{end}")
            report.flush()

    try:
        for start in range(0, len(audio), CHUNK_SAMPLES):
            session.push_audio(AudioChunk(audio[start:start + CHUNK_SAMPLES], start))
            while queued < total and session.ready():
                emit(pad=False)
        while queued < total:  # the tail: the last block's look-ahead lies past the file's end
            emit(pad=True)
        while pending:
            write(pending.popleft())
        mux.add_audio(aac_audio if aac_audio is not None else _resample(audio, AAC_RATE))
    finally:
        mux.close()
        session.close()
    if report is not None and tty:
        report.write("\n")
    return RenderResult(out, mux.frames, width, height, len(audio) / SAMPLE_RATE,
                        time.monotonic() - started)


def _describe_avatar(info: dict, report: TextIO) -> None:
    """One line on what the engine found in the picture (the preview: the face), if it says."""
    face = info.get("face")
    if isinstance(face, dict) and face.get("found") and "box" in face:
        x, y, w, h = face["box"]
        report.write(f"avatar: animating the face found at x={x} y={y} ({w}x{h} px, "
                     f"{face['view']})\n")
    if info.get("note"):
        report.write(f"avatar: {info['note']}\n")


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    t_in = np.arange(len(audio)) / SAMPLE_RATE
    t_out = np.arange(int(len(audio) * rate / SAMPLE_RATE)) / rate
    return np.interp(t_out, t_in, audio).astype(np.float32)


# CLI ------------------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render an image + audio file to an MP4 (offline)")
    p.add_argument("--ckpt", help="Wan2.2-S2V-14B folder (default: [engine] checkpoint)")
    p.add_argument("--config", help="config.toml with an [engine] section (optional)")
    p.add_argument("--image", required=True, help="reference image (JPEG, PNG, WebP)")
    p.add_argument("--audio", required=True, help="speech audio (WAV, MP3, ...)")
    p.add_argument("--out", required=True, help="output .mp4")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    p.add_argument("--size", default="704*384",
                   help="generation pixel-area budget W*H; aspect follows the image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: config)")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: the real engine at real shapes with random weights "
                        "(the video is noise; for measuring)")
    add_layout_argument(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from engine.api import ProgressPrinter, create_engine
    from engine.config import EngineConfig
    from engine.errors import EngineError
    from stream.config import load_toml
    from stream.server import with_layout, with_random_weights

    raw = load_toml(args.config).get("engine", {}) if args.config else {}
    try:
        config = EngineConfig.parse({**raw, "checkpoint": args.ckpt} if args.ckpt else raw)
        if args.random_weights:
            config = with_random_weights(config)
        config = with_layout(config, args.layout)
        # offline: no admission to measure for (a compile warm-up still runs)
        config = dataclasses.replace(config, calibrate=False)
        image = read_image(args.image)
        audio = read_audio(args.audio)
        aac = read_audio(args.audio, rate=AAC_RATE)
        engine = create_engine(config, progress=ProgressPrinter())
        try:
            result = render(engine, image, audio, Path(args.out),
                            SessionParams(prompt=args.prompt, size=args.size, seed=args.seed,
                                          steps=args.steps), aac_audio=aac)
        finally:
            engine.close()  # (a pipeline's ranks end with it)
    except (MediaError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: {result.frames} frames {result.width}x{result.height} at {FPS} "
          f"fps, {result.audio_seconds:.2f} s of audio, in {result.wall_seconds:.1f} s")
    return 0
