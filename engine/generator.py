"""Per-session streaming generation: live audio in, 12-frame blocks out, forever, in constant memory.

Set-up (once per session): the reference image is cropped to the generation size, VAE-encoded to
the reference latent and (as a static 73-frame clip, 4 frames per encoder call) to 19 motion
latents; the prompt is encoded once and its cross-attention K/V cached per layer; the sink
(reference + FramePack motion tokens) is prefilled at t=0; the streaming VAE decoder is warmed
up on the first 7 motion latents (on the decode queue, beside the prefill when overlapped). All
of that comes from the engine's avatar cache (`engine.avatar_cache`) when another session set
up the same image, size and prompt.

Per block b (video frames [12b, 12b+12) = latent frames [3b, 3b+3)):
1. wav2vec2 features of exactly those frames (streaming window) -> the DiT's audio tokens;
2. noise from (seed, b); RoPE angles of the block's tokens and of each step's rolling-sink
   reference, on the device, once; then `steps` Euler steps, step i being a `DenoiseStage`
   (`engine.denoise`) that owns one K/V buffer [sink | ring] (`engine.kv_cache`) with the
   reference keys re-rotated 4-30 latent frames ahead of the block once per step;
3. at block `sink_refresh_block` the sink is re-prefilled with the first generated latent frame
   as the new reference (Live-Avatar's refresh after its first 48-frame clip);
4. the 3 clean latents are decoded with the causal cache carried over -> 12 uint8 RGB frames,
   on the engine's `DecodeQueue` (`engine.decode`): inline, or beside the next block's steps.
   Unlike upstream, which drops the first 3 decoded frames of the stream (and so runs 120 ms
   ahead of its audio), every block keeps all 12: video frame n is always media time n/25 s.

`submit_block` runs 1-3 and queues 4, returning a `PendingFrames` whose frames can be taken the
moment their own decode is done (the engine runtime delivers block b while block b+1's steps
run); `next_block` is submit-then-wait. Nothing in a block waits for the GPU before its frames
are wanted: timings are CUDA events, host inputs are copied asynchronously.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.api import FRAMES_PER_BLOCK, BlockTimings, FrameBlock, SessionParams
from engine.audio_features import AudioFeatureConfig, StreamingAudioFeatures
from engine.avatar_cache import AvatarKey, AvatarState
from engine.checkpoint.loader import EngineModels
from engine.decode import DecodedFrames, PendingDecode, decode_block, frames_to_numpy
from engine.denoise import (
    BlockInput,
    Conditioning,
    DenoiseStage,
    Rope,
    StepObserver,
    block_noise,
    ref_ahead,
)
from engine.errors import InputError
from engine.image import prepare_reference
from engine.kv_cache import StepKV
from engine.models.dit import AudioTokens, SinkKV, TextKV
from engine.models.rope import RopeAngles
from engine.models.vae import CausalCache
from engine.sampling import FlowSchedule
from engine.sizing import generation_size, parse_area
from engine.speed.prepare import SpeedState
from engine.timing import StageClock
from engine.transfer import to_device

log = logging.getLogger(__name__)

__all__ = ["BlockInput", "PendingFrames", "StreamConfig", "StreamGenerator"]


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


class PendingFrames:
    """A block whose steps are queued and whose decode is under way (an
    `engine.api.PendingBlock`): `done()` never waits, `result()` waits and returns the block."""

    def __init__(self, index: int, first_frame: int, silent: int, clock: StageClock,
                 steps: int, decode: PendingDecode, overlapped: bool, started: float):
        self.index = index
        self.first_frame = first_frame
        self.silent = silent
        self.clock = clock
        self.steps = steps
        self.decode = decode
        self.overlapped = overlapped
        self.started = started
        self._block: FrameBlock | None = None

    def done(self) -> bool:
        return self._block is not None or self.decode.done()

    def result(self) -> FrameBlock:
        if self._block is not None:
            return self._block
        decoded = self.decode.result()
        frames = frames_to_numpy(decoded.frames)
        finished = time.perf_counter()
        if frames.shape[0] != FRAMES_PER_BLOCK:
            raise AssertionError(f"decoded {frames.shape[0]} frames, expected {FRAMES_PER_BLOCK}")
        c, d = self.clock, decoded.clock
        steps = tuple(c.between("inputs" if i == 0 else f"step{i - 1}", f"step{i}")
                      for i in range(self.steps))
        features = c.between("start", "features")
        decode = d.between("decode_start", "decode")
        post = d.between("decode", "postprocess")
        busy = features + sum(steps) + (0.0 if self.overlapped else decode + post)
        self._block = FrameBlock(self.index, self.first_frame, frames, BlockTimings(
            features=features, denoise=sum(steps), decode=decode, total=finished - self.started,
            steps=steps, postprocess=post, busy=busy), self.silent)
        return self._block


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
        self.speed = speed or SpeedState.plain(models.device)
        self.decoder = self.speed.decoder
        self.device = models.device
        dit, vae = models.dit, models.vae
        stride = vae.cfg.spatial_stride
        h_img, w_img = params.image.shape[:2]
        self.height, self.width = generation_size(h_img, w_img, parse_area(params.size))
        self.latent_hw = (self.height // stride, self.width // stride)
        self.block = 0
        self.rope = RopeAngles(dit.cfg.rope_bands, self.device)
        self._setup = StageClock(self.device)
        self._setup.mark("start")
        self.decode_cache = CausalCache()
        with torch.inference_mode(), self.speed.attention.active():
            self.cond, self.ref_latent = self._condition(params, self._setup)
        hh, ww = self.latent_hw
        tokens_per_frame = (hh // 2) * (ww // 2)
        sink = self.cond.sink
        self.motion_rope = self.rope.of(to_device(sink.positions[sink.ref_tokens:], self.device))
        self.stages = []
        if self.speed.layers is not None:
            self.speed.layers.mark_static(*self.cond.text.keys, *self.cond.text.values)
        for i in range(self.schedule.steps):
            kv = StepKV(dit.cfg.num_layers, 1, int(sink.keys.shape[2]), sink.ref_tokens,
                        self.cfg.ring_frames, tokens_per_frame, dit.cfg.num_heads,
                        dit.cfg.head_dim, models.dtype, self.device)
            stage = DenoiseStage(dit, self.schedule, i, kv, self.cond, self.speed.layers)
            if self.speed.layers is not None:
                self.speed.layers.mark_static(*kv.k_layers, *kv.v_layers)
            with torch.inference_mode():
                stage.set_sink(sink, self.motion_rope)
            self.stages.append(stage)
        self._keep_reference_only()
        self.audio = StreamingAudioFeatures(models.wav2vec, self.cfg.audio, self.device)
        self._first_latent: torch.Tensor | None = None
        self._setup_seconds: dict[str, float] | None = None
        log.info("session generator ready: %dx%d, %d steps, ring %d frames, decode %s",
                 self.width, self.height, self.schedule.steps, self.cfg.ring_frames,
                 self.decoder.mode)

    # set-up ---------------------------------------------------------------------------------

    def _condition(self, params: SessionParams, clock: StageClock
                   ) -> tuple[Conditioning, torch.Tensor]:
        """Reference and motion latents, text K/V and the sink: from the avatar cache when
        this image, size and prompt were set up before, else computed (and cached)."""
        m, cache = self.models, self.speed.avatars
        assert params.image is not None
        key = (AvatarKey.of(params.image, self.height, self.width, params.prompt)
               if cache is not None else None)
        state = cache.get(key) if cache is not None and key is not None else None
        self.avatar_cache_hit = self._sink_shared = state is not None
        if state is not None:
            if state.decode_slots:  # the primed decoder too
                self.decode_cache.slots.update(state.decode_slots)
                self._warmup = None
            else:
                self._warmup = self._warm_decoder(state.motion, None)
            for stage in ("reference", "motion", "warmup_queued", "text", "prefill"):
                clock.mark(stage)
            return Conditioning(state.text, state.sink, state.motion), state.ref_latent
        ref_px = to_device(prepare_reference(params.image, self.height, self.width), m.device,
                           m.dtype)
        ref_latent = m.vae.encode(ref_px).float()  # [1, 16, 1, h, w]
        clock.mark("reference")
        motion = self._encode_motion(ref_px)
        clock.mark("motion")
        slots: dict[str, torch.Tensor] = {}
        self._warmup = self._warm_decoder(motion, slots if cache is not None else None)
        clock.mark("warmup_queued")  # the warm-up itself, unless it runs on the decode queue
        text = m.dit.text_kv(self._context(params.prompt))
        clock.mark("text")
        sink = self._prefill(ref_latent, motion, text)
        clock.mark("prefill")
        if cache is not None and key is not None:
            self._sink_shared = cache.put(key, AvatarState(ref_latent, motion, text, sink, slots))
        return Conditioning(text, sink, motion), ref_latent

    def _context(self, prompt: str) -> torch.Tensor:
        """umT5 states of the prompt [1, Lc, text_dim] on the DiT's device (cached per prompt)."""
        context = self.speed.prompts.get(prompt)
        if context is None:
            context = self.models.text.encode([prompt])[0][None].to(self.models.device)
            self.speed.prompts.put(prompt, context)
        return context

    def _encode_motion(self, ref_px: torch.Tensor) -> torch.Tensor:
        """The reference as a static 73-frame clip -> 19 motion latents [1, 16, 19, h, w].

        The causal encoder takes the clip as 1 + 4 + 4 + ... frames with its cache carried,
        which equals one call over the whole clip and keeps the activations of 4 frames alive
        instead of 73 (gigabytes at 704x384).
        """
        vae, frames = self.models.vae, self.models.dit.cfg.motion_video_frames
        cache = CausalCache()
        chunks = [vae.encode(ref_px, cache)]
        for start in range(1, frames, 4):
            n = min(4, frames - start)
            chunks.append(vae.encode(ref_px.expand(-1, -1, n, -1, -1), cache))
        return torch.cat(chunks, dim=2).float()

    def _warm_decoder(self, motion: torch.Tensor, keep: dict[str, torch.Tensor] | None
                      ) -> PendingDecode | None:
        """Prime the causal decode cache on the first motion latents (frames discarded); on
        the decode queue, so that when overlapped it runs beside the text encoding and prefill.
        The primed slots are copied into `keep` by the job itself (for the avatar cache):
        queued work on one stream or thread sees them in order."""
        warm = motion[:, :, : self.cfg.warmup_latents].to(self.models.dtype)
        if not warm.shape[2]:
            return None
        vae, cache, cl = self.models.vae, self.decode_cache, self.speed.vae_channels_last

        def job() -> DecodedFrames:
            out = decode_block(vae, warm, cache, cl)
            if keep is not None:
                keep.update(cache.slots)
            return out

        return self.decoder.submit(job, inputs=(warm,))

    def _keep_reference_only(self) -> None:
        """Once every step's buffer holds the sink, the session needs only its reference keys
        (re-rotated per step); the rest is dropped unless the avatar cache shares it."""
        if not self._sink_shared:
            self.cond.sink = self.cond.sink.reference_only()

    def _prefill(self, ref: torch.Tensor, motion: torch.Tensor, text: TextKV) -> SinkKV:
        tokens, positions, n_ref = self.models.dit.embed_sink(ref, motion)
        return self.models.dit.prefill_sink(tokens, positions, n_ref, text)

    @property
    def setup_seconds(self) -> dict[str, float]:
        """Seconds per set-up stage: reference, motion, text, prefill, vae_warmup (waits for
        the device)."""
        if self._setup_seconds is None:
            out = self._setup.seconds()
            out.pop("warmup_queued", None)
            if self._warmup is not None:
                out["vae_warmup"] = self._warmup.result().clock.between("decode_start",
                                                                        "postprocess")
            self._setup_seconds = out
        return self._setup_seconds

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
        """Generate the next block and wait for its frames."""
        return self.submit_block(pad_silence).result()

    def submit_block(self, pad_silence: bool = False) -> PendingFrames:
        """Run the next block's steps and queue its decode. Missing audio is an error unless
        `pad_silence` (the block's real-time deadline has passed): it is then silence."""
        first, last = self.next_frame, self.next_frame + FRAMES_PER_BLOCK - 1
        silent = 0
        if not self.audio.ready(last):
            if not pad_silence:
                raise RuntimeError(f"audio for frames {first}..{last} has not arrived; pass "
                                   "pad_silence=True once the block's deadline has passed")
            silent = self.audio.pad_silence(last)
        started = time.perf_counter()
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
                self._sink_shared = False  # the session's own: never in the avatar cache
                self._keep_reference_only()
            block = self._block_input(b, audio)
            f = self.cfg.block_frames
            noise = block_noise(self.params.seed, b, (1, 16, f, *self.latent_hw))
            x = to_device(noise, self.device)
            clock.mark("inputs")  # (a sink refresh lands here, not in a step)
            for stage in self.stages:
                v = stage.velocity(x, block)
                if self.step_observer is not None:
                    self.step_observer(b, stage.step, x, v, block)
                x = stage.update(x, v)
                clock.mark(f"step{stage.step}")
            if b == 0:
                self._first_latent = x[:, :, :1].clone()
            z = x.to(m.dtype)
            vae, cache, cl = m.vae, self.decode_cache, self.speed.vae_channels_last
            pending = self.decoder.submit(lambda: decode_block(vae, z, cache, cl), inputs=(z,))
        self.block += 1
        return PendingFrames(b, first, silent, clock, self.schedule.steps, pending,
                             self.decoder.overlapped, started)

    def _block_input(self, b: int, audio: AudioTokens) -> BlockInput:
        """Block b's shared inputs; RoPE angles on the device, once for all steps and layers."""
        cfg = self.models.dit.cfg
        f = self.cfg.block_frames
        frame0 = b * f
        h2, w2 = self.latent_hw[0] // 2, self.latent_hw[1] // 2
        pinned = self.params.ref_ahead
        ahead = tuple(pinned if pinned is not None else ref_ahead(self.params.seed, b, i)
                      for i in range(self.schedule.steps))
        ref_rope: tuple[Rope, ...] = tuple(
            self.rope.grid(max(cfg.ref_time, frame0 + d), 1, h2, w2) for d in ahead)
        return BlockInput(b, frame0, audio, ahead, self.rope.grid(frame0, f, h2, w2), ref_rope)

    def seek(self, block: int) -> None:
        """Continue at `block` (the engine skips ahead when it falls behind real time). The
        rings keep their older keys, at their true positions."""
        if block < self.block:
            raise ValueError(f"cannot seek back from block {self.block} to {block}")
        self.block = block

    @property
    def sink_tokens(self) -> int:
        """Tokens of the sink each step attends to (reference + motion)."""
        return self.stages[0].kv.sink_tokens if self.stages else int(self.cond.sink.keys.shape[2])

    def state_nbytes(self) -> int:
        """Bytes of per-session state that could grow: rings, VAE cache, audio buffer."""
        rings = sum(s.kv.nbytes for s in self.stages)
        return rings + self.decode_cache.nbytes() + self.audio.buffer.nbytes
