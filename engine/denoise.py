"""One denoising step of a session's blocks, and the inputs its steps share.

A `DenoiseStage` is step i of every block: it owns one K/V buffer (`engine.kv_cache.StepKV`: the
sink and its own ring, filled from its own noisy inputs, i.e. timestep forcing) and reads only
shared, read-only values: the DiT, the session's `Conditioning` and the block's `BlockInput`. So
a multi-GPU runner can put stage i on rank i and pass only the block latents between ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import StepAttention, StepKV
from engine.models.dit import AudioTokens, LayerRunner, SinkKV, TextKV, WanS2VDiT
from engine.sampling import FlowSchedule

REF_AHEAD_RANGE = (4, 30)  # the rolling sink sits this many latent frames ahead (inclusive)


def ref_ahead(seed: int, block: int, step: int) -> int:
    """The rolling-sink distance of (block, step): a pure function of the session seed, so runs
    are reproducible and any rank computes the same value."""
    rng = np.random.default_rng([seed, block, step, 0x5eed])
    lo, hi = REF_AHEAD_RANGE
    return int(rng.integers(lo, hi + 1))


def block_noise(seed: int, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@dataclass
class Conditioning:
    """Session-constant inputs of every step: text K/V and the sink (replaced on refresh)."""

    text: TextKV
    sink: SinkKV
    motion: torch.Tensor  # [1, 16, 19, h, w]


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), float32 [tokens, head_dim / 2]


@dataclass(frozen=True)
class BlockInput:
    """What every step of block `index` needs besides the latents (computed once per block, on
    the device, and shared read-only by all its steps and layers)."""

    index: int
    frame0: int  # first latent frame of the block
    audio: AudioTokens
    ref_ahead: tuple[int, ...]  # per step
    rope: Rope  # the block's tokens at their absolute positions
    ref_rope: tuple[Rope, ...]  # per step: the reference tokens on the rolling sink


class DenoiseStage:
    """Denoising step `step` of every block of one session, with its own K/V (sink + ring)."""

    def __init__(self, dit: WanS2VDiT, schedule: FlowSchedule, step: int, kv: StepKV,
                 cond: Conditioning, layers: LayerRunner | None = None):
        self.dit = dit
        self.schedule = schedule
        self.step = step
        self.kv = kv
        self.cond = cond
        self.layers = layers  # how the DiT's layers run (compiled, shared), or None: eager

    def update(self, latents: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """The Euler step: latents at sigma_step -> latents at sigma_step+1 (float32)."""
        return latents.float() + self.schedule.delta(self.step) * velocity

    def set_sink(self, sink: SinkKV, motion_rope: Rope) -> None:
        self.kv.set_sink(sink, motion_rope)

    def velocity(self, latents: torch.Tensor, block: BlockInput) -> torch.Tensor:
        """The model's flow prediction for this step; writes the block into this step's ring."""
        f = latents.shape[2]
        self.kv.rotate_reference(self.cond.sink, block.ref_rope[self.step])
        attn = StepAttention(self.kv, block.rope, f)
        t = torch.full((1,), self.schedule.timestep(self.step), device=latents.device)
        velocity = self.dit.denoise(latents, t, block.audio, self.cond.text, attn,
                                    layers=self.layers)
        self.kv.advance(f)
        return velocity


# (block, step, latents in, velocity, block input): a hook for tests and diagnostics
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor, BlockInput], None]
