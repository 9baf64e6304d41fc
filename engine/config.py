"""The `[engine]` section of config.toml as frozen dataclasses. Torch-free.

Only run-time knobs live here; the model architecture comes from the checkpoint's config.json.
Validation errors name the dotted key, the bad value and the accepted range.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from engine.errors import ConfigError, InputError
from engine.sizing import parse_area, parse_size

DTYPES = ("auto", "bfloat16", "float16", "float32")
AUDIO_DTYPES = ("float32", "bfloat16")
RANDOM_SHAPES = ("auto", "14B", "tiny")
FP8_SCALINGS = ("tensor", "row")
ATTENTION_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_keys(section: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; accepted: {sorted(allowed)}")


def _take(section: str, raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = raw.get(key, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key}={value!r}: expected true or false")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{key}={value!r}: expected {kind.__name__}")
    return value


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is out of range: accepted {lo}..{hi}")


GROUP_LAUNCHES = ("spawn", "torchrun")


def _one_of(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name}={value!r}: accepted {accepted}")


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
    """`[engine]`: which engine runs, where its weights and devices are, and its speed paths."""

    checkpoint: str = ""  # empty: the CPU preview engine (no weights), unless random_weights
    lora: str = ""  # empty: LiveAvatar/liveavatar.safetensors inside or beside the checkpoint
    lora_alpha: float = 64.0
    random_weights: bool = False  # the real engine at real shapes with random weights
    random_shapes: str = "auto"  # auto (14B on CUDA, tiny on CPU) | 14B | tiny
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    text_device: str = "auto"  # where umT5 lives: auto | cpu | the compute device
    # wav2vec2's weights and math: float32 as upstream runs it, or bfloat16 (half its 1.26 GB:
    # what lets a rank that holds it beside a DiT fit a 24 GB card)
    audio_dtype: str = "float32"
    audio_left_context_s: float = 4.0  # wav2vec2 window before each block
    audio_lookahead_s: float = 0.16  # and after it (adds this much latency)
    max_sessions: int = 0  # 0: the engine's default (preview 8, wan 1 per process)
    max_size: str = "704*384"  # the largest size budget sessions may use (plans for it)
    # more sizes the compile warm-up runs (comma-separated, each at most max_size), so that a
    # session moved to one of them (the latency governor's ladder) never waits for a compile;
    # the server adds its ladder's sizes (stream.config.engine_config)
    warm_up_sizes: str = ""
    # the preview engine's speed: 0 as fast as it draws; S > 0: a block at max_size and
    # sampling.steps takes 0.48 / S s of engine time, less at smaller tiers (area x steps)
    preview_speed: float = 0.0
    preview_marks: bool = False  # the preview stamps audio onsets and frame numbers (probes)
    # time a short warm-up session at max_size when the engine loads on a GPU (admission and
    # /readyz go by it); the Wan engine only: the preview knows its cost without one, and a
    # CPU never runs the real model in real time
    calibrate: bool = True
    # speed paths (engine.speed)
    fp8: bool = False  # e4m3 DiT linears through torch._scaled_mm
    fp8_scaling: str = "tensor"  # tensor | row (per output channel and per token)
    attention_backend: str = "auto"  # auto | default | cudnn | flash | efficient | math
    vae_overlap: bool = True  # decode beside the next block (second CUDA stream / a thread)
    # VAE convolutions in NDHWC: off, measured slower on an H200 (258 vs 192 ms per 704x384
    # block: the causal padding and norms run strided in that layout; docs/bench.md)
    vae_channels_last: bool = False
    # torch.compile of the VAE's norm/SiLU/causal padding between its convolutions (fused
    # elementwise work; about 20 graphs per size, in a session's first blocks)
    vae_compile: bool = False
    avatar_cache_mb: int = 4096  # per-avatar set-up results kept on the device; 0: off
    compile: bool = False  # torch.compile of the DiT layer (4 graphs per size, at start-up)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune...
    # the pipeline across GPUs (engine.parallel)
    layout: str = "1"  # "k" DiT ranks (the last one decodes) or "k+vae"; "1": one process
    group_launch: str = "spawn"  # spawn: the server starts its ranks | torchrun: they join
    group_listen: str = "127.0.0.1:0"  # where the server takes its ranks' control sockets
    rank_timeout_s: float = 4.0  # a rank silent this long (no heartbeat) is hung
    receive_timeout_s: float = 120.0  # a rank's longest wait for a neighbour's block
    group_start_timeout_s: float = 1800.0  # joining, loading and warming up every rank
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    # the speed paths, and their values on the plain path (`avatar bench --baseline`)
    PLAIN: ClassVar[dict[str, Any]] = {"fp8": False, "attention_backend": "default",
                                       "vae_overlap": False, "vae_channels_last": False,
                                       "vae_compile": False, "avatar_cache_mb": 0,
                                       "compile": False}

    @classmethod
    def speed_keys(cls) -> tuple[str, ...]:
        return tuple(cls.PLAIN)

    def plain(self) -> EngineConfig:
        """This configuration with every speed path off: the reference the bench compares to."""
        return replace(self, **self.PLAIN)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None) -> EngineConfig:
        raw = dict(raw or {})
        sec = "engine"
        sampling = raw.pop("sampling", {})
        if not isinstance(sampling, dict):
            raise ConfigError(f"[engine.sampling] must be a table, got {sampling!r}")
        names = [f.name for f in fields(cls) if f.name != "sampling"]
        _check_keys(sec, raw, set(names))
        defaults = cls()
        values = {n: _take(sec, raw, n, type(getattr(defaults, n)), getattr(defaults, n))
                  for n in names}
        cfg = cls(**values, sampling=SamplingConfig.parse(sampling))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        sec = "engine"
        _in_range(f"{sec}.audio_left_context_s", self.audio_left_context_s, 0.0, 30.0)
        _in_range(f"{sec}.audio_lookahead_s", self.audio_lookahead_s, 0.0, 2.0)
        _in_range(f"{sec}.max_sessions", self.max_sessions, 0, 256)
        _in_range(f"{sec}.lora_alpha", self.lora_alpha, 1e-6, 1e6)
        _in_range(f"{sec}.avatar_cache_mb", self.avatar_cache_mb, 0, 1 << 20)
        _in_range(f"{sec}.preview_speed", self.preview_speed, 0.0, 1000.0)
        _one_of(f"{sec}.dtype", self.dtype, DTYPES)
        _one_of(f"{sec}.audio_dtype", self.audio_dtype, AUDIO_DTYPES)
        _one_of(f"{sec}.random_shapes", self.random_shapes, RANDOM_SHAPES)
        _one_of(f"{sec}.fp8_scaling", self.fp8_scaling, FP8_SCALINGS)
        _one_of(f"{sec}.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _one_of(f"{sec}.compile_mode", self.compile_mode, COMPILE_MODES)
        try:
            parse_area(self.max_size)
        except InputError as exc:
            raise ConfigError(f"{sec}.max_size={self.max_size!r}: {exc}") from None
        self.extra_warm_up_sizes()
        for key in ("device", "text_device"):
            value = getattr(self, key)
            if not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
                raise ConfigError(f"{sec}.{key}={value!r}: accepted auto, cpu, cuda, cuda:N")
        self._validate_layout()
        if self.random_weights and self.checkpoint:
            raise ConfigError(f"{sec}.random_weights=true and {sec}.checkpoint="
                              f"{self.checkpoint!r} exclude each other: empty the checkpoint to "
                              "run random weights, or set random_weights = false")

    def extra_warm_up_sizes(self) -> tuple[str, ...]:
        """`warm_up_sizes` other than max_size, in order, each once (ConfigError for a size that
        does not parse or is larger than max_size)."""
        top = parse_area(self.max_size)
        out: list[str] = []
        for size in (s.strip() for s in self.warm_up_sizes.split(",")):
            if not size:
                continue
            try:
                area = parse_area(size)
            except InputError as exc:
                raise ConfigError(f"engine.warm_up_sizes: {size!r}: {exc}") from None
            if area > top:
                raise ConfigError(f"engine.warm_up_sizes: {size!r} is larger than max_size "
                                  f"{self.max_size!r}; list sizes at most max_size")
            if parse_size(size) != parse_size(self.max_size) and size not in out:
                out.append(size)
        return tuple(out)

    def _validate_layout(self) -> None:
        from engine.parallel.layout import Layout

        sec = "engine"
        layout = Layout.parse(self.layout, f"{sec}.layout")
        if self.sampling.steps < layout.dit_ranks:
            raise ConfigError(f"{sec}.layout={self.layout!r} gives each of its "
                              f"{layout.dit_ranks} DiT ranks at least one step, but "
                              f"{sec}.sampling.steps={self.sampling.steps}: use "
                              f"{sec}.sampling.steps >= {layout.dit_ranks} or fewer DiT ranks")
        _one_of(f"{sec}.group_launch", self.group_launch, GROUP_LAUNCHES)
        host, _, port = self.group_listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"{sec}.group_listen={self.group_listen!r}: expected HOST:PORT "
                              "such as \"127.0.0.1:0\" (port 0: any free port; torchrun ranks "
                              "need a fixed, reachable one such as \"0.0.0.0:29600\")")
        if self.group_launch == "torchrun" and int(port) == 0:
            raise ConfigError(f"{sec}.group_launch = \"torchrun\" needs a fixed port in "
                              f"{sec}.group_listen (the ranks' --server), not {self.group_listen!r}")
        _in_range(f"{sec}.rank_timeout_s", self.rank_timeout_s, 0.5, 600.0)
        _in_range(f"{sec}.receive_timeout_s", self.receive_timeout_s, 1.0, 3600.0)
        _in_range(f"{sec}.group_start_timeout_s", self.group_start_timeout_s, 5.0, 86400.0)
