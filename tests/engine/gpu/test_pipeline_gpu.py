"""The pipeline on CUDA (run on a lent GPU machine): one rank's share on one GPU (the tiny shapes:
the code path of `avatar bench --rank-share`), and, with two GPUs or more, a 2-rank NCCL pipeline
against one GPU on the tiny checkpoint in bfloat16. Skipped without the GPUs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import AudioChunk, SessionParams
from engine.bench import BenchOptions
from engine.checkpoint.loader import load_models
from engine.checkpoint.tiny import make_tiny_checkpoint
from engine.config import EngineConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]


def test_a_rank_share_on_one_gpu_reports_its_peaks(report: dict) -> None:  # noqa: ANN001
    from engine.parallel.bench import bench_rank_share

    out = bench_rank_share(EngineConfig(device="cuda", fp8=True),
                           BenchOptions(size="256*128", steps=4, blocks=3, tiny=True), "4", 0)
    report["rank_share_tiny_4_0"] = {k: out[k] for k in (
        "stage_ms", "peak_reserved_gib", "load_peak_reserved_gib", "memory_plan_total_gib")}
    assert out["peak_reserved_gib"] > 0 and "fits_24gb_card" in out and out["stage_ms"] > 0


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_two_gpu_pipeline_follows_one_gpu(report: dict, tmp_path) -> None:  # noqa: ANN001
    from engine.parallel.engine import ParallelEngine
    from engine.wan_engine import WanEngine

    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    img = np.zeros((384, 704, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, 704, dtype=np.uint8)[None]
    t = np.arange(16000 * 5) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(
        np.float32)
    params = SessionParams(image=img, size="256*128", seed=2)
    config = EngineConfig(checkpoint=str(ckpt), lora_alpha=2.0, device="cuda")

    def blocks(session) -> list[np.ndarray]:  # noqa: ANN001
        session.push_audio(AudioChunk(audio, 0))
        pending = [session.submit_block() for _ in range(6)]  # crosses the refresh (block 4)
        return [p.result().frames for p in pending]

    one = WanEngine(load_models(ckpt, torch.device("cuda"), torch.bfloat16, lora_alpha=2.0),
                    config)
    want = blocks(one.open_session(params))
    one.close()
    engine = ParallelEngine.load(EngineConfig(checkpoint=str(ckpt), lora_alpha=2.0,
                                              device="cuda", layout="2"))
    try:
        got = blocks(engine.open_session(params))
        ranks = engine.query()
    finally:
        engine.close()
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(got, want, strict=True))
    report["pipeline_2_gpus"] = {"max_uint8_difference": diff, "tolerance": 2,
                                 "ranks": {r: v["device"] for r, v in ranks.items()}}
    assert {v["device"] for v in ranks.values()} == {"cuda:0", "cuda:1"}
    assert diff <= 2  # the same kernels on the same kind of GPU: expected 0
