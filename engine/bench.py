"""`avatar bench`: what a user gets, measured through the real engine with random weights.

A `WanEngine` over randomly initialised models (real 14B shapes on a GPU; the tiny test shapes on
a CPU or with --tiny; no checkpoint) opens real sessions and generates whole blocks: audio
features, every denoising step with its own KV ring, the sink, VAE decode, frames to uint8 on the
host. Per run:

1. warm-up: one session runs until its rings are full (plus one block), which also compiles
   whatever the speed switches compile;
2. steady state: `--blocks` more blocks of that session; per-stage device times from the
   generator's own timings (medians), FPS from the wall clock;
3. time to first frame, warm: a new session with a new image (its audio already there), from
   `open_session` to its first frames on the host; then again with the same image, which the
   per-avatar cache (when on) turns into a cache hit; the sink prefill of the first of them;
4. peak GPU memory (allocated and reserved, since the run's start) and host RSS.

With --baseline the plain path (eager, default SDPA backend, no FP8, no compile, no overlap, no
cache) runs first in the same process, every figure of the configured run is also printed as a
ratio to it, and the bare GEMMs + attention of one step (`engine.bare_step`) are timed in the
same run. Nothing here is asserted: the figures are printed (or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.api import (
    BLOCK_SECONDS,
    FRAMES_PER_BLOCK,
    SAMPLE_RATE,
    AudioChunk,
    FrameBlock,
    SessionParams,
)
from engine.avatar_cache import MB
from engine.bare_step import bare_step, time_bare_step
from engine.checkpoint.loader import EngineModels, resolve_device, resolve_text_device
from engine.config import EngineConfig
from engine.errors import ConfigError, EngineError
from engine.generator import PendingFrames
from engine.memory import params_of, plan_memory
from engine.preview import draw_default_face
from engine.random_weights import build_random_models, model_shapes
from engine.sizing import generation_size, parse_area, parse_size
from engine.speed.compile import graphs
from engine.wan_engine import WanEngine, WanSession

log = logging.getLogger(__name__)
GB = 1e9


# 1. Options and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    size: str = "704*384"
    steps: int = 4
    blocks: int = 8  # measured steady-state blocks (after the warm-up)
    baseline: bool = False
    tiny: bool = False
    seed: int = 0


@dataclass
class RunResult:
    """The figures of one configuration. Times in ms unless named _s; memory in GB (1e9)."""

    label: str
    switches: dict[str, Any]
    decisions: dict[str, str]  # what the engine chose at start-up (e.g. the attention backend)
    size: str
    tokens_per_block: int
    kv_tokens: int  # keys one step's queries attend to, ring full
    warmup_s: float  # first session: open + blocks until the ring is full (includes compiling)
    audio_features_ms: float
    dit_step_ms: list[float]  # per step of the schedule
    dit_step_mean_ms: float
    denoise_ms: float
    vae_decode_ms: float
    postprocess_ms: float  # uint8 conversion + copy to host
    block_ms: float  # wall time per block in steady state
    fps: float  # steady state, wall clock
    dit_only_fps: float  # 12 / (features + denoise): what the DiT alone would allow
    realtime_factor: float  # block_ms / 480 ms (< 1: faster than real time)
    ttff_s: float  # warm, new image
    ttff_cached_s: float  # warm, the same image again
    avatar_cache_hit: bool  # whether that second session came from the avatar cache
    sink_prefill_ms: float  # warm (the new-image session's)
    setup_ms: dict[str, float] = field(default_factory=dict)
    peak_allocated_gb: float = 0.0
    peak_reserved_gb: float = 0.0
    host_rss_gb: float = 0.0
    host_rss_peak_gb: float = 0.0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _ms(s: float) -> float:
    return round(s * 1000.0, 2)


# 2. Measuring one configuration -----------------------------------------------------------------


def bench_image(width: int, height: int, variant: int) -> np.ndarray:
    """A drawn face of exactly width x height (so the size budget maps to itself), with a
    variant-dependent tint so that every variant is a different avatar."""
    img = draw_default_face(width, height).astype(np.int16)
    img[..., variant % 3] += 7 * (variant + 1)
    return img.clip(0, 255).astype(np.uint8)


def bench_audio(seconds: float, seed: int) -> np.ndarray:
    """Speech-like noise: voiced bursts at syllable rate (the features' values do not matter)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = (np.sin(2 * np.pi * 4.0 * t) > 0).astype(np.float32)
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


class _Session:
    """A session with all the audio it will need already pushed."""

    def __init__(self, engine: WanEngine, params: SessionParams, blocks: int):
        self.session: WanSession = engine.open_session(params)
        seconds = (blocks + 2) * BLOCK_SECONDS + engine.lookahead_s + 1.0
        self.session.push_audio(AudioChunk(bench_audio(seconds, params.seed), 0))

    def block(self) -> FrameBlock:
        return self.session.next_block()

    def pipelined(self, count: int) -> list[FrameBlock]:
        pending: deque[PendingFrames] = deque()
        out = []
        for _ in range(count):
            pending.append(self.session.submit_block())
            if len(pending) == 2:
                out.append(pending.popleft().result())
        return out + [p.result() for p in pending]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ttff(engine: WanEngine, params: SessionParams) -> tuple[float, dict[str, float], bool]:
    """Wall seconds from opening a session (audio already there) to its first frames on the
    host, the session's set-up breakdown, and whether the avatar cache had it."""
    audio = bench_audio(2 * BLOCK_SECONDS + engine.lookahead_s + 1.0, params.seed)
    _sync(engine.models.device)
    start = time.perf_counter()
    session = engine.open_session(params)
    session.push_audio(AudioChunk(audio, 0))
    session.next_block()
    took = time.perf_counter() - start
    setup = dict(session.generator.setup_seconds)
    hit = session.generator.avatar_cache_hit
    session.close()
    return took, setup, hit


def measure(engine: WanEngine, opts: BenchOptions, label: str, switches: dict[str, Any]
            ) -> RunResult:
    models = engine.models
    device = models.device
    w, h = parse_size(opts.size)
    gh, gw = generation_size(h, w, parse_area(opts.size))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ring_blocks = engine.stream_config.ring_frames // engine.stream_config.block_frames
    warm_blocks = ring_blocks + 1
    params = SessionParams(image=bench_image(gw, gh, 0), size=opts.size, seed=opts.seed,
                           steps=opts.steps)

    # 1. warm-up until the rings are full (this compiles, when compiling)
    start = time.perf_counter()
    graphs_before = graphs()
    run = _Session(engine, params, warm_blocks + opts.blocks)
    for _ in range(warm_blocks):
        run.block()
    warmup = time.perf_counter() - start
    graphs_warm = graphs()

    # 2. steady state, two blocks in flight as the runtime keeps them (block b's decode beside
    # block b+1's steps when the decode is overlapped)
    _sync(device)
    start = time.perf_counter()
    timings = [block.timings for block in run.pipelined(opts.blocks)]
    wall = time.perf_counter() - start
    gen = run.session.generator
    tokens_per_frame = gen.stages[0].kv.tokens_per_frame if gen.stages else 0
    kv_tokens = engine.stream_config.ring_frames * tokens_per_frame + gen.sink_tokens
    run.session.close()

    # 3. time to first frame: a new avatar, then the same one again
    fresh = dataclasses.replace(params, image=bench_image(gw, gh, 1), seed=opts.seed + 1)
    ttff, setup, _ = _ttff(engine, fresh)
    ttff_cached, _, hit = _ttff(engine, fresh)
    recompiled = graphs() - graphs_warm  # must be 0: steady state and new sessions reuse

    steps = [_median([t.steps[i] for t in timings]) for i in range(len(timings[0].steps))]
    features = _median([t.features for t in timings])
    denoise = _median([t.denoise for t in timings])
    block_s = wall / opts.blocks
    rss_now, rss_peak = _host_rss()
    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peak_res = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    return RunResult(
        label=label, switches=switches, size=f"{gw}x{gh}",
        decisions={"attention_backend": engine.speed.attention.describe(),
                   "compiled_graphs": str(graphs_warm - graphs_before),
                   "recompiled_after_warmup": str(recompiled)},
        tokens_per_block=engine.stream_config.block_frames * tokens_per_frame,
        kv_tokens=kv_tokens, warmup_s=round(warmup, 3),
        audio_features_ms=_ms(features), dit_step_ms=[_ms(s) for s in steps],
        dit_step_mean_ms=_ms(sum(steps) / max(1, len(steps))), denoise_ms=_ms(denoise),
        vae_decode_ms=_ms(_median([t.decode for t in timings])),
        postprocess_ms=_ms(_median([t.postprocess for t in timings])),
        block_ms=_ms(block_s), fps=round(FRAMES_PER_BLOCK / block_s, 2),
        dit_only_fps=round(FRAMES_PER_BLOCK / max(features + denoise, 1e-9), 2),
        realtime_factor=round(block_s / BLOCK_SECONDS, 3),
        ttff_s=round(ttff, 3), ttff_cached_s=round(ttff_cached, 3), avatar_cache_hit=hit,
        sink_prefill_ms=_ms(setup.get("prefill", 0.0)),
        setup_ms={k: _ms(v) for k, v in setup.items()},
        peak_allocated_gb=round(peak_alloc / GB, 2), peak_reserved_gb=round(peak_res / GB, 2),
        host_rss_gb=round(rss_now / GB, 2), host_rss_peak_gb=round(rss_peak / GB, 2))


def _host_rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        now = peak
    return now, peak


def measure_bare(models: EngineModels, result: RunResult, frames: int) -> float:
    """Seconds of the bare GEMMs + attention of one step at `result`'s shapes."""
    dit = models.dit
    tpf = result.tokens_per_block // frames
    audio_tokens = dit.cfg.num_audio_token + 1
    run = bare_step(dit, tpf, frames, result.kv_tokens, audio_tokens)
    return time_bare_step(run, models.device)


# 3. The whole bench -----------------------------------------------------------------------------


def switches_of(cfg: EngineConfig) -> dict[str, Any]:
    """The speed switches of `cfg` (what differs between the plain and the configured path)."""
    return {name: getattr(cfg, name) for name in EngineConfig.speed_keys()}


def run_bench(config: EngineConfig, opts: BenchOptions, sizes: list[str] | None = None
              ) -> list[dict[str, Any]]:
    """Build random models once and measure every size (the plain path first with --baseline,
    at all sizes while the weights are still bf16; then the configured path, whose FP8 quantises
    them in place). One result per size."""
    sizes = sizes or [opts.size]
    device, dtype = resolve_device(config.device, config.dtype)
    shapes = model_shapes("tiny" if opts.tiny or device.type == "cpu" else "14B", device)
    torch.manual_seed(opts.seed)
    text_device = resolve_text_device(config.text_device, device)
    models = build_random_models(shapes, device, dtype, text_device=text_device, seed=opts.seed,
                                 audio_dtype=getattr(torch, config.audio_dtype))
    largest = max(sizes, key=parse_area)
    config = dataclasses.replace(config, max_size=largest)
    head: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "shapes": shapes.name,
        "dtype": str(dtype).removeprefix("torch."), "steps": opts.steps, "blocks": opts.blocks,
        "text_device": str(text_device), "audio_dtype": config.audio_dtype,
    }
    outs: dict[str, dict[str, Any]] = {}
    for size in sizes:
        # the arithmetic of engine.memory for the configured run (its measured peak is beside)
        plan = plan_memory(shapes.dit, shapes.vae, size, steps=opts.steps, dtype=dtype,
                           fp8=config.fp8, wav2vec_params=params_of(models.wav2vec),
                           wav2vec_dtype=getattr(torch, config.audio_dtype),
                           t5=shapes.t5 if text_device.type == "cuda" else None,
                           avatar_cache_bytes=config.avatar_cache_mb * MB)
        outs[size] = {**head, "size": size, "runs": {},
                      "memory_plan_gb": {k: round(v / GB, 2) for k, v in plan.items.items()},
                      "memory_plan_total_gb": round(plan.total / GB, 2)}
    frames = 3
    if opts.baseline:
        plain = config.plain()
        engine = WanEngine(models, plain)
        frames = engine.stream_config.block_frames
        for size in sizes:
            base = measure(engine, dataclasses.replace(opts, size=size), "baseline",
                           switches_of(plain))
            outs[size]["runs"]["baseline"] = dataclasses.asdict(base)
            outs[size]["bare_step_ms"] = _ms(measure_bare(models, base, frames))
        engine.close()
    engine = WanEngine(models, config)  # applies the speed paths (FP8 from here on)
    for size in sizes:
        out = outs[size]
        result = measure(engine, dataclasses.replace(opts, size=size), "configured",
                         switches_of(config))
        out["runs"]["configured"] = dataclasses.asdict(result)
        out["size"] = result.size
        if "baseline" in out["runs"]:
            base_ms = out["runs"]["baseline"]["dit_step_mean_ms"]
            out["ratio_to_baseline"] = ratios(out["runs"]["configured"], out["runs"]["baseline"])
            out["step_over_bare"] = round(result.dit_step_mean_ms / out["bare_step_ms"], 3)
            out["baseline_step_over_bare"] = round(base_ms / out["bare_step_ms"], 3)
        if config.fp8:
            out["bare_step_fp8_ms"] = _ms(measure_bare(models, result, frames))
            out["step_over_bare_fp8"] = round(result.dit_step_mean_ms / out["bare_step_fp8_ms"],
                                              3)
    engine.close()
    return [outs[size] for size in sizes]


