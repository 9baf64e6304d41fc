"""Per-session streaming generation: live audio in, 12-frame blocks out, forever, in constant memory.

Set-up (once per session): the reference image is cropped to the generation size, VAE-encoded to
the reference latent and (as a static 73-frame clip) to 19 motion latents; the prompt is encoded
once and its cross-attention K/V cached per layer; the sink (reference + FramePack motion tokens)
is prefilled at t=0; the streaming VAE decoder is warmed up on the first 7 motion latents.

Per block b (video frames [12b, 12b+12) = latent frames [3b, 3b+3)):
1. wav2vec2 features of exactly those frames (streaming window) -> the DiT's audio tokens;
2. noise from (seed, b); RoPE angles of the block's tokens and of each step's rolling-sink
   reference, on the device, once; then `steps` Euler steps, step i being a `DenoiseStage` that
   owns one K/V buffer [sink | ring] (`engine.kv_cache`; timestep forcing: the ring is filled
   from the step's own noisy input) with the reference keys re-rotated 4-30 latent frames ahead
   of the block (the rolling sink) once per step, for all layers;
3. at block `sink_refresh_block` the sink is re-prefilled with the first generated latent frame
   as the new reference (Live-Avatar's refresh after its first 48-frame clip);
4. the 3 clean latents are decoded with the causal cache carried over -> 12 uint8 RGB frames.
   Unlike upstream, which drops the first 3 decoded frames of the stream (and so runs 120 ms
   ahead of its audio), every block keeps all 12: video frame n is always media time n/25 s.

A `DenoiseStage` touches nothing but its own ring and the shared, read-only conditioning, so a
later multi-GPU runner can place stage i on rank i and pass only the block latents between ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.api import FRAMES_PER_BLOCK, BlockTimings, FrameBlock, SessionParams
from engine.audio_features import AudioFeatureConfig, StreamingAudioFeatures
from engine.checkpoint.loader import EngineModels
from engine.errors import InputError
from engine.image import prepare_reference
from engine.kv_cache import StepAttention, StepKV
from engine.models.dit import AudioTokens, SinkKV, TextKV, WanS2VDiT
from engine.models.rope import RopeAngles
from engine.models.vae import CausalCache
from engine.sampling import FlowSchedule
from engine.sizing import generation_size, parse_area
from engine.speed.prepare import SpeedState
from engine.timing import StageClock
from engine.transfer import to_device

log = logging.getLogger(__name__)

REF_AHEAD_RANGE = (4, 30)  # the rolling sink sits this many latent frames ahead (inclusive)


@dataclass(frozen=True)
class StreamConfig:
    """Engine-level streaming knobs (sizes of state, not of the model)."""

    ring_frames: int = 12  # latent frames of history per step, the current block included
    block_frames: int = 3  # latent frames per block (= 12 video frames)
    sink_refresh_block: int = 4  # re-anchor the sink on generated frame 0 here; 0: never
    warmup_latents: int = 7  # motion latents decoded (and discarded) to prime the VAE cache
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)

    def __post_init__(self) -> None:
        if self.block_frames < 1 or self.ring_frames % self.block_frames:
            raise ValueError(f"ring_frames={self.ring_frames} must be a positive multiple of "
                             f"block_frames={self.block_frames}")


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
                 cond: Conditioning):
        self.dit = dit
        self.schedule = schedule
        self.step = step
        self.kv = kv
        self.cond = cond

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
        velocity = self.dit.denoise(latents, t, block.audio, self.cond.text, attn)
        self.kv.advance(f)
        return velocity


# (block, step, latents in, velocity, block input): a hook for tests and diagnostics
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor, BlockInput], None]


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the host."""
    x = ((pixels[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class StreamGenerator:
    """One session's generator. Not thread-safe: one thread drives it (the engine loop)."""

    def __init__(self, models: EngineModels, params: SessionParams, cfg: StreamConfig | None = None,
                 steps: int = 4, shift: float = 3.0,
                 step_observer: StepObserver | None = None, speed: SpeedState | None = None):
        if params.image is None:
            raise InputError("the Wan engine needs a reference image (an upload or an avatar "
                             "from config)")
        self.models = models
        self.params = params
        self.cfg = cfg or StreamConfig()
        self.schedule = FlowSchedule.make(params.steps or steps, shift)
        self.step_observer = step_observer
        self.speed = speed or SpeedState()
        self.device = models.device
        dit, vae = models.dit, models.vae
        stride = vae.cfg.spatial_stride
        h_img, w_img = params.image.shape[:2]
        self.height, self.width = generation_size(h_img, w_img, parse_area(params.size))
        self.latent_hw = (self.height // stride, self.width // stride)
        self.block = 0
        self.rope = RopeAngles(dit.cfg.rope_bands, self.device)
        clock = StageClock(self.device)
        clock.mark("start")
        with torch.inference_mode(), self.speed.attention.active():
            self.cond, self.ref_latent = self._condition(params, clock)
            self.decode_cache = CausalCache()
            warm = self.cond.motion[:, :, : self.cfg.warmup_latents]
            if warm.shape[2]:
                vae.decode(warm.to(models.dtype), self.decode_cache)
            clock.mark("vae_warmup")
        self.setup_seconds = clock.seconds()  # per set-up stage (waits for the device)
        hh, ww = self.latent_hw
        tokens_per_frame = (hh // 2) * (ww // 2)
        sink = self.cond.sink
        self.motion_rope = self.rope.of(to_device(sink.positions[sink.ref_tokens:], self.device))
        self.stages = []
        for i in range(self.schedule.steps):
            kv = StepKV(dit.cfg.num_layers, 1, self.sink_tokens, sink.ref_tokens,
                        self.cfg.ring_frames, tokens_per_frame, dit.cfg.num_heads,
                        dit.cfg.head_dim, models.dtype, self.device)
            stage = DenoiseStage(dit, self.schedule, i, kv, self.cond)
            with torch.inference_mode():
                stage.set_sink(sink, self.motion_rope)
            self.stages.append(stage)
        self.audio = StreamingAudioFeatures(models.wav2vec, self.cfg.audio, self.device)
        self._first_latent: torch.Tensor | None = None
        log.info("session generator ready: %dx%d, %d steps, ring %d frames", self.width,
                 self.height, self.schedule.steps, self.cfg.ring_frames)

    # set-up ---------------------------------------------------------------------------------

    def _condition(self, params: SessionParams, clock: StageClock
                   ) -> tuple[Conditioning, torch.Tensor]:
        m = self.models
        assert params.image is not None
        ref_px = prepare_reference(params.image, self.height, self.width).to(m.device, m.dtype)
        ref_latent = m.vae.encode(ref_px).float()  # [1, 16, 1, h, w]
        clock.mark("reference")
        clip = ref_px.expand(-1, -1, m.dit.cfg.motion_video_frames, -1, -1)
        motion = m.vae.encode(clip).float()  # a static past: [1, 16, 19, h, w]
        clock.mark("motion")
        context = m.text.encode([params.prompt])[0][None].to(m.device)
        text = m.dit.text_kv(context)
        clock.mark("text")
        sink = self._prefill(ref_latent, motion, text)
        clock.mark("prefill")
        return Conditioning(text, sink, motion), ref_latent

    def _prefill(self, ref: torch.Tensor, motion: torch.Tensor, text: TextKV) -> SinkKV:
        tokens, positions, n_ref = self.models.dit.embed_sink(ref, motion)
        return self.models.dit.prefill_sink(tokens, positions, n_ref, text)

    # audio ------------------------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray, at: int | None = None) -> None:
        """16 kHz mono float32 samples, starting at session sample `at` (default: contiguous)."""
        self.audio.push(samples, at)

    @property
    def next_frame(self) -> int:
        """The first video frame of the next block."""
        return self.block * FRAMES_PER_BLOCK

    def ready(self) -> bool:
        """Is all audio the next block needs (including look-ahead) here?"""
        return self.audio.ready(self.next_frame + FRAMES_PER_BLOCK - 1)

    # generation -------------------------------------------------------------------------------

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        """Generate the next block. Missing audio is an error unless `pad_silence` (the block's
        real-time deadline has passed), in which case it is generated as silence."""
        first, last = self.next_frame, self.next_frame + FRAMES_PER_BLOCK - 1
        silent = 0
        if not self.audio.ready(last):
            if not pad_silence:
                raise RuntimeError(f"audio for frames {first}..{last} has not arrived; pass "
                                   "pad_silence=True once the block's deadline has passed")
            silent = self.audio.pad_silence(last)
        t0 = time.perf_counter()
        clock = StageClock(self.device)
        clock.mark("start")
        with torch.inference_mode(), self.speed.attention.active():
            m, b = self.models, self.block
            feats = self.audio.features(first, FRAMES_PER_BLOCK)
            audio = m.dit.encode_audio(feats)
            clock.mark("features")
            if b == self.cfg.sink_refresh_block and self._first_latent is not None:
                self.cond.sink = self._prefill(self._first_latent, self.cond.motion,
                                               self.cond.text)
                for stage in self.stages:
                    stage.set_sink(self.cond.sink, self.motion_rope)
            block = self._block_input(b, audio)
            f = self.cfg.block_frames
            noise = block_noise(self.params.seed, b, (1, 16, f, *self.latent_hw))
            x = to_device(noise, self.device)
            for stage in self.stages:
                v = stage.velocity(x, block)
                if self.step_observer is not None:
                    self.step_observer(b, stage.step, x, v, block)
                x = stage.update(x, v)
                clock.mark(f"step{stage.step}")
            if b == 0:
                self._first_latent = x[:, :, :1].clone()
            pixels = m.vae.decode(x.to(m.dtype), self.decode_cache)
            clock.mark("decode")
            frames = to_uint8_frames(pixels)
            clock.mark("postprocess")
        t3 = time.perf_counter()
        if frames.shape[0] != FRAMES_PER_BLOCK:
            raise AssertionError(f"decoded {frames.shape[0]} frames, expected {FRAMES_PER_BLOCK}")
        self.block += 1
        sec = clock.seconds()
        steps = tuple(sec[f"step{i}"] for i in range(self.schedule.steps))
        return FrameBlock(b, first, frames, BlockTimings(
            features=sec["features"], denoise=sum(steps), decode=sec["decode"], total=t3 - t0,
            steps=steps, postprocess=sec["postprocess"]), silent)

    def _block_input(self, b: int, audio: AudioTokens) -> BlockInput:
        """Block b's shared inputs; RoPE angles on the device, once for all steps and layers."""
        cfg = self.models.dit.cfg
        f = self.cfg.block_frames
        frame0 = b * f
        h2, w2 = self.latent_hw[0] // 2, self.latent_hw[1] // 2
        pinned = self.params.ref_ahead
        ahead = tuple(pinned if pinned is not None else ref_ahead(self.params.seed, b, i)
                      for i in range(self.schedule.steps))
        ref_rope = tuple(self.rope.grid(max(cfg.ref_time, frame0 + d), 1, h2, w2) for d in ahead)
        return BlockInput(b, frame0, audio, ahead, self.rope.grid(frame0, f, h2, w2), ref_rope)

    def seek(self, block: int) -> None:
        """Continue at `block` (the engine skips ahead when it falls behind real time). The
        rings keep their older keys, at their true positions."""
        if block < self.block:
            raise ValueError(f"cannot seek back from block {self.block} to {block}")
        self.block = block

    @property
    def sink_tokens(self) -> int:
        return int(self.cond.sink.keys[0].shape[1])

    def state_nbytes(self) -> int:
        """Bytes of per-session state that could grow: rings, VAE cache, audio buffer."""
        rings = sum(s.kv.nbytes for s in self.stages)
        return rings + self.decode_cache.nbytes() + self.audio.buffer.nbytes
