"""`avatar bench --layout L` and `avatar bench --rank-share L:i`: the pipeline's figures, measured
with random weights (14B shapes on GPUs, tiny on a CPU or with --tiny). Nothing is asserted.

`--layout L` starts a real group (`ParallelEngine`) and opens real sessions through it:
1. warm-up: one session until its rings are full, plus a block;
2. steady state: `--blocks` blocks with one in flight per stage, as the runtime keeps them: FPS
   from the wall clock, each rank's stage time (median) and the pipeline's throughput as one
   block per max stage time (what the stages allow, whatever the feeding);
3. time to first frame, warm: a new avatar, then the same one again (the avatar cache), and the
   first block's latency by stage (the sum of the stages plus the hops);
4. every rank's peak memory over the steady state (GPU: allocated and reserved).
With --baseline, layout "1" runs first in this process with the same switches (the existing
single-GPU bench), and the pipeline's FPS and TTFF are also given as ratios to it.

`--rank-share L:i` runs, on this one device and without a group, what rank i of layout L holds
and runs: its models only, one session's state for its steps (rings, sink, text K/V; the VAE
rank's decoder cache), and its stage on every block (the audio features and tokens where the
rank computes them; what it would receive are random tensors of the right shapes). Its peak
memory from then on is what a card for that rank needs to run: per-rank memory for small cards,
measured without the cards. Loading has a peak of its own (`load_peak_reserved_gib`); with FP8
the DiT is quantised as it loads, so that peak is the FP8 weights and one bf16 weight more.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from engine.api import (
    BLOCK_SECONDS,
    FRAMES_PER_BLOCK,
    AudioChunk,
    FrameBlock,
    SessionParams,
)
from engine.audio_features import StreamingAudioFeatures, window_features
from engine.avatar_cache import AvatarKey
from engine.bench import BenchOptions, _host_rss, bench_audio, bench_image, run_bench
from engine.checkpoint.loader import resolve_device, resolve_text_device
from engine.config import EngineConfig
from engine.denoise import step_seconds
from engine.generator import StreamConfig
from engine.memory import GB, GIB, params_of, plan_memory
from engine.models.dit import AudioTokens
from engine.parallel.engine import ParallelEngine, ParallelSession
from engine.parallel.hops import block_shapes
from engine.parallel.layout import Layout
from engine.parallel.messages import AvatarInputs, Wire
from engine.parallel.roles import (
    DiTSession,
    encode_avatar,
    keep_what_the_role_runs,
    memory_stats,
)
from engine.parallel.worker import fit_rank, load_rank_models
from engine.random_weights import model_shapes
from engine.session_plan import Tier
from engine.sizing import generation_size, parse_area, parse_size
from engine.speed.prepare import prepare_parts
from engine.timing import StageClock

CARD_24GB_GIB = 22.0  # what a 24 GB card leaves a process (context, workspaces, other)


def _ms(s: float) -> float:
    return round(s * 1000.0, 2)


def _head(config: EngineConfig, opts: BenchOptions, device: torch.device, dtype: torch.dtype,
          shapes: str) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "shapes": shapes,
            "dtype": str(dtype).removeprefix("torch."), "steps": opts.steps,
            "blocks": opts.blocks, "fp8": config.fp8, "audio_dtype": config.audio_dtype}


def _generation(size: str) -> tuple[int, int]:
    w, h = parse_size(size)
    return generation_size(h, w, parse_area(size))  # (H, W)


# 1. A whole layout ------------------------------------------------------------------------------


def _pipelined(session: ParallelSession, count: int, depth: int) -> list[FrameBlock]:
    pending, out = [], []
    for _ in range(count):
        pending.append(session.submit_block())
        if len(pending) >= depth:
            out.append(pending.pop(0).result())
    return out + [p.result() for p in pending]


def _ttff(engine: ParallelEngine, params: SessionParams) -> tuple[float, FrameBlock, bool]:
    audio = bench_audio(2 * BLOCK_SECONDS + engine.lookahead_s + 1.0, params.seed)
    start = time.perf_counter()
    session = engine.open_session(params)
    session.push_audio(AudioChunk(audio, 0))
    block = session.next_block()
    took = time.perf_counter() - start
    hit = bool(session.info.get("avatar_cache_hit"))
    session.close()
    return took, block, hit


def bench_layout(config: EngineConfig, opts: BenchOptions, layout: str) -> dict[str, Any]:
    device, dtype = resolve_device(config.device, config.dtype)
    shapes = "tiny" if opts.tiny or device.type == "cpu" else "14B"
    config = dataclasses.replace(config, layout=layout, random_weights=True, checkpoint="",
                                 random_shapes=shapes, max_size=opts.size,
                                 sampling=dataclasses.replace(config.sampling, steps=opts.steps))
    config.validate()
    out: dict[str, Any] = {"mode": "layout", **_head(config, opts, device, dtype, shapes),
                           "layout": str(Layout.parse(layout))}
    baseline = None
    if opts.baseline:  # one process, the same switches, in the same run
        single = run_bench(dataclasses.replace(config, layout="1"),
                           dataclasses.replace(opts, baseline=False))[0]
        baseline = single["runs"]["configured"]
    gh, gw = _generation(opts.size)
    engine = ParallelEngine.load(dataclasses.replace(config, calibrate=False))  # it measures
    try:
        out["world"] = engine.layout.world
        depth = engine.max_in_flight
        cfg = engine.stream_config
        warm = cfg.ring_frames // cfg.block_frames + 1
        params = SessionParams(image=bench_image(gw, gh, 0), size=opts.size, seed=opts.seed,
                               steps=opts.steps)
        start = time.perf_counter()
        session = engine.open_session(params)
        seconds = (warm + opts.blocks + 2) * BLOCK_SECONDS + engine.lookahead_s + 1.0
        session.push_audio(AudioChunk(bench_audio(seconds, opts.seed), 0))
        _pipelined(session, warm, depth)
        out["warmup_s"] = round(time.perf_counter() - start, 3)
        engine.query(reset=True)  # stage times and peaks of the steady state only
        start = time.perf_counter()
        blocks = _pipelined(session, opts.blocks, depth)
        wall = time.perf_counter() - start
        reports = engine.query()
        session.close()
        fresh = dataclasses.replace(params, image=bench_image(gw, gh, 1), seed=opts.seed + 1)
        ttff, first, _ = _ttff(engine, fresh)
        ttff_cached, _, hit = _ttff(engine, fresh)
    finally:
        engine.close()
    ranks = [{"rank": r, **reports[r]} for r in sorted(reports)]
    stages = [r["stage_ms_median"] for r in ranks]
    block_s = wall / opts.blocks
    t = first.timings
    out.update({
        "size": f"{gw}x{gh}", "in_flight": depth,
        "fps": round(FRAMES_PER_BLOCK / block_s, 2),
        "pipeline_fps": round(FRAMES_PER_BLOCK * 1000 / max(max(stages, default=0), 1e-6), 2),
        "block_ms": _ms(block_s), "realtime_factor": round(block_s / BLOCK_SECONDS, 3),
        "stage_max_ms": max(stages, default=0.0), "stage_sum_ms": round(sum(stages), 2),
        "block_latency_ms": _ms(statistics.median(b.timings.total for b in blocks)),
        "ttff_s": round(ttff, 3), "ttff_cached_s": round(ttff_cached, 3),
        "avatar_cache_hit": hit,
        "first_block": {"total_ms": _ms(t.total), "features_ms": _ms(t.features),
                        "step_ms": [_ms(s) for s in t.steps], "decode_ms": _ms(t.decode),
                        "postprocess_ms": _ms(t.postprocess)},
        "ranks": ranks, "host_rss_peak_gb": round(_host_rss()[1] / GB, 2),
    })
    if baseline is not None:
        out["baseline"] = {k: baseline[k] for k in ("fps", "block_ms", "ttff_s",
                                                    "ttff_cached_s", "dit_step_mean_ms",
                                                    "peak_reserved_gb")}
        out["ratio_to_one_process"] = {
            k: round(out[k] / baseline[k], 3) for k in ("fps", "ttff_s", "block_ms")
            if baseline[k]}
    return out


# 2. One rank's share on one device --------------------------------------------------------------


def bench_rank_share(config: EngineConfig, opts: BenchOptions, layout_text: str, rank: int
                     ) -> dict[str, Any]:
    layout = Layout.parse(layout_text, "--rank-share")
    role = layout.role(rank)
    device, dtype = resolve_device(config.device, config.dtype)
    shapes_name = "tiny" if opts.tiny or device.type == "cpu" else "14B"
    config = dataclasses.replace(config, layout=str(layout), random_weights=True, checkpoint="",
                                 random_shapes=shapes_name, max_size=opts.size, max_sessions=1,
                                 sampling=dataclasses.replace(config.sampling, steps=opts.steps))
    config.validate()
    shapes = model_shapes(shapes_name, device)
    owned = list(layout.steps_of(rank, opts.steps))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        config, text_device, _ = fit_rank(config, layout, rank, device, dtype)
    else:
        text_device = resolve_text_device(config.text_device, device)
    t0 = time.perf_counter()
    models = load_rank_models(config, role.parts, device, dtype, text_device)
    load_s = time.perf_counter() - t0
    keep_what_the_role_runs(models, role.tokens)
    cfg = StreamConfig()
    speed = prepare_parts(models.dit, models.vae, device, dtype, config, cfg.ring_frames,
                          cfg.block_frames)
    load_peak = 0.0
    if device.type == "cuda":  # loading's own peak (what is read, converted and merged)
        torch.cuda.empty_cache()
        load_peak = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    gh, gw = _generation(opts.size)
    tier = Tier(opts.size, opts.steps)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    lat_h, lat_w = gh // shapes.vae.spatial_stride, gw // shapes.vae.spatial_stride
    out: dict[str, Any] = {
        "mode": "rank-share", **_head(config, opts, device, dtype, shapes_name),
        "layout": str(layout), "rank": rank, "role": role.describe(layout, opts.steps),
        "parts": list(role.parts), "owned_steps": owned, "size": f"{gw}x{gh}",
        "load_s": round(load_s, 3)}
    decoder = None
    if role.decoder:  # the avatar's encoding (VAE + umT5) and a primed decoder
        start = time.perf_counter()
        inputs, decoder, _, _ = encode_avatar(models, speed, bench_image(gw, gh, 0), gh, gw,
                                              "a person talking", AvatarKey("bench", gh, gw, ""),
                                              cfg.warmup_latents)
        out["avatar_encode_ms"] = _ms(time.perf_counter() - start)
    else:
        context = torch.randn(1, 32, shapes.dit.text_dim, generator=gen)
        inputs = AvatarInputs(AvatarKey("bench", gh, gw, ""), gh, gw,
                              Wire.of(torch.randn(1, 16, 1, lat_h, lat_w, generator=gen)),
                              Wire.of(torch.randn(1, 16, shapes.dit.motion_latent_frames,
                                                  lat_h, lat_w, generator=gen)),
                              Wire.of(context.to(dtype)))
    session = None
    if role.dit:
        session = DiTSession(models, speed, SessionParams(seed=opts.seed), cfg.ring_frames,
                             config.sampling.shift, owned=lambda s: layout.steps_of(rank, s))
        start = time.perf_counter()
        session.set_up(inputs, tier)
        _sync(device)
        out["prefill_ms"] = _ms(time.perf_counter() - start)
        if device.type == "cuda":  # the set-up's own high-water mark, before any block
            out["after_setup"] = {
                "allocated_gb": round(torch.cuda.memory_allocated(device) / GB, 3),
                "reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 3),
                "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3)}
    audio = StreamingAudioFeatures(None, cfg.audio)
    n = cfg.ring_frames // cfg.block_frames + 1 + opts.blocks
    audio.push(bench_audio((n + 2) * BLOCK_SECONDS + 1.0, opts.seed))
    x_shape, local_shape, glob_shape = block_shapes(shapes.dit, cfg.block_frames,
                                                    (lat_h, lat_w))
    stages, features, steps, decodes = [], [], [], []
    for b in range(n):
        window = audio.window(b * FRAMES_PER_BLOCK, FRAMES_PER_BLOCK)
        x = torch.randn(x_shape, generator=gen).to(device)
        tokens = AudioTokens(torch.randn(local_shape, generator=gen).to(device, dtype),
                             None if glob_shape is None else
                             torch.randn(glob_shape, generator=gen).to(device, dtype))
        feats = torch.randn(1, shapes.dit.audio_layers, shapes.dit.audio_dim, FRAMES_PER_BLOCK,
                            generator=gen).to(device)  # what rank 0 receives in a k+vae layout
        clock = StageClock(device)
        with torch.inference_mode(), speed.attention.active():
            clock.mark("start")
            if role.features:
                assert models.wav2vec is not None
                feats = window_features(models.wav2vec, window, device)
            if role.tokens:
                assert models.dit is not None
                tokens = models.dit.encode_audio(feats)
            clock.mark("features")
            stage = 0.0
            if session is not None:
                block = session.denoiser.block_input(b, tokens, opts.seed, None,
                                                     cfg.block_frames)
                clock.mark("inputs")
                x = session.denoiser.run(x, block, clock)
                per = step_seconds(clock, owned)
                stage = sum(per)
                if b >= n - opts.blocks:
                    steps.append(per)
            f = clock.between("start", "features")
            stage += f
            if b >= n - opts.blocks and (role.features or role.tokens):
                features.append(f)
            if decoder is not None:
                decoded = decoder.submit(x.to(dtype)).result()
                c = decoded.clock
                d = c.between("decode_start", "postprocess")
                if not (session is not None and speed.decoder.overlapped):
                    stage += d  # the decode is this rank's whole stage, or part of it
                if b >= n - opts.blocks:
                    decodes.append(d)
        if b >= n - opts.blocks:
            stages.append(stage)
    _sync(device)
    med = statistics.median
    mem = memory_stats(device)
    plan = plan_memory(shapes.dit, shapes.vae, opts.size, steps=len(owned), dtype=dtype,
                       fp8=config.fp8, parts=tuple(p for p in role.parts if p != "text"),
                       audio_encoder=role.tokens,
                       t5=shapes.t5 if role.decoder and text_device == device else None,
                       wav2vec_params=params_of(models.wav2vec) if models.wav2vec else 0,
                       wav2vec_dtype=getattr(torch, config.audio_dtype))
    out.update({
        "stage_ms": _ms(med(stages)),
        "features_ms": _ms(med(features)) if features else 0.0,
        "step_ms": [_ms(med(s[i] for s in steps)) for i in range(len(owned))] if steps else [],
        "decode_ms": _ms(med(decodes)) if decodes else 0.0,
        "pipeline_fps_if_all_ranks_like_this": round(FRAMES_PER_BLOCK / max(med(stages), 1e-9),
                                                     2),
        "weights_gb": {k: round(v / GB, 3) for k, v in models.parameter_bytes().items()},
        "rings_gb": round((session.denoiser.nbytes if session else 0) / GB, 6),
        "text_kv_gb": round((session.denoiser.cond.text.nbytes if session else 0) / GB, 4),
        "text_device": str(text_device) if role.decoder else None,
        **mem,
        "memory_plan_gb": {k: round(v / GB, 2) for k, v in plan.items.items()},
        "memory_plan_total_gib": round(plan.total / GIB, 2),
    })
    if device.type == "cuda":
        out["fits_24gb_card"] = mem["peak_reserved_gib"] <= CARD_24GB_GIB
        out["load_peak_reserved_gib"] = round(load_peak, 3)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_rank_share(text: str) -> tuple[str, int]:
    """"4+vae:2" -> ("4+vae", 2)."""
    layout, _, rank = text.rpartition(":")
    if not layout or not rank.isdigit():
        raise ValueError(f"--rank-share={text!r}: expected LAYOUT:RANK such as 4:0 or 4+vae:4")
    lay = Layout.parse(layout, "--rank-share")
    if int(rank) >= lay.world:
        raise ValueError(f"--rank-share={text!r}: layout {lay} has ranks 0..{lay.world - 1}")
    return str(lay), int(rank)


def format_table(out: dict[str, Any]) -> str:
    """The figures as lines for a reader (the JSON has them all)."""
    lines = [f"avatar bench {out['mode']} {out['layout']}"
             + (f" rank {out['rank']}" if "rank" in out else "") +
             f": {out['device']}, torch {out['torch']}, {out['shapes']} shapes, {out['dtype']}, "
             f"{out['size']}, {out['steps']} steps"]
    for key, value in out.items():
        if key in ("mode", "layout", "device", "torch", "shapes", "dtype", "size", "steps",
                   "ranks"):
            continue
        lines.append(f"{key:34s} {value}")
    for r in out.get("ranks", []):
        lines.append(f"  rank {r['rank']}: stage {r['stage_ms_median']} ms, "
                     + ", ".join(f"{k} {v}" for k, v in r.items()
                                 if k.startswith("peak") or k.startswith("host")) + f"; {r['role']}")
    return "\n".join(lines)


__all__ = ["bench_layout", "bench_rank_share", "format_table", "parse_rank_share"]
