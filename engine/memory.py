"""The GPU memory an engine needs, by arithmetic from the model configs, checked before loading.

One GPU holds the DiT, the VAE and wav2vec2, and per session: one K/V buffer per denoising step
(its ring of 12 latent frames plus its copy of the sink), the session's sink and text K/V, and
the decoder's causal cache; umT5 (11 GB in bf16) too when it lives on the GPU. At 704x384 one
step's ring alone is 10.4 GB in bf16 and the weights 32.6 GB, so bf16 at that size needs an
80+ GB card and FP8 (16.9 GB of weights) is what brings it onto one. The check runs before a
single weight is read and names the size, the card's memory and what would fit.

Counts come from the models built on the meta device (exact parameter counts, exact decoder
cache by a meta-device decode); activations are estimates (a step's widest tensors, and the
decoder's full-resolution feature maps with their float32 norm temporaries).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from engine.errors import ConfigError
from engine.models.dit import DiTConfig, WanS2VDiT
from engine.models.fp8 import KEEP_PRECISION
from engine.models.text import UMT5Dims
from engine.models.vae import CausalCache, VAEConfig, WanVAE
from engine.sizing import generation_size, parse_area

GB = 1e9
GIB = 1 << 30
RESERVE_BYTES = int(1.5 * GB)  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
SIZES = ("704*384", "576*320", "448*256")  # the generation tiers, largest first


# 1. Pieces --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # meta-device models: cheap, not free
def dit_weight_bytes(cfg: DiTConfig, dtype_bytes: int = 2, fp8: bool = False,
                     fp32_prefixes: tuple[str, ...] = WanS2VDiT.keep_fp32_prefixes) -> int:
    """Bytes of the DiT's weights: FP8 linears take 1 byte a weight (plus a scale), the rest
    `dtype_bytes`, except the float32 parameters (the causal audio encoder)."""
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    fp8_weights = set()
    if fp8:
        fp8_weights = {f"{n}.weight" for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and not n.startswith(KEEP_PRECISION)}
    total = 0
    for name, p in model.named_parameters():
        if name in fp8_weights:
            total += p.numel() + 4 * p.shape[0]  # e4m3 values, a float32 scale per row at most
        elif name.startswith(fp32_prefixes):
            total += 4 * p.numel()
        else:
            total += dtype_bytes * p.numel()
    return total


def params_of(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=64)  # meta-device models: cheap, not free
def vae_params(cfg: VAEConfig) -> int:
    with torch.device("meta"):
        return params_of(WanVAE(cfg))


@functools.lru_cache(maxsize=64)  # meta-device models: cheap, not free
def t5_params(dims: UMT5Dims) -> int:
    from engine.models.text import build_encoder

    with torch.device("meta"):
        return params_of(build_encoder(dims))


@functools.lru_cache(maxsize=64)  # meta-device models: cheap, not free
def decoder_cache_bytes(cfg: VAEConfig, latent_h: int, latent_w: int, dtype: torch.dtype,
                        warmup_latents: int = 7) -> int:
    """The decoder's causal cache after a warm-up, measured by decoding on the meta device."""
    with torch.device("meta"):
        vae = WanVAE(cfg).to(dtype)
        cache = CausalCache()
        vae.decode(torch.empty(1, cfg.z_dim, warmup_latents, latent_h, latent_w, dtype=dtype),
                   cache)
    return cache.nbytes()


def tokens_per_frame(size: str) -> int:
    """DiT tokens of one latent frame at most, for a size budget (8x VAE, 2x2 patches)."""
    return parse_area(size) // 256


def ring_bytes(cfg: DiTConfig, size: str, ring_frames: int = 12, dtype_bytes: int = 2) -> int:
    """One denoising step's ring: K and V of `ring_frames` latent frames in every layer."""
    return cfg.num_layers * 2 * ring_frames * tokens_per_frame(size) * cfg.dim * dtype_bytes


def sink_tokens(size: str) -> int:
    """Reference + FramePack tokens: 2.5 frames of tokens (1 + 1 + 1/4 + 4/16)."""
    return (5 * tokens_per_frame(size)) // 2


def step_attention_shape(size: str, ring_frames: int = 12, block_frames: int = 3
                         ) -> tuple[int, int]:
    """(queries, keys) of one full-ring step's self-attention."""
    tpf = tokens_per_frame(size)
    return block_frames * tpf, ring_frames * tpf + sink_tokens(size)


def sink_bytes(cfg: DiTConfig, size: str, dtype_bytes: int = 2) -> int:
    """K and V of the sink in every layer."""
    return cfg.num_layers * 2 * sink_tokens(size) * cfg.dim * dtype_bytes


