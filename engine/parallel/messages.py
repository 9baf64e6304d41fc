"""The control plane between the server process and its ranks: typed messages over one
authenticated socket per rank (`engine.parallel.channel`).

Tensors travel as `Wire` values (numpy bytes plus the torch dtype), never as pickled tensors:
torch's multiprocessing pickler would try to share their memory, which cannot cross hosts, and
bfloat16 has no numpy type. A round trip is exact, so a tensor that crosses the control plane is
the same bits on the other side. The data plane (a block's latents and audio tokens, rank i ->
i+1) does not come through here: it is torch.distributed point-to-point (`engine.parallel.hops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.api import SessionParams
from engine.audio_features import AudioWindow
from engine.avatar_cache import AvatarKey
from engine.config import EngineConfig
from engine.session_plan import BlockPlan, Tier

# 1. Tensors on the wire ---------------------------------------------------------------------------

_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}


@dataclass(frozen=True)
class Wire:
    """A tensor's bytes (a numpy array of the same element size) and its torch dtype."""

    data: np.ndarray
    dtype: str

    @classmethod
    def of(cls, t: torch.Tensor) -> Wire:
        t = t.detach().contiguous().cpu()
        view = _VIEW.get(t.dtype)
        data = (t.view(view) if view is not None else t).numpy()
        return cls(data, str(t.dtype).removeprefix("torch."))

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        t = torch.from_numpy(np.ascontiguousarray(self.data))
        if dtype in _VIEW:
            t = t.view(dtype)
        return t.to(device)


@dataclass(frozen=True)
class AvatarInputs:
    """What the encoder (the VAE's rank) hands every DiT rank for one size of one session."""

    key: AvatarKey  # the per-avatar cache key (image digest, size, prompt)
    height: int
    width: int
    ref_latent: Wire  # [1, 16, 1, h, w] float32
    motion: Wire  # [1, 16, 19, h, w] float32
    context: Wire  # umT5 states [1, Lc, text_dim]


# 2. Server -> rank ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The first message to a rank: what to load and how to join the group."""

    config: EngineConfig
    layout: str
    rank: int
    world: int
    store: tuple[str, int] | None  # the group's TCPStore; None: torchrun's env://
    stream: Any  # engine.generator.StreamConfig
    threads: int  # torch CPU threads (0: torch's default)
    timeout_s: float  # receive timeout of the data plane


@dataclass(frozen=True)
class Encode:
    """To the VAE's rank: encode the avatar of `sid` at this size (generation `generation`),
    prime a decoder for it, and answer `Encoded`."""

    sid: str
    generation: int
    image: np.ndarray
    height: int
    width: int
    prompt: str
    key: AvatarKey


@dataclass(frozen=True)
class Open:
    """To every DiT rank: set up session `sid` (its sink, its steps' K/V) and answer `Opened`."""

    sid: str
    params: SessionParams  # without the image
    tier: Tier
    inputs: AvatarInputs


@dataclass(frozen=True)
class Condition:
    """To every DiT rank: the conditioning of `sid` at a new size, for its plan that resizes."""

    sid: str
    generation: int
    inputs: AvatarInputs


@dataclass(frozen=True)
class Plan:
    """To every rank, in one global order: run block `plan.index` of `sid`. Only the rank that
    computes the features gets the audio window."""

    sid: str
    plan: BlockPlan
    window: AudioWindow | None = None


@dataclass(frozen=True)
class Features:
    """A block's wav2vec2 features, from the rank that computes them (`Layout.features_rank`:
    the VAE rank of a `k+vae` layout, rank 1 of a `k` layout with k >= 3) through the server
    to rank 0, which turns them into the audio tokens."""

    sid: str
    block: int
    feats: Wire  # [1, 25, 1024, 12] float32
    seconds: float = 0.0
    rank: int = 0  # where they were computed (its GPU spent `seconds` on them)


@dataclass(frozen=True)
class RefreshLatent:
    """To every DiT rank: the first clean latent of block `block` (the sink refresh's)."""

    sid: str
    block: int
    latent: Wire


@dataclass(frozen=True)
class Close:
    """To every rank, after the session's last plan: free its state."""

    sid: str


@dataclass(frozen=True)
class Query:
    """Ask for a `Report` (bench figures)."""

    reset: bool = False  # start the peaks and stage times afresh after answering


@dataclass(frozen=True)
class Stop:
    pass


# 3. Rank -> server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    rank: int
    world: int
    host: str
    pid: int


@dataclass(frozen=True)
class Ready:
    rank: int
    device: str
    parts: tuple[str, ...]
    load_s: float
    memory: dict[str, float] = field(default_factory=dict)
    sessions: int = 0  # how many sessions its memory holds (its plan)


@dataclass(frozen=True)
class Beat:
    rank: int


@dataclass(frozen=True)
class Encoded:
    sid: str
    generation: int
    inputs: AvatarInputs
    seconds: dict[str, float]
    cache_hit: bool


@dataclass(frozen=True)
class Opened:
    sid: str
    rank: int
    seconds: float
    cache_hit: bool


@dataclass(frozen=True)
class StageDone:
    """One rank's share of one block: `busy` is what it cost this rank's critical path."""

    sid: str
    block: int
    rank: int
    busy: float
    steps: tuple[float, ...] = ()
    features: float = 0.0


@dataclass(frozen=True)
class FirstLatent:
    sid: str
    block: int
    latent: Wire


@dataclass(frozen=True)
class Frames:
    sid: str
    block: int
    frames: np.ndarray  # uint8 [12, H, W, 3]
    decode: float
    postprocess: float
    rank: int
    critical: bool  # the decode held up its rank (a VAE rank, or a decode not overlapped)


@dataclass(frozen=True)
class Failed:
    """A rank's error: of one session (`sid`; the session ends, the group goes on) or of the
    rank itself (`sid` None: the group is restarted)."""

    rank: int
    sid: str | None
    message: str
    input_error: bool = False  # a bad request (InputError), e.g. an image too small


@dataclass(frozen=True)
class Report:
    rank: int
    stats: dict[str, Any]
