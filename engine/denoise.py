"""The denoising steps of a session's blocks, and the inputs its steps share.

A `DenoiseStage` is step i of every block: it owns one K/V buffer (`engine.kv_cache.StepKV`: the
sink and its own ring, filled from its own noisy inputs, i.e. timestep forcing) and reads only
shared, read-only values: the DiT, the session's `Conditioning` and the block's `BlockInput`. So
a multi-GPU runner puts stage i on the rank that owns step i and passes only the block latents
between ranks. A `SessionDenoiser` is the set of stages one process runs for one session (all of
them in the single-process generator, a rank's share in `engine.parallel`), with the sink they
share and the state changes a block plan asks for (`engine.session_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import StepAttention, StepKV
from engine.models.dit import AudioTokens, LayerRunner, SinkKV, TextKV, WanS2VDiT
from engine.models.rope import RopeAngles
from engine.sampling import FlowSchedule
from engine.speed.compile import CompiledLayers
from engine.timing import StageClock
from engine.transfer import to_device

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
    """Session-constant inputs of every step: text K/V and the sink (replaced on refresh).

    `sink` None: not prefilled yet; `SessionDenoiser.start` prefills it from `ref` straight into
    the steps' buffers (what a session does when no avatar cache keeps the whole sink)."""

    text: TextKV
    sink: SinkKV | None
    motion: torch.Tensor  # [1, 16, 19, h, w]
    ref: torch.Tensor | None = None  # the reference latent [1, 16, 1, h, w], for that prefill


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
        assert self.cond.sink is not None  # (prefilled by SessionDenoiser.start)
        self.kv.rotate_reference(self.cond.sink, block.ref_rope[self.step])
        attn = StepAttention(self.kv, block.rope, f)
        t = torch.full((1,), self.schedule.timestep(self.step), device=latents.device)
        velocity = self.dit.denoise(latents, t, block.audio, self.cond.text, attn,
                                    layers=self.layers)
        self.kv.advance(f)
        return velocity


# (block, step, latents in, velocity, block input): a hook for tests and diagnostics
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor, BlockInput], None]


def all_steps(steps: int) -> range:
    return range(steps)


