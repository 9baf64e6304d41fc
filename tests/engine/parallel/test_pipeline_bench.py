"""`avatar bench --layout` and `--rank-share` run on the CPU at tiny shapes and print every
figure the issue asks for (throughput, time to first frame, per-rank stage times and memory)."""

from __future__ import annotations

import json

import pytest

from stream.cli import main


def bench_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["bench", "--tiny", "--size", "64*64", "--blocks", "2", "--json", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_layout_bench_reports_throughput_ttff_and_every_rank(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = bench_json(capsys, "--steps", "2", "--layout", "1+vae")
    assert out["mode"] == "layout" and out["layout"] == "1+vae" and out["world"] == 2
    assert out["size"] == "64x64" and out["in_flight"] == 3
    for key in ("fps", "pipeline_fps", "block_ms", "stage_max_ms", "stage_sum_ms",
                "block_latency_ms", "ttff_s", "ttff_cached_s", "warmup_s", "realtime_factor"):
        assert out[key] > 0, key
    assert out["avatar_cache_hit"] is True  # the second new session with the same avatar
    first = out["first_block"]
    assert len(first["step_ms"]) == 2 and first["decode_ms"] > 0
    assert first["total_ms"] >= sum(first["step_ms"]) + first["decode_ms"]
    ranks = out["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # in a k+vae layout the VAE rank computes the features; the DiT ranks hold the DiT only
    assert ranks[0]["parts"] == ["dit"] and ranks[1]["parts"] == ["vae", "text", "wav2vec"]
    assert all(r["stage_ms_median"] > 0 and r["blocks"] >= 2 for r in ranks)
    assert all("host_rss_peak_gb" in r for r in ranks)  # (peak_reserved_gb on a GPU)
    assert out["pipeline_fps"] == pytest.approx(12_000 / out["stage_max_ms"], rel=0.01)


@pytest.mark.parametrize("share, parts, owned", [
    ("4:0", ["dit"], [0]),  # the audio tokens (from rank 1's features), and step 0
    ("4:1", ["dit", "wav2vec"], [1]),  # the audio features, and step 1
    ("4+vae:0", ["dit"], [0]),  # the audio tokens from features computed on the VAE rank
    ("2:1", ["dit", "vae", "text"], [2, 3]),
    ("4+vae:4", ["vae", "text", "wav2vec"], []),
])
def test_rank_share_measures_one_rank_on_one_device(capsys: pytest.CaptureFixture[str],
                                                     share: str, parts: list, owned: list
                                                     ) -> None:
    out = bench_json(capsys, "--steps", "4", "--rank-share", share)
    assert out["mode"] == "rank-share" and out["parts"] == parts and out["owned_steps"] == owned
    assert out["stage_ms"] > 0 and len(out["step_ms"]) == len(owned)
    assert (out["features_ms"] > 0) == ("wav2vec" in parts or share.endswith(":0"))
    assert (out["decode_ms"] > 0) == ("vae" in parts)
    assert ("prefill_ms" in out) == ("dit" in parts)
    assert ("avatar_encode_ms" in out) == ("vae" in parts)
    assert set(out["weights_gb"]) == set(parts)
    assert out["memory_plan_total_gib"] >= 0 and "host_rss_peak_gb" in out
    assert (out["rings_gb"] > 0) == bool(owned)


def test_bad_rank_shares_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--tiny", "--rank-share", "4"]) == 2
    assert "expected LAYOUT:RANK" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--rank-share", "4:4"]) == 2
    assert "has ranks 0..3" in capsys.readouterr().err
