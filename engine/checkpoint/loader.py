"""Load checkpoint components onto their device and dtype, strictly and with progress.

Each model is built on the meta device and every tensor is read once (safetensors per tensor,
.pth memory-mapped), converted on the way to the target device/dtype and assigned in place: host
memory holds one tensor at a time, never a full float32 copy of the model. The LoRA is merged
into its target weights as they arrive. A component whose keys or shapes do not match exactly is
refused with its load report.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.checkpoint import inspect
from engine.checkpoint.files import load_pth_mmap
from engine.checkpoint.layout import CheckpointLayout
from engine.checkpoint.lora import merged_weight
from engine.checkpoint.report import ComponentReport
from engine.errors import CheckpointError
from engine.models import audio as audio_model
from engine.models import text as text_model
from engine.models import vae as vae_model
from engine.models.dit import WanS2VDiT
from engine.models.fp8 import FP8Linear, quantize_on_load, release_scratch, weight_scratch
from engine.progress import ProgressFn

log = logging.getLogger(__name__)


def _refuse(report: ComponentReport) -> CheckpointError:
    return CheckpointError(f"cannot load {report.name}:\n{report.format()}", report)


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `key` of `model` with `value`."""
    owner, _, name = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer")


def finish_module(model: nn.Module, label: str) -> None:
    """Refuse a model with tensors still on the meta device; freeze it for inference."""
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise CheckpointError(f"{label}: {len(left)} tensors were never loaded, e.g. {left[:3]}")
    model.eval().requires_grad_(False)


@dataclass
class _Counter:
    label: str
    total: int
    progress: ProgressFn | None
    done: int = 0

    def add(self, t: torch.Tensor) -> None:
        self.done += t.numel() * t.element_size()
        if self.progress is not None:
            self.progress(self.label, min(self.done, self.total), self.total)


# 1. DiT + LoRA ----------------------------------------------------------------------------------


def load_dit(layout: CheckpointLayout, device: torch.device | str, dtype: torch.dtype,
             lora: str | Path | None = None, lora_alpha: float = 64.0, use_lora: bool = True,
             progress: ProgressFn | None = None, fp8_scaling: str | None = None) -> WanS2VDiT:
    """The DiT with the Live-Avatar LoRA merged (unless `use_lora` is false). With
    `fp8_scaling`, the linears FP8 replaces are quantised as their weights are read (after the
    LoRA merge), so the bf16 model never exists whole (engine/models/fp8.py)."""
    dit = inspect.inspect_dit(layout)
    if not dit.report.ok:
        raise _refuse(dit.report)
    assert dit.config is not None and dit.tensors is not None and dit.expected is not None
    lora_path = layout.lora(lora) if use_lora else None
    lora_rep, plan, _ = inspect.inspect_lora(lora_path, dit, lora_alpha,
                                             required=use_lora and lora is not None)
    if lora_rep is not None and not lora_rep.ok:
        raise _refuse(lora_rep)
    if use_lora and lora_path is None:
        log.warning("no Live-Avatar LoRA found (LiveAvatar/liveavatar.safetensors inside or beside "
                    "%s): running the base Wan2.2-S2V weights, which are not trained for "
                    "4-step causal streaming", layout.root)
    for note in dit.report.notes:
        log.info("dit: %s", note)

    with torch.device("meta"):
        model = WanS2VDiT(dit.config)
    fp32_prefixes = model.keep_fp32_prefixes
    by_file: dict[Path, list[str]] = {}
    for key in dit.expected:
        by_file.setdefault(dit.tensors[key].file, []).append(key)
    counter = _Counter("dit", sum(dit.tensors[k].nbytes for k in dit.expected), progress)
    with ExitStack() as stack:
        lora_f = stack.enter_context(safe_open(str(lora_path), "pt")) if plan else None
        targets = {m + ".weight": roles for m, roles in plan.pairs.items()} if plan else {}
        overrides = plan.overrides if plan else {}
        for path, keys in sorted(by_file.items()):
            with safe_open(str(path), "pt") as f:
                for key in keys:
                    # a full tensor in the LoRA file replaces the base weight (upstream loads
                    # the file non-strictly on top of the model)
                    if lora_f is not None and key in overrides:
                        t = lora_f.get_tensor(overrides[key])
                    else:
                        t = f.get_tensor(key)
                    counter.add(t)
                    want = torch.float32 if key.startswith(fp32_prefixes) else dtype
                    with weight_scratch(model, key, device, fp8_scaling):
                        t = t.to(device=device, dtype=want)
                        if lora_f is not None and key in targets:
                            roles = targets[key]
                            alpha = (lora_f.get_tensor(roles["alpha"]) if "alpha" in roles
                                     else lora_alpha)
                            t = merged_weight(t, lora_f.get_tensor(roles["A"]),
                                              lora_f.get_tensor(roles["B"]), alpha)
                        if fp8_scaling is None or not quantize_on_load(model, key, t,
                                                                       fp8_scaling):
                            set_tensor(model, key, t)
                        del t
    finish_module(model, "dit")
    if fp8_scaling is not None:
        release_scratch(device)
        log.info("fp8: %d DiT linears quantised to e4m3 as they were read (%s scaling)",
                 sum(isinstance(m, FP8Linear) for m in model.modules()), fp8_scaling)
    return model


