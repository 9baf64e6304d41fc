"""wav2vec2's time per block on a GPU at each `[engine] audio_dtype` (issue 9: the features rank
of a 24 GB card runs it in bfloat16), with the slowest kernels of each, and the features'
error against float32. Random weights at the released model's shapes, one block's window
(the configured left context + a 0.48 s block + the look-ahead).

    python3 -m tests.engine.gpu.profile_features
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from engine.audio_features import AudioFeatureConfig, StreamingAudioFeatures, window_features
from engine.random_weights import build_random_parts, model_shapes

CUDA = torch.device("cuda")


def timed(fn, n: int = 20) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    shapes = model_shapes("14B", CUDA)
    w32 = build_random_parts(shapes, ("wav2vec",), CUDA, torch.bfloat16)["wav2vec"]
    models = {"float32": w32}
    models["bfloat16"] = copy.deepcopy(w32).to(torch.bfloat16)
    cfg = AudioFeatureConfig()
    audio = StreamingAudioFeatures(None, cfg)
    rng = np.random.default_rng(0)
    audio.push((0.1 * rng.standard_normal(16000 * 8)).astype(np.float32))
    window = audio.window(25 * 5, 12)
    report: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        want = window_features(w32, window, CUDA)
        for name, model in models.items():
            ms = timed(lambda m=model: window_features(m, window, CUDA))
            got = window_features(model, window, CUDA)
            err = float((got - want).norm() / want.norm())
            report[name] = {"ms": round(ms, 2), "relative_l2_vs_float32": err,
                            "weights_gb": sum(p.numel() * p.element_size()
                                              for p in model.parameters()) / 1e9}
            print(f"{name}: {ms:.2f} ms per block, relative L2 vs float32 {err:.2e}, weights "
                  f"{report[name]['weights_gb']:.3f} GB")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                window_features(model, window, CUDA)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