def ratios(run: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """configured / baseline for every numeric figure (FPS > 1 and times < 1 are better)."""
    out = {}
    for key, value in run.items():
        other = base.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                isinstance(other, (int, float)) and other:
            out[key] = round(value / other, 3)
    return out


# 4. Command line --------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    raw: dict[str, Any] = {}
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:
            raw = dict(tomllib.load(f).get("engine", {}))
    raw.pop("checkpoint", None)  # the bench never loads weights
    raw["random_weights"] = True
    raw["text_device"] = args.text_device
    if args.device:
        raw["device"] = args.device
    for key in EngineConfig.speed_keys() + ("fp8_scaling", "compile_mode", "audio_dtype"):
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = value
    return EngineConfig.parse(raw)


def format_table(out: dict[str, Any]) -> str:
    runs = out["runs"]
    conf = runs["configured"]
    base = runs.get("baseline")
    lines = [f"avatar bench: {out['device']}, torch {out['torch']}, {out['shapes']} shapes, "
             f"{out['dtype']}, {conf['size']}, {out['steps']} steps, {out['blocks']} blocks"]
    head = f"{'figure':24s} {'configured':>14s}"
    if base:
        head += f" {'baseline':>14s} {'ratio':>8s}"
    lines.append(head)
    for key, value in conf.items():
        if key in ("label", "switches", "decisions", "setup_ms"):
            continue
        row = f"{key:24s} {str(value):>14s}"
        if base:
            ratio = out["ratio_to_baseline"].get(key, "")
            row += f" {str(base[key]):>14s} {str(ratio):>8s}"
        lines.append(row)
    lines.append(f"{'setup_ms':24s} {conf['setup_ms']}")
    lines.append(f"{'switches':24s} {conf['switches']}")
    lines.append(f"{'decisions':24s} {conf['decisions']}")
    lines.append(f"{'memory_plan_total_gb':24s} {out['memory_plan_total_gb']} "
                 f"{out['memory_plan_gb']}")
    if base:
        lines.append(f"{'bare_step_ms':24s} {out['bare_step_ms']} (bf16; configured step / bare "
                     f"= {out['step_over_bare']}, baseline step / bare = "
                     f"{out['baseline_step_over_bare']})")
    if "bare_step_fp8_ms" in out:
        lines.append(f"{'bare_step_fp8_ms':24s} {out['bare_step_fp8_ms']} (step / bare fp8 = "
                     f"{out['step_over_bare_fp8']})")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        opts = BenchOptions(size=args.size.split(",")[0], steps=args.steps, blocks=args.blocks,
                            baseline=args.baseline, tiny=args.tiny)
        if opts.blocks < 1 or not 1 <= opts.steps <= 50:
            raise ConfigError(f"--blocks={opts.blocks} must be >= 1 and --steps={opts.steps} "
                              "in 1..50")
        sizes = [x.strip() for x in args.size.split(",") if x.strip()]
        for size in sizes:
            parse_area(size)
        if args.rank_share or (args.layout and args.layout.strip() != "1"):
            return _pipeline_command(args, config, opts, sizes)
        outs = run_bench(config, opts, sizes)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for out in outs:  # one JSON object (line) per size
        print(json.dumps(out) if args.json else format_table(out), flush=True)
    return 0


def _pipeline_command(args: argparse.Namespace, config: EngineConfig, opts: BenchOptions,
                      sizes: list[str]) -> int:
    """--layout / --rank-share (engine.parallel.bench): one JSON object per size."""
    from engine.parallel import bench as pipeline

    for size in sizes:
        o = dataclasses.replace(opts, size=size)
        if args.rank_share:
            try:
                layout, rank = pipeline.parse_rank_share(args.rank_share)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            out = pipeline.bench_rank_share(config, o, layout, rank)
        else:
            out = pipeline.bench_layout(config, o, args.layout)
        print(json.dumps(out) if args.json else pipeline.format_table(out), flush=True)
    return 0
