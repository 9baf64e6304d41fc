"""What a rank computes for one session, by role: the same pieces as the single-process
generator (`engine.generator`), each on the rank that holds its model.

- `DiTSession` (every DiT rank): the session's sink and text K/V, and the `DenoiseStage`s of the
  steps this rank owns; it executes each block plan's state changes (`engine.session_plan`) on
  its own share of the state, so every rank applies the same rule at the same block.
- `DecoderSession` (the VAE's rank): the session's decode stream; `encode_avatar` makes what
  every DiT rank needs to set a session up at a size (reference and motion latents, the
  prompt's umT5 states) and primes a decoder for that size.

Each DiT rank prefills its own copy of the sink from those few megabytes of inputs instead of
receiving the sink (2.2 GB at 704x384): the prefill is one forward at t=0 that every rank runs
at the same time, so its wall time is that of one prefill, where sending the K/V would cost 2.2
GB per rank and per refresh over the links (seconds across hosts), and memory for a second copy
while it arrives. The result is the same bits on every rank, since it is the same computation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.api import SessionParams
from engine.avatar_cache import AvatarKey, AvatarState
from engine.conditioning import encode_motion, encode_reference, prefill_sink, prompt_context
from engine.decode import PendingDecode, SessionDecoder
from engine.denoise import Conditioning, SessionDenoiser
from engine.models.audio import Wav2Vec2Features
from engine.models.dit import DiTConfig, WanS2VDiT
from engine.models.fp8 import weight_bytes
from engine.models.text import TextEncoder
from engine.models.vae import WanVAE
from engine.parallel.messages import AvatarInputs, Wire
from engine.sampling import FlowSchedule
from engine.session_plan import BlockPlan, Tier
from engine.speed.prepare import SpeedState


@dataclass
class RankModels:
    """The models one rank loaded (the others are None) and the DiT's architecture, which
    every rank knows (shapes of what it receives, the motion clip's length)."""

    dit_cfg: DiTConfig
    device: torch.device
    dtype: torch.dtype
    dit: WanS2VDiT | None = None
    vae: WanVAE | None = None
    text: TextEncoder | None = None
    wav2vec: Wav2Vec2Features | None = None
    random_weights: bool = False

    def parameter_bytes(self) -> dict[str, int]:
        out = {}
        for name in ("dit", "vae", "text", "wav2vec"):
            model = getattr(self, name)
            if model is not None:
                out[name] = weight_bytes(model)  # (FP8 weights are buffers)
        return out


def keep_what_the_role_runs(models: RankModels, tokens: bool) -> None:
    """A DiT rank that does not compute the audio tokens (rank 0 does, and hands them on) has
    no use for the DiT's audio encoder (95M float32 parameters): it is dropped."""
    if models.dit is not None and not tokens:
        models.dit.casual_audio_encoder = None  # type: ignore[assignment]


class DiTSession:
    """One session on one DiT rank: its steps' K/V and the sink they share."""

    def __init__(self, models: RankModels, speed: SpeedState, params: SessionParams,
                 ring_frames: int, shift: float, owned: Callable[[int], Sequence[int]]):
        assert models.dit is not None
        self.models = models
        self.speed = speed
        self.params = params
        self.shift = shift
        self.denoiser = SessionDenoiser(models.dit, ring_frames, models.dtype, models.device,
                                        speed.layers, owned=owned)
        self.latent_hw = (0, 0)
        self.cache_hit = False

    def set_up(self, inputs: AvatarInputs, tier: Tier) -> None:
        """Conditioning at `inputs`' size: text K/V and the sink (from this rank's avatar cache
        when it has them), then the owned steps' buffers with empty rings."""
        m, cache = self.models, self.speed.avatars
        assert m.dit is not None
        self.denoiser.close()  # the old size's buffers go before the new ones are made
        hh, ww = inputs.ref_latent.data.shape[-2:]
        self.latent_hw = (int(hh), int(ww))
        state = cache.get(inputs.key) if cache is not None else None
        self.cache_hit = state is not None and state.text is not None and state.sink is not None
        with torch.inference_mode(), self.speed.attention.active():
            if state is not None and state.text is not None and state.sink is not None:
                cond, shared = Conditioning(state.text, state.sink, state.motion), True
            else:
                ref = inputs.ref_latent.tensor(m.device)
                motion = inputs.motion.tensor(m.device)
                text = m.dit.text_kv(inputs.context.tensor(m.device))
                if cache is None:  # prefilled into the steps' buffers by `start`
                    cond, shared = Conditioning(text, None, motion, ref=ref), False
                else:
                    sink = prefill_sink(m.dit, ref, motion, text)
                    cond = Conditioning(text, sink, motion)
                    shared = cache.put(inputs.key, AvatarState(ref, motion, text, sink))
            self.denoiser.start(self.latent_hw, cond, FlowSchedule.make(tier.steps, self.shift),
                                shared)

    def apply(self, plan: BlockPlan, resized: Callable[[], AvatarInputs]) -> None:
        """The plan's state changes before its steps (`resized()` waits for the new size's
        inputs)."""
        if plan.resize:
            self.set_up(resized(), plan.tier)
            return
        if plan.cut:
            self.denoiser.empty_rings()
        if plan.new_steps:
            with torch.inference_mode():
                self.denoiser.set_steps(FlowSchedule.make(plan.tier.steps, self.shift))

    def close(self) -> None:
        self.denoiser.close()


class DecoderSession:
    """One session on the VAE's rank: the decode stream of the current size."""

    def __init__(self, decoder: SessionDecoder, latent_hw: tuple[int, int]):
        self.decoder = decoder
        self.latent_hw = latent_hw

    def apply(self, plan: BlockPlan, resized: Callable[[], DecoderSession]) -> None:
        if plan.resize:  # primed when the new size's avatar was encoded
            new = resized()
            self.decoder, self.latent_hw = new.decoder, new.latent_hw
        elif plan.cut:
            self.decoder.cut()

    def submit(self, latents: torch.Tensor) -> PendingDecode:
        return self.decoder.submit(latents)


def encode_avatar(models: RankModels, speed: SpeedState, image: np.ndarray, height: int,
                  width: int, prompt: str, key: AvatarKey, warmup_latents: int
                  ) -> tuple[AvatarInputs, SessionDecoder, dict[str, float], bool]:
    """The encoder's part of a session's set-up at one size, and a decoder primed for it:
    (inputs for the DiT ranks, the decoder, seconds per stage, avatar cache hit)."""
    vae, text = models.vae, models.text
    assert vae is not None and text is not None
    cache = speed.avatars
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    state = cache.get(key) if cache is not None else None
    decoder = SessionDecoder(vae, speed.decoder, speed.vae_channels_last, warmup_latents)
    with torch.inference_mode():
        if state is not None:
            ref, motion = state.ref_latent, state.motion
            decoder.start(motion, models.dtype, primed=state.decode_slots)
        else:
            ref_px, ref = encode_reference(vae, image, height, width, models.device,
                                           models.dtype)
            motion = encode_motion(vae, ref_px, models.dit_cfg.motion_video_frames)
            seconds["encode"] = time.perf_counter() - t
            slots: dict[str, torch.Tensor] | None = {} if cache is not None else None
            decoder.start(motion, models.dtype, keep=slots)
            if cache is not None:
                cache.put(key, AvatarState(ref, motion, decode_slots=slots if slots is not None
                                           else {}))
        t = time.perf_counter()
        context = prompt_context(text, speed.prompts, prompt, models.device)
        seconds["text"] = time.perf_counter() - t
    inputs = AvatarInputs(key, height, width, Wire.of(ref), Wire.of(motion), Wire.of(context))
    return inputs, decoder, seconds, state is not None


def memory_stats(device: torch.device) -> dict[str, Any]:
    """Peak and current device memory of this process (GB), or host RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
                "allocated_gb": round(torch.cuda.memory_allocated(device) / 1e9, 3)}
    import resource

    return {"host_rss_peak_gb": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)}