# 2. The plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per item for one configuration; `total` is what the card must hold."""

    size: str
    dtype: str
    fp8: bool
    sessions: int
    items: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def format(self) -> str:
        rows = [f"  {k:20s} {v / GB:7.2f} GB" for k, v in self.items.items()]
        return "\n".join([*rows, f"  {'total':20s} {self.total / GB:7.2f} GB "
                                 f"({self.total / GIB:.1f} GiB)"])

    def summary(self) -> str:
        top = sorted(self.items.items(), key=lambda kv: -kv[1])[:4]
        return ", ".join(f"{k} {v / GB:.1f}" for k, v in top)


W2V_LARGE_PARAMS = 315_438_720  # wav2vec2-large-xlsr-53 without its CTC head


def plan_memory(dit: DiTConfig, vae: VAEConfig, size: str, *, steps: int = 4,
                dtype: torch.dtype = torch.bfloat16, fp8: bool = False, sessions: int = 1,
                ring_frames: int = 12, block_frames: int = 3, t5: UMT5Dims | None = None,
                wav2vec_params: int = W2V_LARGE_PARAMS, avatar_cache_bytes: int = 0,
                parts: tuple[str, ...] = ("dit", "vae", "wav2vec"), audio_encoder: bool = True,
                wav2vec_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    """The GPU memory of an engine whose sessions use at most `size` (a W*H area budget).

    `t5`: the text encoder's dims when it lives on this GPU (None: elsewhere).
    `avatar_cache_bytes`: the per-avatar cache's budget. A session keeps only the sink's
    reference keys of its own (its steps hold the rest); a cached avatar holds a whole sink, its
    text K/V and a primed decoder, shared with the session using it: counting the whole budget
    on top is an upper bound.
    `parts`, `steps` and `audio_encoder` describe one rank of a pipeline (`engine.parallel`):
    the models it holds, the steps it runs, and whether it keeps the DiT's audio encoder (only
    the rank that computes the audio tokens does).
    """
    b = torch.finfo(dtype).bits // 8
    tpf = tokens_per_frame(size)
    h, w = generation_size(384, 704, parse_area(size))
    lat_h, lat_w = h // vae.spatial_stride, w // vae.spatial_stride
    items: dict[str, int] = {}
    if "dit" in parts:
        items["dit_weights"] = dit_weight_bytes(dit, b, fp8) - (
            0 if audio_encoder else audio_encoder_bytes(dit))
    if "vae" in parts:
        items["vae_weights"] = vae_params(vae) * b
    if "wav2vec" in parts:
        items["wav2vec2_weights"] = wav2vec_params * (torch.finfo(wav2vec_dtype).bits // 8)
    if t5 is not None:
        items["text_encoder"] = t5_params(t5) * b
    per_session: dict[str, int] = {}
    if "dit" in parts:
        per_session.update({
            "rings": steps * ring_bytes(dit, size, ring_frames, b),
            "step_sinks": steps * sink_bytes(dit, size, b),
            # the reference's keys: half of 1 of 2.5 frames' K/V (its values stay in the buffers)
            "session_sink": sink_bytes(dit, size, b) // 5,
            "text_kv": dit.num_layers * 2 * dit.text_len * dit.dim * b})
    if "vae" in parts:
        per_session["decoder_cache"] = decoder_cache_bytes(vae, lat_h, lat_w, dtype)
    for k, v in per_session.items():
        items[k] = sessions * v
    # activations: a step's widest tensors (float32 residual and its temporaries, the FFN's
    # hidden layer) and the decoder's full-resolution maps (float32 norm temporaries) at once,
    # since the decode runs beside the next block's steps
    tokens = block_frames * tpf
    step = tokens * (dit.dim * 4 * 6 + dit.ffn_dim * b * 2) if "dit" in parts else 0
    decode = 10 * vae.dim * h * w * vae.temporal_stride * b if "vae" in parts else 0
    items["activations"] = step + decode
    if avatar_cache_bytes:
        items["avatar_cache"] = avatar_cache_bytes
    return MemoryPlan(size, str(dtype).removeprefix("torch."), fp8, sessions, items)


@functools.lru_cache(maxsize=64)  # meta-device models: cheap, not free
def audio_encoder_bytes(cfg: DiTConfig) -> int:
    """The DiT's causal audio encoder (kept in float32)."""
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    return 4 * params_of(model.casual_audio_encoder)


def avatar_entry_bytes(dit: DiTConfig, vae: VAEConfig, size: str,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """One cached avatar: its whole sink, text K/V and primed decoder (latents are small)."""
    b = torch.finfo(dtype).bits // 8
    h, w = generation_size(384, 704, parse_area(size))
    s = vae.spatial_stride
    return (sink_bytes(dit, size, b) + dit.num_layers * 2 * dit.text_len * dit.dim * b
            + decoder_cache_bytes(vae, h // s, w // s, dtype))


# 3. The check -----------------------------------------------------------------------------------


def check_fits(plan: MemoryPlan, capacity: int, device: str, alternatives: dict[str, MemoryPlan]
               ) -> None:
    """Raise a ConfigError naming the size, the card and what would fit, when `plan` does not
    fit in `capacity` bytes (less the reserve for the CUDA context and workspaces)."""
    usable = capacity - RESERVE_BYTES
    if plan.total <= usable:
        return
    fits = [f"{name} (about {p.total / GB:.0f} GB)" for name, p in alternatives.items()
            if p.total <= usable]
    what = "; ".join(fits) if fits else "none of the sizes and precisions of one GPU"
    raise ConfigError(
        f"engine.max_size={plan.size!r} with {'FP8' if plan.fp8 else plan.dtype} weights and "
        f"{plan.sessions} session(s) needs about {plan.total / GB:.1f} GB of GPU memory "
        f"({plan.summary()} GB, ...), but {device} has {capacity / GB:.1f} GB "
        f"({capacity / GIB:.1f} GiB), of which {usable / GB:.1f} GB are usable. What would fit "
        f"here: {what}; or a multi-GPU layout (one denoising step per GPU holds one ring). "
        f"The plan:\n{plan.format()}")


def alternatives_for(dit: DiTConfig, vae: VAEConfig, size: str, fp8: bool, **kw: object
                     ) -> dict[str, MemoryPlan]:
    """Plans for the other choices the error can suggest: FP8, then smaller sizes."""
    out: dict[str, MemoryPlan] = {}
    if not fp8:
        out[f"fp8 = true at max_size = \"{size}\""] = plan_memory(dit, vae, size, fp8=True, **kw)  # type: ignore[arg-type]
    area = parse_area(size)
    for smaller in SIZES:
        if parse_area(smaller) < area:
            for f in sorted({fp8, True}):
                label = f"max_size = \"{smaller}\"" + (" with fp8 = true" if f and not fp8 else "")
                out[label] = plan_memory(dit, vae, smaller, fp8=f, **kw)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class Fit:
    """What `fit_engine` decided: the plan, where umT5 goes, and the avatar cache's budget."""

    plan: MemoryPlan
    text_on_device: bool
    avatar_cache_bytes: int


def fit_engine(dit: DiTConfig, vae: VAEConfig, t5: UMT5Dims, *, size: str, steps: int,
               dtype: torch.dtype, fp8: bool, sessions: int, text_device: str,
               avatar_cache_bytes: int, capacity: int, device: str,
               wav2vec_params: int = W2V_LARGE_PARAMS,
               parts: tuple[str, ...] = ("dit", "vae", "wav2vec", "text"),
               audio_encoder: bool = True, wav2vec_dtype: torch.dtype = torch.float32) -> Fit:
    """Check that the engine fits `capacity` bytes (raising the ConfigError of `check_fits`
    otherwise), put umT5 on the GPU when asked, or for text_device "auto" when it fits with
    10% to spare, and give the avatar cache at most what is left. `parts` and `audio_encoder`:
    one rank of a pipeline (see `plan_memory`); umT5 is only ever where "text" is."""
    models = tuple(p for p in parts if p != "text")
    kw = dict(steps=steps, dtype=dtype, sessions=sessions, wav2vec_params=wav2vec_params,
              parts=models, audio_encoder=audio_encoder, wav2vec_dtype=wav2vec_dtype)
    usable = capacity - RESERVE_BYTES
    if "text" not in parts:
        text_device = "cpu"  # (never used here)
    text_forced = text_device not in ("auto", "cpu")
    base = plan_memory(dit, vae, size, fp8=fp8, t5=t5 if text_forced else None, **kw)  # type: ignore[arg-type]
    check_fits(base, capacity, device, alternatives_for(dit, vae, size, fp8, **kw)
               if "dit" in parts else {})
    with_text = plan_memory(dit, vae, size, fp8=fp8, t5=t5, **kw)  # type: ignore[arg-type]
    text_on_device = "text" in parts and (
        text_forced or (text_device == "auto" and with_text.total <= 0.9 * usable))
    plan = with_text if text_on_device else base
    cache = max(0, min(avatar_cache_bytes, int(0.95 * usable) - plan.total))
    if cache:
        plan = plan_memory(dit, vae, size, fp8=fp8, t5=t5 if text_on_device else None,
                           avatar_cache_bytes=cache, **kw)  # type: ignore[arg-type]
    return Fit(plan, text_on_device, cache)


def cuda_capacity(device: torch.device) -> tuple[int, str]:
    """(bytes the process can use now, a name for the card) of a CUDA device."""
    free, total = torch.cuda.mem_get_info(device)
    name = torch.cuda.get_device_name(device)
    return min(free + torch.cuda.memory_reserved(device), total), f"{device} ({name})"


def rounded_gb(n: int) -> float:
    return math.floor(n / GB * 10 + 0.5) / 10
