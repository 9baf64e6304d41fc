"""The DiT's config.json -> `DiTConfig`, never falling back to diffusers' non-14B class defaults.

diffusers writes only `__init__` arguments and drops `patch_size`, `text_dim`, `qk_norm`, ...; a
missing key would silently become a 2048-wide, motioner-enabled model in upstream code. Here each
field comes from, in order: config.json; the tensor shapes (a value a shape determines, such as
text_dim from text_embedding.0.weight, is always read from the shape); the documented 14B value.
Every fallback is reported as a note.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.checkpoint.files import TensorInfo, read_json
from engine.errors import CheckpointError
from engine.models.dit import DiTConfig

ACCEPTED_CLASSES = ("WanModel_S2V", "CausalWanModel_S2V")


def _from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Fields that tensor shapes determine (only those whose tensors are present)."""
    out: dict[str, Any] = {}

    def shape(key: str) -> tuple[int, ...] | None:
        return shapes.get(key)

    if (s := shape("patch_embedding.weight")) is not None:
        out["dim"], out["in_dim"] = s[0], s[1]
    if (s := shape("blocks.0.ffn.0.weight")) is not None:
        out["ffn_dim"] = s[0]
    blocks = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    if blocks:
        out["num_layers"] = len(blocks)
    if (s := shape("text_embedding.0.weight")) is not None:
        out["text_dim"] = s[1]
    if (s := shape("time_embedding.0.weight")) is not None:
        out["freq_dim"] = s[1]
    if (s := shape("head.head.weight")) is not None:
        out["out_dim"] = s[0] // 4
    if (s := shape("cond_encoder.weight")) is not None:
        out["cond_dim"] = s[1]
    if (s := shape("casual_audio_encoder.encoder.conv1_local.conv.weight")) is not None:
        out["audio_dim"] = s[1]
        if "dim" in out:
            out["num_audio_token"] = s[0] // (out["dim"] // 4)
    if (s := shape("casual_audio_encoder.weights")) is not None:
        out["audio_layers"] = s[1]
    out["enable_adain"] = "casual_audio_encoder.encoder.conv1_global.conv.weight" in shapes
    return out


# config.json field -> DiTConfig field, for the fields the file may carry
_JSON_FIELDS = {
    "dim": "dim", "ffn_dim": "ffn_dim", "num_heads": "num_heads", "num_layers": "num_layers",
    "in_dim": "in_dim", "out_dim": "out_dim", "freq_dim": "freq_dim", "text_len": "text_len",
    "eps": "eps", "cond_dim": "cond_dim", "audio_dim": "audio_dim",
    "num_audio_token": "num_audio_token", "audio_inject_layers": "audio_inject_layers",
    "enable_adain": "enable_adain", "zero_timestep": "zero_timestep",
    "add_last_motion": "add_last_motion",
}
# fields diffusers never writes: always taken from the shapes
_SHAPE_ONLY = ("text_dim", "audio_layers")


def read_dit_config(path: Path, tensors: dict[str, TensorInfo]) -> tuple[DiTConfig, list[str]]:
    """Parse config.json against the tensor headers. Returns the config and notes to report."""
    raw = read_json(path, "DiT config")
    notes: list[str] = []
    cls = raw.get("_class_name")
    if cls is not None and cls not in ACCEPTED_CLASSES:
        raise CheckpointError(f"{path}: _class_name={cls!r}; expected one of {ACCEPTED_CLASSES} "
                              "(is this the Wan2.2-S2V-14B folder?)")
    if raw.get("model_type", "s2v") != "s2v":
        raise CheckpointError(f"{path}: model_type={raw['model_type']!r}; only 's2v' is supported")
    if raw.get("enable_motioner", False):
        raise CheckpointError(f"{path}: enable_motioner=true is not supported (the released model "
                              "uses FramePack: enable_framepack=true)")
    if not raw.get("enable_framepack", True):
        raise CheckpointError(f"{path}: enable_framepack=false is not supported")
    if raw.get("adain_mode", "attn_norm") != "attn_norm":
        raise CheckpointError(f"{path}: adain_mode={raw['adain_mode']!r}; only 'attn_norm' exists")
    if raw.get("framepack_drop_mode", "padd") != "padd":
        notes.append(f"framepack_drop_mode={raw['framepack_drop_mode']!r} only matters when "
                     "add_last_motion is false")

    shapes = {k: v.shape for k, v in tensors.items()}
    derived = _from_shapes(shapes)
    default = DiTConfig()
    values: dict[str, Any] = {}
    for f in fields(DiTConfig):
        name = f.name
        json_key = next((j for j, d in _JSON_FIELDS.items() if d == name), None)
        if name in _SHAPE_ONLY and name in derived:
            values[name] = derived[name]
            if json_key and json_key in raw and raw[json_key] != derived[name]:
                notes.append(f"config.json {json_key}={raw[json_key]} ignored: the tensors say "
                             f"{derived[name]}")
        elif json_key is not None and json_key in raw:
            values[name] = raw[json_key]
        elif name in derived:
            values[name] = derived[name]
            notes.append(f"config.json omits {name}; read {derived[name]} from the tensor shapes")
        elif json_key is not None:
            values[name] = getattr(default, name)
            notes.append(f"config.json omits {name}; using the 14B value {values[name]!r}")
    if "audio_inject_layers" in values:
        values["audio_inject_layers"] = tuple(int(i) for i in values["audio_inject_layers"])
    try:
        return DiTConfig(**values), notes
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
