"""Validate a checkpoint folder from file headers and meta-device models only (no weights read).

`check_checkpoint` is what `avatar check-checkpoint` prints; the loaders run the same per-component
checks first and refuse to load anything that does not match key for key and shape for shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint.dit_config import read_dit_config
from engine.checkpoint.files import TensorInfo, read_pth_header, read_safetensors_header
from engine.checkpoint.layout import CheckpointLayout
from engine.checkpoint.lora import LoraPlan, plan_lora
from engine.checkpoint.report import ComponentReport, LoadReport
from engine.errors import CheckpointError
from engine.models import audio as audio_model
from engine.models import dit as dit_model
from engine.models import text as text_model
from engine.models import vae as vae_model


@dataclass
class DiTInspection:
    report: ComponentReport
    config: dit_model.DiTConfig | None = None
    tensors: dict[str, TensorInfo] | None = None
    expected: dict[str, tuple[int, ...]] | None = None


def inspect_dit(layout: CheckpointLayout) -> DiTInspection:
    rep = ComponentReport("dit", source=str(layout.root))
    out = DiTInspection(rep)
    try:
        tensors, problems, broken = layout.dit_tensors()
        rep.errors += problems
        cfg, notes = read_dit_config(layout.config, tensors)
    except CheckpointError as exc:
        rep.errors.append(str(exc))
        return out
    rep.notes += notes
    expected = dit_model.expected_state_dict_shapes(cfg)
    rep.compare(expected, tensors)
    # keys of a missing or broken shard are already reported through that shard
    rep.missing = [k for k in rep.missing if k not in broken]
    out.config, out.tensors, out.expected = cfg, tensors, expected
    return out


def inspect_lora(path: Path | None, dit: DiTInspection, alpha: float,
                 required: bool) -> tuple[ComponentReport | None, LoraPlan | None,
                                          dict[str, TensorInfo] | None]:
    if path is None:
        if required:
            rep = ComponentReport("lora")
            rep.errors.append("LiveAvatar/liveavatar.safetensors not found inside or beside the "
                              "folder; pass --lora FILE")
            return rep, None, None
        return None, None, None
    rep = ComponentReport("lora", source=str(path))
    try:
        tensors = read_safetensors_header(path)
    except CheckpointError as exc:
        rep.errors.append(str(exc))
        return rep, None, None
    if dit.expected is None:
        rep.errors.append("cannot check the LoRA: the DiT itself did not load (see above)")
        return rep, None, tensors
    plan = plan_lora(tensors, dit.expected, rep, alpha)
    return rep, plan, tensors


def vae_config_from(tensors: dict[str, TensorInfo]) -> vae_model.VAEConfig:
    """Base width from encoder.conv1, z_dim from conv2; the rest is the Wan2.1 layout."""
    dim = tensors["encoder.conv1.weight"].shape[0] if "encoder.conv1.weight" in tensors else 96
    z = tensors["conv2.weight"].shape[0] if "conv2.weight" in tensors else 16
    return vae_model.VAEConfig(dim=dim, z_dim=z)


def inspect_vae(layout: CheckpointLayout) -> tuple[ComponentReport, vae_model.VAEConfig | None]:
    rep = ComponentReport("vae", source=str(layout.vae))
    try:
        tensors = read_pth_header(layout.vae, "VAE weights")
        cfg = vae_config_from(tensors)
    except (CheckpointError, ValueError) as exc:
        rep.errors.append(str(exc))
        return rep, None
    rep.compare(vae_model.expected_state_dict_shapes(cfg), tensors)
    return rep, cfg


def inspect_t5(layout: CheckpointLayout) -> tuple[ComponentReport, text_model.UMT5Dims | None]:
    rep = ComponentReport("t5", source=str(layout.t5))
    try:
        tensors = read_pth_header(layout.t5, "umT5 encoder weights")
        dims = text_model.UMT5Dims.from_shapes({k: v.shape for k, v in tensors.items()})
    except (CheckpointError, ValueError) as exc:
        rep.errors.append(f"{layout.t5}: {exc}" if isinstance(exc, ValueError) else str(exc))
        return rep, None
    rep.compare(text_model.expected_state_dict_shapes(dims), tensors)
    return rep, dims


def inspect_tokenizer(layout: CheckpointLayout, vocab: int | None) -> ComponentReport:
    rep = ComponentReport("tokenizer", source=str(layout.tokenizer))
    folder = layout.tokenizer
    if not folder.is_dir():
        rep.errors.append(f"{folder}: missing tokenizer folder (google/umt5-xxl/ with "
                          "tokenizer.json or spiece.model)")
        return rep
    try:
        tok = load_tokenizer(folder)
    except CheckpointError as exc:
        rep.errors.append(str(exc))
        return rep
    size = len(tok)
    rep.notes.append(f"{type(tok).__name__}, {size} tokens, pad={tok.pad_token_id}, "
                     f"eos={tok.eos_token_id}")
    if vocab is not None and size > vocab:
        rep.errors.append(f"{folder}: the tokenizer has {size} tokens but the umT5 embedding only "
                          f"{vocab} rows; tokenizer and encoder do not belong together")
    return rep


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / n).exists() for n in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"{folder}: neither tokenizer.json nor spiece.model is present")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for broken folders
        raise CheckpointError(f"{folder}: the tokenizer does not load ({exc})") from None


@dataclass
class Wav2VecInspection:
    report: ComponentReport
    config: object | None = None
    weights: Path | None = None
    key_map: dict[str, str] | None = None  # file key -> model key


def inspect_wav2vec(layout: CheckpointLayout) -> Wav2VecInspection:
    folder = layout.wav2vec
    rep = ComponentReport("wav2vec2", source=str(folder))
    out = Wav2VecInspection(rep)
    if not folder.is_dir():
        rep.errors.append(f"{folder}: missing wav2vec2 folder")
        return out
    try:
        config = audio_model.load_config(folder)
    except (OSError, ValueError, TypeError) as exc:
        rep.errors.append(f"{folder / 'config.json'}: {exc}")
        return out
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin")
                    if (folder / n).exists()), None)
    if weights is None:
        rep.errors.append(f"{folder}: neither model.safetensors nor pytorch_model.bin exists")
        return out
    try:
        found = (read_safetensors_header(weights) if weights.suffix == ".safetensors"
                 else read_pth_header(weights, "wav2vec2 weights"))
    except CheckpointError as exc:
        rep.errors.append(str(exc))
        return out
    with torch.device("meta"):
        model = audio_model.build_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g, v = audio_model.weight_norm_names(model)
    key_map: dict[str, str] = {}
    mapped: dict[str, TensorInfo] = {}
    skipped = []
    for key, info in found.items():
        target = audio_model.to_model_key(key, g, v)
        if target is None:
            skipped.append(key)
            continue
        key_map[key] = target
        mapped[target] = info
    if skipped:
        rep.notes.append(f"{len(skipped)} tensors not used for features ignored "
                         f"({', '.join(sorted({k.split('.')[0] for k in skipped}))})")
    if any(k.endswith("weight_g") for k in found):
        rep.notes.append("legacy weight-norm names (weight_g/weight_v) mapped")
    rep.compare(expected, mapped)
    rep.source = str(weights)
    out.config, out.weights, out.key_map = config, weights, key_map
    return out


def check_checkpoint(root: str | Path, lora: str | Path | None = None,
                     lora_alpha: float = 64.0, require_lora: bool = False) -> LoadReport:
    """Check every component of the folder; nothing is allocated beyond headers and meta models."""
    layout = CheckpointLayout.at(root)
    report = LoadReport(layout.root)
    dit = inspect_dit(layout)
    report.components.append(dit.report)
    lora_rep, _, _ = inspect_lora(layout.lora(lora), dit, lora_alpha, require_lora or lora is not None)
    if lora_rep is not None:
        report.components.append(lora_rep)
    vae_rep, _ = inspect_vae(layout)
    report.components.append(vae_rep)
    t5_rep, dims = inspect_t5(layout)
    report.components.append(t5_rep)
    report.components.append(inspect_tokenizer(layout, dims.vocab if dims else None))
    w2v = inspect_wav2vec(layout)
    report.components.append(w2v.report)
    _cross_check(dit, dims, w2v)
    return report


def _cross_check(dit: DiTInspection, dims: text_model.UMT5Dims | None,
                 w2v: Wav2VecInspection) -> None:
    """The components must fit together: text width, audio width and layer count."""
    cfg = dit.config
    if cfg is None or dit.report.errors:
        return  # shapes may be partly unknown; the errors above come first
    if dims is not None and dims.dim != cfg.text_dim:
        dit.report.errors.append(
            f"text_embedding.0.weight takes {cfg.text_dim}-wide text states but the umT5 encoder "
            f"outputs {dims.dim}: the DiT and {text_model.__name__.split('.')[-1]} encoder files "
            "do not belong together")
    wc = w2v.config
    if wc is not None:
        hidden, layers = wc.hidden_size, wc.num_hidden_layers + 1  # type: ignore[attr-defined]
        if hidden != cfg.audio_dim:
            dit.report.errors.append(
                f"casual_audio_encoder.encoder.conv1_local.conv.weight takes {cfg.audio_dim}-wide "
                f"audio features but wav2vec2 hidden_size is {hidden}")
        if layers != cfg.audio_layers:
            dit.report.errors.append(
                f"casual_audio_encoder.weights mixes {cfg.audio_layers} hidden states but wav2vec2 "
                f"has {layers} (num_hidden_layers + 1)")
