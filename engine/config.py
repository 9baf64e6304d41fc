"""The `[engine]` section of config.toml as frozen dataclasses. Torch-free.

Only run-time knobs live here; the model architecture comes from the checkpoint's config.json.
Validation errors name the dotted key, the bad value and the accepted range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")


def _check_keys(section: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; accepted: {sorted(allowed)}")


def _take(section: str, raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = raw.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{key}={value!r}: expected {kind.__name__}")
    return value


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is out of range: accepted {lo}..{hi}")


@dataclass(frozen=True)
class SamplingConfig:
    """`[engine.sampling]`: the few-step flow-matching schedule."""

    steps: int = 4
    shift: float = 3.0
    seed: int = 0

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> SamplingConfig:
        sec = "engine.sampling"
        _check_keys(sec, raw, {f.name for f in fields(cls)})
        cfg = cls(steps=_take(sec, raw, "steps", int, cls.steps),
                  shift=_take(sec, raw, "shift", float, cls.shift),
                  seed=_take(sec, raw, "seed", int, cls.seed))
        _in_range(f"{sec}.steps", cfg.steps, 1, 50)
        _in_range(f"{sec}.shift", cfg.shift, 0.1, 20.0)
        return cfg


@dataclass(frozen=True)
class EngineConfig:
    """`[engine]`: which engine runs and where its weights and devices are."""

    checkpoint: str = ""  # empty: the CPU preview engine (no weights)
    lora: str = ""  # empty: LiveAvatar/liveavatar.safetensors inside or beside the checkpoint
    lora_alpha: float = 64.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    audio_left_context_s: float = 4.0  # wav2vec2 window before each block
    audio_lookahead_s: float = 0.16  # and after it (adds this much latency)
    max_sessions: int = 0  # 0: the engine's default (preview 8, wan 1 per process)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> EngineConfig:
        raw = dict(raw or {})
        sec = "engine"
        sampling = raw.pop("sampling", {})
        if not isinstance(sampling, dict):
            raise ConfigError(f"[engine.sampling] must be a table, got {sampling!r}")
        _check_keys(sec, raw, {f.name for f in fields(cls)} - {"sampling"})
        cfg = cls(
            checkpoint=_take(sec, raw, "checkpoint", str, cls.checkpoint),
            lora=_take(sec, raw, "lora", str, cls.lora),
            lora_alpha=_take(sec, raw, "lora_alpha", float, cls.lora_alpha),
            device=_take(sec, raw, "device", str, cls.device),
            dtype=_take(sec, raw, "dtype", str, cls.dtype),
            audio_left_context_s=_take(sec, raw, "audio_left_context_s", float,
                                       cls.audio_left_context_s),
            audio_lookahead_s=_take(sec, raw, "audio_lookahead_s", float, cls.audio_lookahead_s),
            max_sessions=_take(sec, raw, "max_sessions", int, cls.max_sessions),
            sampling=SamplingConfig.parse(sampling),
        )
        _in_range(f"{sec}.audio_left_context_s", cfg.audio_left_context_s, 0.0, 30.0)
        _in_range(f"{sec}.audio_lookahead_s", cfg.audio_lookahead_s, 0.0, 2.0)
        _in_range(f"{sec}.max_sessions", cfg.max_sessions, 0, 256)
        _in_range(f"{sec}.lora_alpha", cfg.lora_alpha, 1e-6, 1e6)
        if cfg.dtype not in DTYPES:
            raise ConfigError(f"engine.dtype={cfg.dtype!r}: accepted {DTYPES}")
        if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
            raise ConfigError(f"engine.device={cfg.device!r}: accepted auto, cpu, cuda, cuda:N")
        return cfg