class SessionDenoiser:
    """One session's denoising state in one process: the `Conditioning` (text K/V and sink) and a
    `DenoiseStage` for each step of the schedule that `owned(steps)` gives this process.

    `start` (re)builds it for a size (new buffers holding the sink, empty rings), `set_steps` for
    a new step count (the same sink, empty rings; buffers are reused), `empty_rings` after a
    seek and `refresh` re-anchors the sink. Not thread-safe: one thread drives it.
    """

    def __init__(self, dit: WanS2VDiT, ring_frames: int, dtype: torch.dtype,
                 device: torch.device, layers: CompiledLayers | None = None,
                 owned: Callable[[int], Sequence[int]] = all_steps,
                 observer: StepObserver | None = None):
        self.dit = dit
        self.ring_frames = ring_frames
        self.dtype = dtype
        self.device = device
        self.layers = layers
        self.owned = owned
        self.observer = observer
        self.rope = RopeAngles(dit.cfg.rope_bands, device)
        self.stages: list[DenoiseStage] = []
        self.latent_hw = (0, 0)
        self.sink_shared = False  # the full sink belongs to a cache: never reduce it here

    # 1. state changes -----------------------------------------------------------------------

    def start(self, latent_hw: tuple[int, int], cond: Conditioning, schedule: FlowSchedule,
              sink_shared: bool) -> None:
        """Build the stages of `schedule` for blocks of `latent_hw` latents, each with a new
        K/V buffer holding the sink and an empty ring (any previous buffers are freed first):
        `cond.sink`, or with none, the sink prefilled from `cond.ref` into the buffers."""
        self.stages = []
        self.latent_hw = latent_hw
        self.cond = cond
        self.sink_shared = sink_shared
        if self.layers is not None and not cond.text.length:
            # (compact text K/V reach the layers as new full tensors each call: not static)
            self.layers.mark_static(*cond.text.keys, *cond.text.values)
        if cond.sink is None:
            if cond.ref is None:
                raise ValueError("a Conditioning without a sink needs its reference latent")
            tokens, positions, n_ref = self.dit.embed_sink(cond.ref, cond.motion)
            self._build(schedule, [], sizes=(int(tokens.shape[1]), n_ref))
            self._prefill_into_stages(tokens, positions, n_ref)
            return
        sink = cond.sink
        self.motion_rope = self.rope.of(to_device(sink.positions[sink.ref_tokens:], self.device))
        self._build(schedule, [])
        self._keep_reference_only()

    def set_steps(self, schedule: FlowSchedule) -> None:
        """Run `schedule` from the next block: its stages over the same sink, rings empty."""
        buffers = [s.kv for s in self.stages]
        for kv in buffers:
            kv.empty_ring()
        self._build(schedule, buffers)

    def empty_rings(self) -> None:
        for stage in self.stages:
            stage.kv.empty_ring()

    def refresh(self, latent: torch.Tensor) -> None:
        """Re-prefill the sink with `latent` [1, 16, 1, h, w] as the reference (Live-Avatar's
        rolling sink frame); the new sink is the session's own, never a cache's. It is written
        into the steps' buffers as the prefill makes it, layer by layer, so the old and the new
        whole sink never take memory at once (the same bits as prefilling first)."""
        tokens, positions, n_ref = self.dit.embed_sink(latent, self.cond.motion)
        self._prefill_into_stages(tokens, positions, n_ref)
        self.sink_shared = False

    def _prefill_into_stages(self, tokens: torch.Tensor, positions: np.ndarray,
                             n_ref: int) -> None:
        """The sink's prefill, each layer's K/V written into the first stage's buffer as it is
        made (and copied into the other stages' after); the session keeps the reference keys."""
        self.motion_rope = rope = self.rope.of(to_device(positions[n_ref:], self.device))
        first = self.stages[0].kv
        with torch.inference_mode():
            self.cond.sink = self.dit.prefill_sink(
                tokens, positions, n_ref, self.cond.text,
                into=lambda layer, k, v: first.set_sink_layer(layer, k, v, rope))
            for stage in self.stages[1:]:
                stage.kv.copy_sink(first)

    def _build(self, schedule: FlowSchedule, buffers: list[StepKV],
               sizes: tuple[int, int] | None = None) -> None:
        """Stages for `schedule` over `buffers` (reused) and new buffers holding the sink;
        `sizes` (sink tokens, reference tokens): new buffers left for a prefill to fill."""
        self.schedule = schedule
        cfg, cond = self.dit.cfg, self.cond
        hh, ww = self.latent_hw
        model = buffers[0] if buffers else None
        if model is not None:
            sink_tokens, ref_tokens = model.sink_tokens, model.ref_tokens
        elif sizes is not None:
            sink_tokens, ref_tokens = sizes
        else:
            assert cond.sink is not None
            sink_tokens, ref_tokens = int(cond.sink.keys.shape[2]), cond.sink.ref_tokens
        stages = []
        for i in self.owned(schedule.steps):
            if buffers:
                kv = buffers.pop(0)
            else:
                kv = StepKV(cfg.num_layers, 1, sink_tokens, ref_tokens, self.ring_frames,
                            (hh // 2) * (ww // 2), cfg.num_heads, cfg.head_dim, self.dtype,
                            self.device)
                with torch.inference_mode():
                    if model is not None:  # the session's sink may be down to its reference
                        kv.copy_sink(model)
                    elif sizes is None:
                        assert cond.sink is not None
                        kv.set_sink(cond.sink, self.motion_rope)
                if self.layers is not None:
                    self.layers.mark_static(*kv.k_layers, *kv.v_layers)
            stages.append(DenoiseStage(self.dit, schedule, i, kv, cond, self.layers))
        self.stages = stages

    def _keep_reference_only(self) -> None:
        """Once every step's buffer holds the sink, the session needs only its reference keys
        (re-rotated per step); the rest is dropped unless a cache shares it."""
        if not self.sink_shared and self.stages and self.cond.sink is not None:
            self.cond.sink = self.cond.sink.reference_only()

    # 2. a block -----------------------------------------------------------------------------

    def block_input(self, b: int, audio: AudioTokens, seed: int, pinned: int | None,
                    block_frames: int) -> BlockInput:
        """Block b's shared inputs; RoPE angles on the device, once for all steps and layers."""
        cfg = self.dit.cfg
        frame0 = b * block_frames
        h2, w2 = self.latent_hw[0] // 2, self.latent_hw[1] // 2
        ahead = tuple(pinned if pinned is not None else ref_ahead(seed, b, i)
                      for i in range(self.schedule.steps))
        ref_rope: tuple[Rope, ...] = tuple(
            self.rope.grid(max(cfg.ref_time, frame0 + d), 1, h2, w2) for d in ahead)
        return BlockInput(b, frame0, audio, ahead, self.rope.grid(frame0, block_frames, h2, w2),
                          ref_rope)

    def run(self, x: torch.Tensor, block: BlockInput, clock: StageClock) -> torch.Tensor:
        """This process's steps of the block: latents at the first owned step's noise level in,
        at the next one's out (float32); marks "step{i}" after each step."""
        for stage in self.stages:
            v = stage.velocity(x, block)
            if self.observer is not None:
                self.observer(block.index, stage.step, x, v, block)
            x = stage.update(x, v)
            clock.mark(f"step{stage.step}")
        return x

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.stages]

    @property
    def sink_tokens(self) -> int:
        """Tokens of the sink each step attends to (reference + motion)."""
        if self.stages:
            return self.stages[0].kv.sink_tokens
        assert self.cond.sink is not None
        return int(self.cond.sink.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return sum(s.kv.nbytes for s in self.stages)

    def close(self) -> None:
        self.stages = []  # drop the buffers now, not at garbage collection


def step_seconds(clock: StageClock, steps: Sequence[int]) -> tuple[float, ...]:
    """Seconds of each of `steps` from a clock marked "inputs", then "step{i}" after each."""
    out, prev = [], "inputs"
    for i in steps:
        out.append(clock.between(prev, f"step{i}"))
        prev = f"step{i}"
    return tuple(out)