# 2. VAE -----------------------------------------------------------------------------------------


def load_vae(layout: CheckpointLayout, device: torch.device | str, dtype: torch.dtype,
             progress: ProgressFn | None = None) -> vae_model.WanVAE:
    rep, cfg = inspect.inspect_vae(layout)
    if not rep.ok or cfg is None:
        raise _refuse(rep)
    sd = load_pth_mmap(layout.vae, "VAE weights")
    with torch.device("meta"):
        model = vae_model.WanVAE(cfg)
    counter = _Counter("vae", rep.nbytes, progress)
    for key, t in sd.items():
        counter.add(t)
        set_tensor(model, key, t.to(device=device, dtype=dtype))
    finish_module(model, "vae")
    return model


# 3. Text encoder --------------------------------------------------------------------------------


def load_text_encoder(layout: CheckpointLayout, device: torch.device | str, dtype: torch.dtype,
                      text_len: int = 512, progress: ProgressFn | None = None
                      ) -> text_model.TextEncoder:
    rep, dims = inspect.inspect_t5(layout)
    if not rep.ok or dims is None:
        raise _refuse(rep)
    tokenizer = inspect.load_tokenizer(layout.tokenizer)
    sd = load_pth_mmap(layout.t5, "umT5 encoder weights")
    with torch.device("meta"):
        model = text_model.build_encoder(dims)
    counter = _Counter("t5", rep.nbytes, progress)
    for key, t in sd.items():
        counter.add(t)
        set_tensor(model, text_model.wan_to_hf_key(key), t.to(device=device, dtype=dtype))
    # the input embedding is tied to `shared`
    model.encoder.embed_tokens = model.shared
    finish_module(model, "t5")
    return text_model.TextEncoder(model, tokenizer, text_len)


# 4. wav2vec2 ------------------------------------------------------------------------------------


def load_wav2vec(layout: CheckpointLayout, device: torch.device | str, dtype: torch.dtype,
                 progress: ProgressFn | None = None) -> audio_model.Wav2Vec2Features:
    w2v = inspect.inspect_wav2vec(layout)
    if not w2v.report.ok or w2v.weights is None or w2v.key_map is None:
        raise _refuse(w2v.report)
    with torch.device("meta"):
        model = audio_model.build_model(w2v.config)  # type: ignore[arg-type]
    counter = _Counter("wav2vec2", w2v.report.nbytes, progress)

    def assign(key: str, t: torch.Tensor) -> None:
        target = w2v.key_map.get(key)  # type: ignore[union-attr]
        if target is not None:
            counter.add(t)
            set_tensor(model, target, t.to(device=device, dtype=dtype if t.is_floating_point()
                                           else t.dtype))

    if w2v.weights.suffix == ".safetensors":
        with safe_open(str(w2v.weights), "pt") as f:
            for key in f.keys():
                assign(key, f.get_tensor(key))
    else:
        for key, t in load_pth_mmap(w2v.weights, "wav2vec2 weights").items():
            assign(key, t)
    finish_module(model, "wav2vec2")
    return audio_model.Wav2Vec2Features(model)


