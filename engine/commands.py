"""Engine-side `avatar` subcommands: make-tiny-checkpoint, check-checkpoint, bench,
preview-bench.

This module is torch-free at import (the CLI is built by `stream.cli`, which must not import
torch); each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-checkpoint",
                       help="write a random tiny checkpoint in the published layout (for tests)")
    p.add_argument("dir", help="folder to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shards", type=int, default=2, help="number of DiT shards (default 2)")
    p.set_defaults(func=make_tiny_checkpoint)

    p = sub.add_parser("check-checkpoint",
                       help="validate a checkpoint folder from headers only; non-zero on problems")
    p.add_argument("dir", help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora", default=None,
                   help="the Live-Avatar LoRA file (default: LiveAvatar/liveavatar.safetensors "
                        "inside or beside the folder)")
    p.add_argument("--lora-alpha", type=float, default=64.0, help="LoRA alpha (default 64)")
    p.add_argument("--max-keys", type=int, default=12, help="keys listed per problem kind")
    p.set_defaults(func=check_checkpoint)

    p = sub.add_parser("bench", help="whole blocks through the real engine with random weights "
                                     "(14B shapes on a GPU), optionally against the plain path")
    add_bench_arguments(p)
    p.set_defaults(func=bench)

    p = sub.add_parser("preview-bench",
                       help="time the preview engine animating a photo (CPU, one core)")
    p.add_argument("--image", help="a portrait photo (default: a synthetic one, 1280x720)")
    p.add_argument("--size", default="704*384", help="generation area budget (default 704*384)")
    p.add_argument("--seconds", type=float, default=20.0, help="audio to animate (default 20)")
    p.add_argument("--threads", type=int, default=1, help="OpenCV threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=preview_bench)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU")
    p.add_argument("--size", default="704*384",
                   help="generation area budget (default 704*384); a comma-separated list "
                        "measures each in one process (one output per size)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--blocks", type=int, default=8,
                   help="steady-state blocks measured after the warm-up (default 8)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the plain path first and print ratios to it (with --layout: "
                        "layout 1 in this process, with the same switches)")
    p.add_argument("--layout", default=None,
                   help="measure a whole pipeline of ranks (e.g. 4+vae): throughput, time to "
                        "first frame, each rank's stage time and peak memory")
    p.add_argument("--rank-share", default=None, metavar="LAYOUT:RANK",
                   help="measure on this one device what rank RANK of LAYOUT holds and runs "
                        "(e.g. 4:0): its stage time and peak memory")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", default=None,
                   help="config.toml whose [engine] speed switches to start from")
    p.add_argument("--text-device", default="cpu",
                   help="where umT5 lives (default cpu: the peak GPU memory is then what a "
                        "smaller card needs; prompts are encoded once)")
    speed = p.add_argument_group("speed switches (default: the config's, else config.toml's "
                                 "defaults)")
    speed.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                       help="FP8 (e4m3) DiT linears")
    speed.add_argument("--fp8-scaling", choices=("tensor", "row"), default=None)
    speed.add_argument("--audio-dtype", choices=("float32", "bfloat16"), default=None,
                       help="wav2vec2's precision (bfloat16: half its memory, for 24 GB cards)")
    speed.add_argument("--attention-backend", default=None,
                       choices=("auto", "default", "cudnn", "flash", "efficient", "math"),
                       help="SDPA backend (auto: the fastest at these shapes, probed)")
    speed.add_argument("--vae-overlap", action=argparse.BooleanOptionalAction, default=None,
                       help="VAE decode on a second CUDA stream beside the next block")
    speed.add_argument("--vae-channels-last", action=argparse.BooleanOptionalAction,
                       default=None, help="VAE convolutions channels-last (CUDA)")
    speed.add_argument("--vae-compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the VAE's norm/SiLU/padding between convolutions")
    speed.add_argument("--avatar-cache-mb", type=int, default=None,
                       help="per-avatar cache budget (0: off)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the DiT layer (compiled during the warm-up)")
    speed.add_argument("--compile-mode", default=None,
                       choices=("default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"))


def make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from engine.checkpoint.tiny import make_tiny_checkpoint as make

    path = make(args.dir, seed=args.seed, shards=args.shards)
    print(f"wrote a tiny random checkpoint to {path}")
    return 0


def check_checkpoint(args: argparse.Namespace) -> int:
    from engine.checkpoint.inspect import check_checkpoint as check
    from engine.errors import CheckpointError

    try:
        report = check(args.dir, lora=args.lora, lora_alpha=args.lora_alpha)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.format(args.max_keys))
    return 0 if report.ok else 1


def bench(args: argparse.Namespace) -> int:
    from engine.bench import command

    return command(args)


def preview_bench(args: argparse.Namespace) -> int:
    from engine.preview_bench import command

    return command(args)
