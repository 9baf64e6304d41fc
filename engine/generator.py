"""Per-session streaming generation: live audio in, 12-frame blocks out, forever, in constant memory.

Set-up (once per session, and again at a size change): the reference image is cropped to the
generation size, VAE-encoded to the reference latent and (as a static 73-frame clip, 4 frames per
encoder call) to 19 motion latents; the prompt is encoded once and its cross-attention K/V cached
per layer; the sink (reference + FramePack motion tokens) is prefilled at t=0; the streaming VAE
decoder is warmed up on the first 7 motion latents (on the decode queue, beside the prefill when
overlapped). All of that comes from the engine's avatar cache (`engine.avatar_cache`) when
another session set up the same image, size and prompt (`engine.conditioning` has the pieces).

Per block b (video frames [12b, 12b+12) = latent frames [3b, 3b+3)), following its plan
(`engine.session_plan`: what a seek, a tier change or the sink refresh does to the state):
1. wav2vec2 features of exactly those frames (streaming window) -> the DiT's audio tokens;
2. noise from (seed, b); RoPE angles of the block's tokens and of each step's rolling-sink
   reference, on the device, once; then `steps` Euler steps, step i being a `DenoiseStage`
   (`engine.denoise`) that owns one K/V buffer [sink | ring] (`engine.kv_cache`) with the
   reference keys re-rotated 4-30 latent frames ahead of the block once per step;
3. when the plan says so, the sink is re-prefilled with the first generated latent frame of the
   segment as the new reference (Live-Avatar's refresh after its first 48-frame clip);
4. the 3 clean latents are decoded with the causal cache carried over -> 12 uint8 RGB frames,
   on the engine's `DecodeQueue` (`engine.decode`): inline, or beside the next block's steps.
   Unlike upstream, which drops the first 3 decoded frames of the stream (and so runs 120 ms
   ahead of its audio), every block keeps all 12: video frame n is always media time n/25 s.

`submit_block` runs 1-3 and queues 4, returning a `PendingFrames` whose frames can be taken the
moment their own decode is done (the engine runtime delivers block b while block b+1's steps
run); `next_block` is submit-then-wait. Nothing in a block waits for the GPU before its frames
are wanted: timings are CUDA events, host inputs are copied asynchronously. The pipeline of
`engine.parallel` runs the same pieces, split over ranks, with the same plans.
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
from engine.conditioning import encode_motion, encode_reference, prefill_sink, prompt_context
from engine.decode import PendingDecode, SessionDecoder, frames_to_numpy
from engine.denoise import (
    BlockInput,
    Conditioning,
    DenoiseStage,
    SessionDenoiser,
    StepObserver,
    block_noise,
    step_seconds,
)
from engine.errors import InputError
from engine.image import check_image
from engine.models.vae import CausalCache
from engine.sampling import FlowSchedule
from engine.session_plan import BlockPlan, SessionSchedule, Tier
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
    # re-anchor the sink on the segment's first generated frame this many blocks into the
    # segment (engine.session_plan); 0: never
    sink_refresh_block: int = 4
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
                 steps: list[int], decode: PendingDecode, overlapped: bool, started: float,
                 tier: Tier | None = None, setup: float = 0.0):
        self.tier = tier
        self.setup = setup
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
        steps = step_seconds(c, self.steps)
        features = c.between("start", "features")
        decode = d.between("decode_start", "decode")
        post = d.between("decode", "postprocess")
        busy = features + sum(steps) + (0.0 if self.overlapped else decode + post)
        self._block = FrameBlock(self.index, self.first_frame, frames, BlockTimings(
            features=features, denoise=sum(steps), decode=decode, total=finished - self.started,
            steps=steps, postprocess=post, busy=busy, setup=self.setup), self.silent,
            tier=None if self.tier is None else (self.tier.size, self.tier.steps))
        return self._block


class StreamGenerator:
    """One session's generator. Not thread-safe: one thread drives it (the engine loop)."""

    def __init__(self, models: EngineModels, params: SessionParams, cfg: StreamConfig | None = None,
                 steps: int = 4, shift: float = 3.0,
                 step_observer: StepObserver | None = None, speed: SpeedState | None = None):
        if params.image is None:
            raise InputError("the Wan engine needs a reference image (an upload or an avatar "
                             "from config)")
        check_image(params.image)
        self.models = models
        self.params = params
        self.cfg = cfg or StreamConfig()
        self.shift = shift
        self.speed = speed or SpeedState.plain(models.device)
        self.decoder = self.speed.decoder
        self.device = models.device
        tier = Tier(params.size, params.steps or steps)
        parse_area(tier.size)  # a bad size is refused before any work
        self.plans = SessionSchedule(tier, self.cfg.sink_refresh_block)
        self.denoiser = SessionDenoiser(models.dit, self.cfg.ring_frames, models.dtype,
                                        self.device, self.speed.layers, observer=step_observer)
        self.decode = SessionDecoder(models.vae, self.decoder, self.speed.vae_channels_last,
                                     self.cfg.warmup_latents)
        self._setup = StageClock(self.device)
        self._setup.mark("start")
        with torch.inference_mode():
            self._set_up(tier, self._setup)
        self.audio = StreamingAudioFeatures(models.wav2vec, self.cfg.audio, self.device)
        self._captured: tuple[int, torch.Tensor] | None = None  # (block, first clean latent)
        self._setup_seconds: dict[str, float] | None = None
        log.info("session generator ready: %dx%d, %d steps, ring %d frames, decode %s",
                 self.width, self.height, self.schedule.steps, self.cfg.ring_frames,
                 self.decoder.mode)

    # set-up ---------------------------------------------------------------------------------

    def _set_up(self, tier: Tier, clock: StageClock) -> None:
        """Everything a size needs: conditioning, the steps' buffers and a primed decoder, from
        the avatar cache when this image, size and prompt were set up before (under
        inference mode)."""
        m, cache, params = self.models, self.speed.avatars, self.params
        assert params.image is not None
        h_img, w_img = params.image.shape[:2]
        self.height, self.width = generation_size(h_img, w_img, parse_area(tier.size))
        stride = m.vae.cfg.spatial_stride
        self.latent_hw = (self.height // stride, self.width // stride)
        self.denoiser.close()  # the old size's buffers go before the new ones are made
        key = (AvatarKey.of(params.image, self.height, self.width, params.prompt)
               if cache is not None else None)
        state = cache.get(key) if cache is not None and key is not None else None
        self.avatar_cache_hit = state is not None
        if state is not None and state.text is not None and state.sink is not None:
            self._warmup = self.decode.start(state.motion, m.dtype, primed=state.decode_slots)
            for stage in ("reference", "motion", "warmup_queued", "text", "prefill"):
                clock.mark(stage)
            cond, shared = Conditioning(state.text, state.sink, state.motion), True
            self.ref_latent = state.ref_latent
        else:
            cond, shared = self._condition(params, clock, key)
        deferred = cond.sink is None
        with self.speed.attention.active():
            self.denoiser.start(self.latent_hw, cond, FlowSchedule.make(tier.steps, self.shift),
                                shared)
        if deferred:
            clock.mark("prefill")

    def _condition(self, params: SessionParams, clock: StageClock, key: AvatarKey | None
                   ) -> tuple[Conditioning, bool]:
        """Reference and motion latents, text K/V and the sink, computed (and cached)."""
        m, cache = self.models, self.speed.avatars
        assert params.image is not None
        with self.speed.attention.active():
            ref_px, self.ref_latent = encode_reference(m.vae, params.image, self.height,
                                                       self.width, m.device, m.dtype)
            clock.mark("reference")
            motion = encode_motion(m.vae, ref_px, m.dit.cfg.motion_video_frames)
            clock.mark("motion")
            slots: dict[str, torch.Tensor] | None = {} if cache is not None else None
            # the warm-up, on the decode queue: when overlapped, beside the text and prefill
            self._warmup = self.decode.start(motion, m.dtype, keep=slots)
            clock.mark("warmup_queued")
            text = m.dit.text_kv(prompt_context(m.text, self.speed.prompts, params.prompt,
                                                m.device))
            clock.mark("text")
            if cache is None or key is None:
                # nothing keeps the whole sink: the denoiser prefills it into its buffers
                # (`start`, which marks "prefill"), so it never sits beside them
                return Conditioning(text, None, motion, ref=self.ref_latent), False
            sink = prefill_sink(m.dit, self.ref_latent, motion, text)
            clock.mark("prefill")
        shared = cache.put(key, AvatarState(self.ref_latent, motion, text, sink,
                                            slots if slots is not None else {}))
        return Conditioning(text, sink, motion), shared

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

    # the session's state, for the engine, the bench and tests ---------------------------------

    @property
    def schedule(self) -> FlowSchedule:
        return self.denoiser.schedule

    @property
    def stages(self) -> list[DenoiseStage]:
        return self.denoiser.stages

    @property
    def cond(self) -> Conditioning:
        return self.denoiser.cond

    @property
    def decode_cache(self) -> CausalCache:
        return self.decode.cache

    @property
    def tier(self) -> Tier:
        """The tier of the next block."""
        return self.plans.tier

    @property
    def block(self) -> int:
        """The index of the next block."""
        return self.plans.next_block

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
        plan = self.plans.plan()
        with torch.inference_mode():
            self._apply(plan)
        setup = time.perf_counter() - started if plan.resize else 0.0  # (host time)
        clock = StageClock(self.device)
        clock.mark("start")
        with torch.inference_mode(), self.speed.attention.active():
            m, b = self.models, plan.index
            feats = self.audio.features(first, FRAMES_PER_BLOCK)
            audio = m.dit.encode_audio(feats)
            clock.mark("features")
            if plan.refresh_from is not None:
                assert self._captured is not None and self._captured[0] == plan.refresh_from
                self.denoiser.refresh(self._captured[1])
                self._captured = None
            block = self.denoiser.block_input(b, audio, self.params.seed, self.params.ref_ahead,
                                              self.cfg.block_frames)
            noise = block_noise(self.params.seed, b, (1, 16, self.cfg.block_frames,
                                                      *self.latent_hw))
            x = to_device(noise, self.device)
            clock.mark("inputs")  # (a sink refresh lands here, not in a step)
            x = self.denoiser.run(x, block, clock)
            if plan.capture:
                self._captured = (b, x[:, :, :1].clone())
            pending = self.decode.submit(x.to(m.dtype))
        return PendingFrames(b, first, silent, clock, self.denoiser.steps, pending,
                             self.decoder.overlapped, started, plan.tier, setup)

    def _apply(self, plan: BlockPlan) -> None:
        """The state changes the block's plan asks for (`engine.session_plan`)."""
        if plan.resize:
            self._set_up(plan.tier, StageClock(self.device))
            log.info("session now at %dx%d, %d steps", self.width, self.height, plan.tier.steps)
            return
        if plan.cut:
            self.denoiser.empty_rings()
            self.decode.cut()
        if plan.new_steps:
            self.denoiser.set_steps(FlowSchedule.make(plan.tier.steps, self.shift))

    def seek(self, block: int) -> None:
        """Continue at `block` (the engine skips ahead when it falls behind real time): the
        rings start empty and the decoder primed afresh; the sink stays
        (`engine.session_plan`)."""
        self.plans.seek(block)

    def set_tier(self, size: str | None = None, steps: int | None = None) -> None:
        """Generate from the next block on at this size budget and step count (None:
        unchanged): a new size re-makes the conditioning, the sink, the rings and the decoder;
        new steps empty the rings (`engine.session_plan`)."""
        if size is not None:
            parse_area(size)
        if steps is not None and not 1 <= steps <= 50:
            raise InputError(f"steps={steps}: accepted 1..50")
        self.plans.set_tier(size, steps)

    @property
    def sink_tokens(self) -> int:
        """Tokens of the sink each step attends to (reference + motion)."""
        return self.denoiser.sink_tokens

    def state_nbytes(self) -> int:
        """Bytes of per-session state that could grow: rings, VAE cache, audio buffer."""
        return self.denoiser.nbytes + self.decode.nbytes + self.audio.buffer.nbytes

    def close(self) -> None:
        self.denoiser.close()
