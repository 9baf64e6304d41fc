"""The contract between `stream` and `engine`: torch-free dataclasses and the Engine protocol.

This is the only engine module the server imports. Media time is counted in samples at 16 kHz for
audio and in frames at 25 fps for video: video frame n is presented at n / 25 s, audio sample s
at s / 16000 s, so one clock serves both. A block is 12 video frames (0.48 s, 7680 samples).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from engine.config import EngineConfig
from engine.errors import CapacityExhausted, ConfigError, EngineError, InputError
from engine.parallel.layout import Layout
from engine.progress import ProgressFn, ProgressPrinter
from engine.sizing import parse_area

if TYPE_CHECKING:
    from engine.runtime import EngineRuntime

log = logging.getLogger(__name__)

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
    """Seconds spent per stage of one block, measured by the engine (device time on a GPU).

    `features`: audio features and audio tokens; `denoise`: all steps (`steps`: each of them);
    `decode`: the VAE; `postprocess`: frames to uint8 and onto the host; `total`: wall time from
    the block's start to its frames on the host; `busy`: what it cost the engine's critical
    path (features + denoise, plus the decode unless that overlapped the next block); `setup`:
    what a tier change cost before this block (a new size re-makes the sink: not a cost of the
    tier itself, so the latency governor does not count it as one).
    """

    features: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    total: float = 0.0
    steps: tuple[float, ...] = ()
    postprocess: float = 0.0
    busy: float = 0.0  # seconds it held the engine's critical path (not an overlapped decode)
    setup: float = 0.0  # seconds of a tier change's set-up paid before this block (in total)


@dataclass(frozen=True, slots=True)
class FrameBlock:
    """Frames [first_frame, first_frame + n) of a session: uint8 [n, H, W, 3] RGB."""

    index: int
    first_frame: int
    frames: np.ndarray
    timings: BlockTimings = field(default_factory=BlockTimings)
    silent_samples: int = 0  # samples of missing audio generated as silence
    # (size budget, steps) the block was generated at; None: the engine does not say
    tier: tuple[str, int] | None = None

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
        """Add audio; a chunk may start anywhere on the session timeline. Samples overlapping
        audio already pushed replace it for every block not yet started (the runtime's
        `cut_audio` relies on this to silence an interrupted utterance)."""
        ...

    def ready(self) -> bool:
        """Is all audio the next block needs (look-ahead included) here?"""
        ...

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        """Generate the next block; with `pad_silence`, missing audio counts as silence."""
        ...

    def seek(self, block: int) -> None:
        """Continue at block `block` (skipping ahead on the audio timeline when late)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class TieredSession(Protocol):
    """A session whose generation tier can change mid-stream (the latency governor's lever)."""

    def set_tier(self, size: str | None = None, steps: int | None = None) -> None:
        """Generate from the next block on at this pixel-area budget and step count (None:
        unchanged). Applied at that block boundary: frames change size from that block on. The
        Wan engine's rule (`engine.session_plan`): a new size re-makes the conditioning, the
        sink, the rings and the decoder state; a new step count empties the rings only. Raises
        InputError for a size or step count the engine cannot run."""
        ...


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """Whether an engine can take sessions now. `status`: "ready", "starting", "restarting"
    (a multi-GPU group replacing a failed rank) or "failed"; `detail` says why."""

    ready: bool
    status: str = "ready"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BlockCost:
    """What one block costs the engine's critical path at a tier, as the engine measured it
    when it started (`source`: "cost model" for the preview's modelled speed, "warm-up" for a
    timed session). Admission and /readyz predict other tiers from it (area x steps)."""

    size: str  # the pixel-area budget it was measured at
    steps: int
    seconds: float
    source: str = "warm-up"


def engine_block_cost(engine: Engine) -> BlockCost | None:
    """The engine's measured block cost (optional for engines: a `block_cost()` method; None
    when it has none, and admission then goes by the load of the sessions running)."""
    cost = getattr(engine, "block_cost", None)
    return cost() if callable(cost) else None


def engine_health(engine: Engine) -> EngineHealth:
    """The engine's health (optional for engines: a `health()` method; without one, ready)."""
    health = getattr(engine, "health", None)
    return health() if callable(health) else EngineHealth(True)


def session_info(session: EngineSession) -> dict[str, Any]:
    """JSON-ready facts an engine session tells about itself, such as the preview's face
    detection ("face": {"found": ...}); {} for a session that tells nothing.

    Optional for engines: a session may have an `info` dict attribute; the server passes it on
    as the session's "avatar" info.
    """
    info = getattr(session, "info", None)
    return dict(info) if isinstance(info, dict) else {}


class PendingBlock(Protocol):
    """A block whose frames are on their way (`PipelinedSession.submit_block`)."""

    @property
    def index(self) -> int: ...

    def done(self) -> bool:
        """Are the frames ready? Never waits."""
        ...

    def result(self) -> FrameBlock:
        """The block; waits for its frames if need be."""
        ...


@runtime_checkable
class PipelinedSession(EngineSession, Protocol):
    """A session that can start a block before the previous one's frames are out: the runtime
    submits block b+1 while block b is decoded, and hands block b over as soon as it is done."""

    def submit_block(self, pad_silence: bool = False) -> PendingBlock:
        """Start the next block (same contract as `next_block`) and return at once."""
        ...


class Engine(Protocol):
    """A loaded engine: opens sessions. `name` is "wan" or "preview".

    `lookahead_s`: audio past a block's end it needs before starting that block.
    `max_sessions`: how many sessions it can hold at once (admission also watches measured load).
    `max_size`: the largest generation area budget ("W*H") a session may ask for; for the real
    engine it is what the GPU memory plan was checked for.
    Optional: `max_in_flight` (blocks of one pipelined session submitted and not yet delivered
    at once; default 2; a pipeline of k stages needs k + 1), `health()` (`engine_health`) and
    `block_cost()` (`engine_block_cost`).
    """

    name: str
    description: str
    lookahead_s: float
    max_sessions: int
    max_size: str

    def open_session(self, params: SessionParams) -> EngineSession: ...

    def close(self) -> None: ...


# re-exported: the server imports nothing else from the engine
__all__ = ["CapacityExhausted", "ConfigError", "EngineConfig", "EngineError", "InputError",
           "ProgressFn", "ProgressPrinter", "parse_area"]


def create_engine(config: EngineConfig, progress: ProgressFn | None = None) -> Engine:
    """The engine `config` asks for. Imports torch only for the Wan engine (a checkpoint, or
    random weights)."""
    single = Layout.parse(config.layout).single
    if config.checkpoint or config.random_weights:
        if not single:
            from engine.parallel.engine import ParallelEngine

            return ParallelEngine.load(config, progress)
        from engine.wan_engine import WanEngine

        return WanEngine.load(config, progress)
    from engine.preview import PreviewEngine

    if not single:
        log.warning("engine.layout=%r is for the Wan engine (a checkpoint or random weights); "
                    "the preview engine runs in one process", config.layout)
    return PreviewEngine(config)


def start_runtime(engine: Engine, loop: asyncio.AbstractEventLoop,
                  late_audio_s: float = 0.3) -> EngineRuntime:
    """Start the engine loop thread for `engine`; results wake `loop`. `late_audio_s`: how long
    past its real-time deadline a block waits for late audio before missing audio is silence
    (the server's input re-anchors audio later than that: one setting for both)."""
    from engine.runtime import EngineRuntime

    return EngineRuntime(engine, loop, max_sessions=engine.max_sessions,
                         lookahead_s=engine.lookahead_s, grace_s=late_audio_s,
                         max_in_flight=getattr(engine, "max_in_flight", 2))
