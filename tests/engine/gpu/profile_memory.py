"""What is alive on the GPU at a pipeline rank's peak (issue 9: a rank of layout 4 at 448x256
must peak at 22 GiB; `--rank-share 4:0` measured 23.8 and `4+vae:0` 22.5, against 21.4 GiB at
rest). Runs `avatar bench --rank-share` under PyTorch's allocation history, finds the moment the
allocated total peaked and prints what was allocated then, grouped by the innermost line of the
engine's code that made it, beside the same at the end (the resting state).

    python3 -m tests.engine.gpu.profile_memory [--share 4+vae:0] [--size 448*256]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path
from typing import Any

import torch

from engine.bench import BenchOptions
from engine.config import EngineConfig
from engine.parallel.bench import bench_rank_share
from engine.parallel.layout import Layout

GB = 1e9


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame in the project's engine code (else the innermost frame)."""
    for f in frames:
        name = f.get("filename", "")
        if "/engine/" in name and "/torch/" not in name:
            return f"{name.split('/engine/')[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"


def live_at_peak(trace: list[dict[str, Any]]) -> tuple[float, dict[str, float], dict[str, float]]:
    """(peak bytes, live bytes by site at the peak, live bytes by site at the end)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, _site(event.get("frames", [])))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]

    def by_site(blocks: dict[int, tuple[int, str]]) -> dict[str, float]:
        sums: collections.Counter[str] = collections.Counter()
        for size, site in blocks.values():
            sums[site] += size
        return {k: v / GB for k, v in sums.most_common()}

    return peak / GB, by_site(at_peak), by_site(live)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", default="4+vae:0")
    ap.add_argument("--size", default="448*256")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--audio-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--empty-after-setup", action="store_true",
                    help="(an experiment) release the allocator's cache after the session's "
                         "set-up")
    args = ap.parse_args()
    if args.empty_after_setup:
        from engine.parallel.roles import DiTSession

        set_up = DiTSession.set_up

        def set_up_then_empty(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            out = set_up(self, *a, **k)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return out

        DiTSession.set_up = set_up_then_empty  # type: ignore[method-assign]
    layout, _, rank = args.share.rpartition(":")
    Layout.parse(layout)
    config = EngineConfig(fp8=True, avatar_cache_mb=0, audio_dtype=args.audio_dtype)
    opts = BenchOptions(size=args.size, steps=4, blocks=args.blocks)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    result = bench_rank_share(config, opts, layout, int(rank))
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][0]
    peak, at_peak, at_end = live_at_peak(trace)
    print("after the set-up:", result.get("after_setup"))
    print("trace actions:", collections.Counter(e["action"] for e in trace))
    print(f"{args.share} at {args.size}: {len(trace)} events; bench peak allocated "
          f"{result.get('peak_allocated_gb')} GB (reserved {result.get('peak_reserved_gib')} "
          f"GiB); traced peak {peak:.3f} GB, at the end {sum(at_end.values()):.3f} GB")
    rows = sorted(set(at_peak) | set(at_end), key=lambda s: -at_peak.get(s, 0.0))
    print(f"{'at peak GB':>10} {'at end GB':>10}  site")
    for site in rows[:40]:
        print(f"{at_peak.get(site, 0.0):10.3f} {at_end.get(site, 0.0):10.3f}  {site}")
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-{args.share.replace(':', '-').replace('+', '')}.json").write_text(
        json.dumps({"share": args.share, "size": args.size, "bench": result,
                    "peak_gb": peak, "at_peak": at_peak, "at_end": at_end}, indent=1,
                   default=str))


if __name__ == "__main__":
    main()
