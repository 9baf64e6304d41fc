"""Random weights at real shapes: the whole engine without a checkpoint (`--random-weights`, bench).

Every model is built on the meta device and each parameter is then created directly on its device
in its final dtype and filled there, one tensor at a time (fan-in scaled normals, norm gains 1,
biases 0), so a 14B model never exists as a float32 copy and never touches host memory on a GPU.
The output of such an engine is noise; its speed and memory are the real ones, which is what the
mode is for. The tokenizer is the tiny checkpoint's (its ids fit any vocabulary); prompts then
tokenise differently from umT5's, which changes nothing but the values of the text tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.checkpoint.loader import EngineModels, finish_module, set_tensor
from engine.checkpoint.tiny import (
    TINY_DIT,
    TINY_T5,
    TINY_VAE,
    TINY_W2V,
    TOKENIZER_SPECIAL,
    build_tokenizer,
)
from engine.errors import ConfigError
from engine.models import audio as audio_model
from engine.models import text as text_model
from engine.models import vae as vae_model
from engine.models.dit import DiTConfig, WanS2VDiT
from engine.models.fp8 import quantize_on_load, release_scratch, weight_scratch
from engine.progress import ProgressFn

log = logging.getLogger(__name__)

# wav2vec2-large-xlsr-53-english, as its config.json describes it
W2V_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33,
    layer_norm_eps=1e-5, hidden_act="gelu", feat_extract_activation="gelu", pad_token_id=0)


@dataclass(frozen=True)
class ModelShapes:
    """The architecture of every component of one engine."""

    name: str
    dit: DiTConfig
    vae: vae_model.VAEConfig
    t5: text_model.UMT5Dims
    wav2vec: dict[str, Any] = field(default_factory=dict)


def model_shapes(name: str, device: torch.device) -> ModelShapes:
    """'14B' (the published model), 'tiny' (the test checkpoint's) or 'auto' (14B on CUDA)."""
    if name == "auto":
        name = "14B" if device.type == "cuda" else "tiny"
    if name == "14B":
        return ModelShapes("14B", DiTConfig(), vae_model.VAEConfig(), text_model.UMT5Dims(),
                           W2V_LARGE)
    if name == "tiny":
        w2v = {k: v for k, v in TINY_W2V.items() if k not in ("architectures", "model_type")}
        return ModelShapes("tiny", TINY_DIT, TINY_VAE, TINY_T5, w2v)
    raise ConfigError(f"engine.random_shapes={name!r}: accepted auto, 14B, tiny")


# parameters whose module initialises them to a constant that the model divides by
CONSTANT_INIT = {"casual_audio_encoder.weights": 0.01}


def _is_gain(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return leaf == "gamma" or (leaf == "weight" and ("norm" in owner or "layer_norm" in owner))


def fill_random(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int,
                keep_fp32: tuple[str, ...] = (), progress: ProgressFn | None = None,
                label: str = "model", fp8_scaling: str | None = None) -> None:
    """Give every (meta) parameter and buffer of `model` a random value on `device`; with
    `fp8_scaling`, each linear FP8 replaces is quantised as soon as its weight is made.

    Fan-in scaled normals keep activations O(1) through the residual stacks, as trained weights
    do; what matters here is only that the numbers are finite and of realistic magnitude.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = sorted([*model.named_parameters(), *model.named_buffers()])
    total = sum(t.numel() for _, t in tensors)
    done = 0
    for name, meta in tensors:
        want = torch.float32 if name.startswith(keep_fp32) or not meta.is_floating_point() \
            else dtype
        with weight_scratch(model, name, device, fp8_scaling):
            t = torch.empty(meta.shape, dtype=want if meta.is_floating_point() else meta.dtype,
                            device=device)
            if not t.is_floating_point():
                t.zero_()
            elif name in CONSTANT_INIT:
                t.fill_(CONSTANT_INIT[name])
            elif _is_gain(name):
                t.fill_(1.0)
            elif t.dim() >= 2:
                fan_in = max(1, t[0].numel())
                t.normal_(0.0, fan_in ** -0.5, generator=gen)
            else:
                t.zero_()
            if fp8_scaling is None or not quantize_on_load(model, name, t, fp8_scaling):
                set_tensor(model, name, t)
            del t
        done += meta.numel()
        if progress is not None:
            progress(label, done, total)
    if fp8_scaling is not None:
        release_scratch(device)


def random_tokenizer(text_len: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), model_max_length=text_len,
                                   **TOKENIZER_SPECIAL)


PARTS = ("dit", "vae", "text", "wav2vec")


def build_random_models(shapes: ModelShapes, device: torch.device, dtype: torch.dtype,
                        text_device: torch.device | None = None, seed: int = 0,
                        progress: ProgressFn | None = None,
                        fp8_scaling: str | None = None,
                        audio_dtype: torch.dtype = torch.float32) -> EngineModels:
    """Every component at `shapes`, random, on `device` in `dtype` (the DiT's audio encoder in
    float32 and wav2vec2 in `audio_dtype`, as the checkpoint loader keeps them). umT5 is filled
    on `device` and then moved to `text_device` (default: `device`)."""
    parts = build_random_parts(shapes, PARTS, device, dtype, text_device, seed, progress,
                               fp8_scaling, audio_dtype)
    return EngineModels(parts["dit"], parts["vae"], parts["text"], parts["wav2vec"], device,
                        dtype, random_weights=True)


def build_random_parts(shapes: ModelShapes, parts: tuple[str, ...], device: torch.device,
                       dtype: torch.dtype, text_device: torch.device | None = None,
                       seed: int = 0, progress: ProgressFn | None = None,
                       fp8_scaling: str | None = None,
                       audio_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Some of the components ("dit", "vae", "text", "wav2vec"), each filled from its own seed,
    so that a part is the same whatever else is built beside it (the ranks of a pipeline build
    only their own). `fp8_scaling`: the DiT quantised as it is filled; `audio_dtype`: wav2vec2's
    (drawn in it)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; accepted {PARTS}")
    log.warning("RANDOM WEIGHTS: building the %s engine's %s with random weights on %s (%s); "
                "the video will be noise", shapes.name, ", ".join(parts), device,
                str(dtype).removeprefix("torch."))
    out: dict[str, Any] = {p: None for p in PARTS}
    if "dit" in parts:
        with torch.device("meta"):
            dit = WanS2VDiT(shapes.dit)
        fill_random(dit, device, dtype, seed, dit.keep_fp32_prefixes, progress, "dit",
                    fp8_scaling)
        finish_module(dit, "dit")
        out["dit"] = dit
    if "vae" in parts:
        with torch.device("meta"):
            vae = vae_model.WanVAE(shapes.vae)
        fill_random(vae, device, dtype, seed + 1, progress=progress, label="vae")
        finish_module(vae, "vae")
        out["vae"] = vae
    if "text" in parts:
        with torch.device("meta"):
            t5 = text_model.build_encoder(shapes.t5)
        fill_random(t5, device, dtype, seed + 2, progress=progress, label="t5")
        t5.encoder.embed_tokens = t5.shared  # tied, as in the checkpoint
        finish_module(t5, "t5")
        if text_device is not None and text_device != device:
            nn.Module.to(t5, text_device)  # (transformers types .to for its own classes)
        out["text"] = text_model.TextEncoder(t5, random_tokenizer(shapes.dit.text_len),
                                             shapes.dit.text_len)
    if "wav2vec" in parts:
        with torch.device("meta"):
            w2v = audio_model.build_model(_w2v_config(shapes.wav2vec))
        # drawn in `audio_dtype` (converting afterwards would leave holes between the weights)
        fill_random(w2v, device, audio_dtype, seed + 3, progress=progress, label="wav2vec2")
        finish_module(w2v, "wav2vec2")
        out["wav2vec"] = audio_model.Wav2Vec2Features(w2v)
    return out


def _w2v_config(raw: dict[str, Any]) -> Any:
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**raw)
