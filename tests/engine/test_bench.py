"""`avatar bench` runs on a CPU at tiny shapes and prints every figure the issue asks for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.random_weights import build_random_models, model_shapes
from stream.cli import main

RUN_KEYS = {
    "audio_features_ms", "dit_step_ms", "dit_step_mean_ms", "denoise_ms", "vae_decode_ms",
    "postprocess_ms", "block_ms", "fps", "dit_only_fps", "realtime_factor", "ttff_s",
    "ttff_cached_s", "sink_prefill_ms", "setup_ms", "peak_allocated_gb", "peak_reserved_gb",
    "host_rss_gb", "host_rss_peak_gb", "warmup_s", "kv_tokens", "tokens_per_block", "switches",
    "avatar_cache_hit", "decisions",
}


def test_bench_json_with_baseline_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tiny", "--size", "64*64", "--steps", "2", "--blocks", "2",
                 "--baseline", "--fp8", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["memory_plan_total_gb"] > 0 and "rings" in out["memory_plan_gb"]
    assert out["shapes"] == "tiny" and out["size"] == "64x64" and out["steps"] == 2
    runs = out["runs"]
    assert set(runs) == {"baseline", "configured"}
    for run in runs.values():
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        assert len(run["dit_step_ms"]) == 2 and all(s > 0 for s in run["dit_step_ms"])
        assert run["fps"] > 0 and run["ttff_s"] > 0 and run["sink_prefill_ms"] > 0
        # 64x64 -> 8x8 latents -> 16 tokens a frame; ring of 12 frames + sink (16 + 16 + 4 + 4)
        assert run["tokens_per_block"] == 48 and run["kv_tokens"] == 12 * 16 + 40
        assert {"reference", "motion", "text", "prefill", "vae_warmup"} <= set(run["setup_ms"])
    # the plain path has no avatar cache; the configured one (default 4096 MB) hits it
    assert runs["baseline"]["avatar_cache_hit"] is False
    assert runs["configured"]["avatar_cache_hit"] is True
    assert runs["baseline"]["switches"]["fp8"] is False and runs["configured"]["switches"]["fp8"]
    ratio = out["ratio_to_baseline"]
    assert ratio["kv_tokens"] == 1.0 and ratio["fps"] > 0
    assert out["bare_step_ms"] > 0 and out["step_over_bare"] > 0
    assert out["bare_step_fp8_ms"] > 0 and out["step_over_bare_fp8"] > 0


def test_bench_table_without_baseline_for_two_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tiny", "--size", "64*64,128*64", "--steps", "1", "--blocks",
                 "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("avatar bench: cpu") == 2 and "64x64" in text and "128x64" in text
    assert "fps" in text and "ratio" not in text and "memory_plan_total_gb" in text


def test_bench_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tiny", "--blocks", "0"]) == 2
    assert "--blocks=0" in capsys.readouterr().err


def test_random_models_have_real_dtypes_and_finite_outputs() -> None:
    device = torch.device("cpu")
    models = build_random_models(model_shapes("tiny", device), device, torch.bfloat16)
    dit = models.dit
    assert models.random_weights and dit.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in dit.casual_audio_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in models.wav2vec.parameters())
    assert not any(p.is_meta for p in models.text.parameters())
    # the tied umT5 embedding stays tied
    assert models.text.model.encoder.embed_tokens.weight is models.text.model.shared.weight
    context = models.text.encode(["a person talking"])[0]
    assert context.shape[1] == 32 and torch.isfinite(context.float()).all()
    feats = models.wav2vec(torch.from_numpy(np.random.default_rng(0).standard_normal(
        16000).astype(np.float32))[None])
    assert torch.isfinite(feats).all()
