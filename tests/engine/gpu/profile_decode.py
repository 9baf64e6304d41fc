"""Where one block's VAE decode goes on a GPU (issue 8: the decode is 192 ms at 704x384 against
a 90 ms goal). Random weights at the published VAE's shapes; for each variant (channels-first
and channels-last, each eager and with `compile_vae`, the fused norm/SiLU/padding) it times
decoding one block (3 latent frames after a 7-frame warm-up, as a session does), reports the
largest difference of its frames from the eager channels-first ones, and prints the top CUDA
kernels of one profiled block. Writes the tables under $OUT (or ./gpu-out). The first run
(H200, 2026-12-01) gave 192 ms channels-first and 258 ms channels-last eager, and no change
from cuDNN's benchmark mode (docs/bench.md).

    python3 -m tests.engine.gpu.profile_decode [--size 704*384] [--blocks 6]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine.api import parse_area
from engine.decode import decode_block, use_channels_last
from engine.models.vae import CausalCache
from engine.random_weights import build_random_parts, model_shapes
from engine.sizing import generation_size
from engine.speed.compile import compile_vae


def _time_blocks(vae, z, blocks: int, channels_last: bool) -> tuple[float, torch.Tensor]:
    """Median seconds per block after the warm-up, and the frames of every block."""
    cache = CausalCache()
    frames = [decode_block(vae, z[:, :, :7], cache, channels_last).frames]  # the warm-up
    times = []
    for b in range(blocks):
        torch.cuda.synchronize()
        start = time.perf_counter()
        frames.append(decode_block(vae, z[:, :, 7 + 3 * b:10 + 3 * b], cache,
                                   channels_last).frames)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # uint8 [T, H, W, 3] on the host per call (engine.decode.DecodedFrames)
    return sorted(times)[len(times) // 2], torch.cat(frames, dim=0).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--blocks", type=int, default=6)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    shapes = model_shapes("14B", device)
    vae = build_random_parts(shapes, ("vae",), device, dtype)["vae"]
    h, w = generation_size(384, 704, parse_area(args.size))
    z = torch.randn(1, 16, 7 + 3 * (args.blocks + 1), h // 8, w // 8, device=device,
                    dtype=dtype)
    reference = None
    with torch.inference_mode():
        for compiled in (False, True):
            if compiled:
                compile_vae(vae)
                start = time.perf_counter()
                _time_blocks(vae, z, 2, False)  # compiles the channels-first graphs
                print(f"compile (channels-first): {time.perf_counter() - start:.1f} s")
            for cl in (False, True):
                if cl:
                    use_channels_last(vae)
                else:
                    vae.to(memory_format=torch.contiguous_format)
                name = (f"{'channels-last' if cl else 'channels-first'}, "
                        f"{'compiled' if compiled else 'eager'}")
                _time_blocks(vae, z, 1, cl)  # (compiles what this layout needs)
                seconds, frames = _time_blocks(vae, z, args.blocks, cl)
                reference = frames if reference is None else reference
                diff = (frames - reference).abs().max().item()
                print(f"{args.size} {name}: {1000 * seconds:.1f} ms per block; max |frames - "
                      f"eager channels-first| = {diff:.4f}", flush=True)
                cache = CausalCache()
                decode_block(vae, z[:, :, :7], cache, cl)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    decode_block(vae, z[:, :, 7:10], cache, cl)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                  max_name_column_width=70)
                tag = f"{'cl' if cl else 'cf'}-{'compiled' if compiled else 'eager'}"
                (out / f"decode-{tag}.txt").write_text(table)
                print("\n".join(table.splitlines()[3:9]), flush=True)


if __name__ == "__main__":
    main()
