"""`avatar bench`: per-stage timings of one session's block loop with random weights.

On a GPU it builds the models at the real 14B shapes (bfloat16, about 45 GB with one step's KV
ring); on a CPU, or with --tiny, at the tiny test shapes. Nothing is loaded from disk. Timings
are medians over the measured blocks, after warm-up, with the device synchronised around each
stage; every figure is also given as a share of the 0.48 s real-time budget of a block.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.api import BLOCK_SECONDS, FRAMES_PER_BLOCK
from engine.checkpoint.tiny import TINY_DIT, TINY_VAE
from engine.generator import BlockInput, Conditioning, DenoiseStage
from engine.kv_cache import KVRing
from engine.models.dit import DiTConfig, WanS2VDiT
from engine.models.vae import CausalCache, VAEConfig, WanVAE
from engine.sampling import FlowSchedule
from engine.sizing import generation_size, parse_area


@dataclass
class BenchResult:
    device: str
    dtype: str
    shapes: str
    size: str
    tokens_per_block: int
    kv_tokens: int
    sink_prefill_ms: float
    audio_encoder_ms: float
    dit_step_ms: float
    vae_decode_ms: float
    block_ms_one_device: float  # audio + steps * step + decode, run one after another
    fps_one_device: float
    fps_pipelined: float  # one device per step plus one for the VAE (timestep-forcing pipeline)
    realtime_factor_one_device: float  # block time / 0.48 s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def run_bench(device: torch.device, dtype: torch.dtype, tiny: bool, size: str, steps: int,
              blocks: int, seed: int = 0) -> BenchResult:
    torch.manual_seed(seed)
    dcfg: DiTConfig = TINY_DIT if tiny else DiTConfig()
    vcfg: VAEConfig = TINY_VAE if tiny else VAEConfig()
    h, w = generation_size(384, 704, parse_area(size))
    hh, ww = h // 8, w // 8
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the compute dtype: no float32 copy of 14B params
    try:
        with torch.device(device):
            dit = WanS2VDiT(dcfg).eval().requires_grad_(False)
            dit.casual_audio_encoder.float()
            vae = WanVAE(vcfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    tpf = (hh // 2) * (ww // 2)
    ring = KVRing(dcfg.num_layers, 1, 12, tpf, dcfg.num_heads, dcfg.head_dim, dtype, device)
    with torch.inference_mode():
        text = dit.text_kv(torch.randn(1, 120, dcfg.text_dim, device=device))
        ref = torch.randn(1, 16, 1, hh, ww, device=device)
        motion = torch.randn(1, 16, 19, hh, ww, device=device)
        holder: dict[str, Any] = {}
        prefill = _timed(device, lambda: holder.update(
            sink=dit.prefill_sink(*dit.embed_sink(ref, motion), text)))
        sink = holder["sink"]
        # step 1 of the schedule, exactly as the generator runs it (its own ring, the sink)
        stage = DenoiseStage(dit, FlowSchedule.make(steps, 3.0), 1, ring,
                             Conditioning(text, sink, motion))
        feats = torch.randn(1, dcfg.audio_layers, dcfg.audio_dim, FRAMES_PER_BLOCK, device=device)
        cache = CausalCache()
        vae.decode(motion[:, :, :7].to(dtype), cache)
        audio_ms, step_ms, vae_ms = [], [], []
        for b in range(blocks):
            audio_ms.append(_timed(device, lambda: holder.update(audio=dit.encode_audio(feats))))
            x = torch.randn(1, 16, 3, hh, ww, device=device)
            block = BlockInput(b, 3 * b, holder["audio"], (10,) * steps)

            def step(x: torch.Tensor = x, block: BlockInput = block) -> None:
                holder["v"] = stage.velocity(x, block)

            step_ms.append(_timed(device, step))
            vae_ms.append(_timed(device, lambda: vae.decode(holder["v"].to(dtype), cache)))
    warm = max(1, blocks // 2) if blocks > 4 else 1  # ring full from block 4 on
    med = lambda xs: statistics.median(xs[warm:]) if len(xs) > warm else xs[-1]  # noqa: E731
    a, s, v = med(audio_ms), med(step_ms), med(vae_ms)
    block = a + steps * s + v
    return BenchResult(
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype=str(dtype).removeprefix("torch."), shapes="tiny" if tiny else "14B",
        size=f"{w}x{h}", tokens_per_block=3 * tpf, kv_tokens=12 * tpf + sink.keys[0].shape[1],
        sink_prefill_ms=round(prefill, 2), audio_encoder_ms=round(a, 2),
        dit_step_ms=round(s, 2), vae_decode_ms=round(v, 2), block_ms_one_device=round(block, 2),
        fps_one_device=round(FRAMES_PER_BLOCK / (block / 1000), 2),
        fps_pipelined=round(FRAMES_PER_BLOCK / (max(s, v, a) / 1000), 2),
        realtime_factor_one_device=round(block / 1000 / BLOCK_SECONDS, 3))


def command(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = torch.device("cuda" if cuda else args.device if args.device != "auto" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = run_bench(device, dtype, args.tiny or device.type == "cpu", args.size, args.steps,
                       args.blocks)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        for key, value in asdict(result).items():
            print(f"{key:28s} {value}")
    return 0
