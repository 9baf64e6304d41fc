"""The contract between `stream` and `engine`: torch-free dataclasses and the Engine protocol.

This is the only engine module the server imports. Media time is counted in samples at 16 kHz for
audio and in frames at 25 fps for video: video frame n is presented at n / 25 s, audio sample s
at s / 16000 s, so one clock serves both. A block is 12 video frames (0.48 s, 7680 samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.config import EngineConfig
from engine.progress import ProgressFn, ProgressPrinter

SAMPLE_RATE = 16000
FPS = 25
FRAMES_PER_BLOCK = 12
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
SAMPLES_PER_BLOCK = SAMPLES_PER_FRAME * FRAMES_PER_BLOCK
BLOCK_SECONDS = FRAMES_PER_BLOCK / FPS

DEFAULT_PROMPT = ("A person talking to the camera with natural facial expressions and clear lip "
                  "movements, realistic video.")


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What a session asks of the engine. `image` is uint8 [H, W, 3] RGB, or None for the
    engine's default avatar."""

    image: np.ndarray | None = None
    prompt: str = DEFAULT_PROMPT
    size: str = "704*384"  # generation pixel-area budget; the aspect comes from the image
    seed: int = 0
    steps: int | None = None  # None: the engine's configured steps
    ref_ahead: int | None = None  # pin the rolling-sink distance (tests); None: drawn per step


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """Mono float32 samples in [-1, 1] at 16 kHz starting at session sample `start`."""

    samples: np.ndarray
    start: int


@dataclass(frozen=True, slots=True)
class BlockTimings:
    """Seconds spent per stage of one block, measured by the engine."""

    features: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    total: float = 0.0


@dataclass(frozen=True, slots=True)
class FrameBlock:
    """Frames [first_frame, first_frame + n) of a session: uint8 [n, H, W, 3] RGB."""

    index: int
    first_frame: int
    frames: np.ndarray
    timings: BlockTimings = field(default_factory=BlockTimings)
    silent_samples: int = 0  # samples of missing audio generated as silence

    @property
    def fps(self) -> int:
        return FPS

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


class EngineSession(Protocol):
    """One session inside an engine. Synchronous: one thread drives it (the engine loop)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames this session produces."""
        ...

    def push_audio(self, chunk: AudioChunk) -> None:
        """Add audio; a chunk may start anywhere on the session timeline."""
        ...

    def ready(self) -> bool:
        """Is all audio the next block needs (look-ahead included) here?"""
        ...

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        """Generate the next block; with `pad_silence`, missing audio counts as silence."""
        ...

    def close(self) -> None: ...


class Engine(Protocol):
    """A loaded engine: opens sessions. `name` is "wan" or "preview"."""

    name: str
    description: str

    def open_session(self, params: SessionParams) -> EngineSession: ...

    def close(self) -> None: ...


__all__ = ["ProgressFn", "ProgressPrinter"]  # re-exported for the server and the CLI


def create_engine(config: EngineConfig, progress: ProgressFn | None = None) -> Engine:
    """The engine `config` asks for. Imports torch only when a checkpoint is configured."""
    if config.checkpoint:
        from engine.wan_engine import WanEngine

        return WanEngine.load(config, progress)
    from engine.errors import ConfigError

    raise ConfigError("engine.checkpoint is empty: set it to the Wan2.2-S2V-14B folder")