# 5. Everything a generator needs ----------------------------------------------------------------


@dataclass
class EngineModels:
    """The loaded model set of one process, shared by all its sessions (weights only: every
    session owns its own caches)."""

    dit: WanS2VDiT
    vae: vae_model.WanVAE
    text: text_model.TextEncoder
    wav2vec: audio_model.Wav2Vec2Features
    device: torch.device
    dtype: torch.dtype
    random_weights: bool = False  # built by engine.random_weights: real shapes, noise out


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto' picks CUDA when present; dtype 'auto' is bfloat16 on CUDA, float32 on CPU."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for CUDA but torch sees no GPU; set "
                              "[engine] device = \"cpu\" or run on a GPU machine")
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return dev, getattr(torch, dtype)


def resolve_text_device(text_device: str, device: torch.device) -> torch.device:
    """Where umT5 runs: 'auto' is the compute device (on a GPU the memory check may move it to
    the CPU instead, see engine.memory.fit_engine), else the named device."""
    if text_device == "auto":
        return device
    return torch.device(text_device)


def load_models(checkpoint: str | Path, device: torch.device, dtype: torch.dtype,
                lora: str | Path | None = None, lora_alpha: float = 64.0,
                text_device: torch.device | None = None,
                progress: ProgressFn | None = None,
                fp8_scaling: str | None = None,
                audio_dtype: torch.dtype = torch.float32) -> EngineModels:
    """Load and check every component. wav2vec2 is `audio_dtype` (float32 as upstream runs it,
    whatever `dtype` is); umT5 goes to `text_device` (default: `device`); `fp8_scaling`: the DiT
    quantised as it loads."""
    parts = load_parts(checkpoint, ("dit", "vae", "text", "wav2vec"), device, dtype, lora=lora,
                       lora_alpha=lora_alpha, text_device=text_device, progress=progress,
                       fp8_scaling=fp8_scaling, audio_dtype=audio_dtype)
    return EngineModels(parts["dit"], parts["vae"], parts["text"], parts["wav2vec"],
                        torch.device(device), dtype)


def load_parts(checkpoint: str | Path, parts: tuple[str, ...], device: torch.device,
               dtype: torch.dtype, lora: str | Path | None = None, lora_alpha: float = 64.0,
               text_device: torch.device | None = None, progress: ProgressFn | None = None,
               fp8_scaling: str | None = None,
               audio_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Some of the components ("dit", "vae", "text", "wav2vec"); the others are None. A rank
    of a pipeline loads only what it runs. `fp8_scaling`: the DiT quantised as it loads;
    `audio_dtype`: wav2vec2's."""
    layout = CheckpointLayout.at(checkpoint)
    started = time.monotonic()
    out: dict[str, Any] = {"dit": None, "vae": None, "text": None, "wav2vec": None}
    if "dit" in parts:
        out["dit"] = load_dit(layout, device, dtype, lora=lora or None, lora_alpha=lora_alpha,
                              progress=progress, fp8_scaling=fp8_scaling)
    if "vae" in parts:
        out["vae"] = load_vae(layout, device, dtype, progress=progress)
    if "text" in parts:
        if out["dit"] is not None:
            text_len = out["dit"].cfg.text_len
        else:  # (from the headers: the DiT's text length is in its config)
            dit = inspect.inspect_dit(layout)
            if dit.config is None:
                raise _refuse(dit.report)
            text_len = dit.config.text_len
        out["text"] = load_text_encoder(layout, text_device or device, dtype, text_len=text_len,
                                        progress=progress)
    if "wav2vec" in parts:
        out["wav2vec"] = load_wav2vec(layout, device, audio_dtype, progress=progress)
    log.info("loaded %s from %s on %s (%s) in %.1f s", ", ".join(parts), layout.root, device,
             dtype, time.monotonic() - started)
    return out
