"""`avatar latency-run`: what it counts from a bot's own video and the server's `stats`, and one
short run of the real command against a server it starts (the preview engine made 2x slower
than real time at the session's size, so the latency governor has to step down).

On a GPU the same command measures the governor on `avatar serve --random-weights`
(tests/engine/gpu/session.sh serve; the figures are in docs/latency.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream.latency_run import BlockSample, Frames, LatencyRun, RunResult, TierChange
from tests.conftest import REPO


def _picture(value: int, w: int = 64, h: int = 36) -> bytes:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()


def test_frames_count_a_held_picture_and_missing_frames() -> None:
    f = Frames()
    for n in range(5):  # moving
        f.add(40 * n, 64, 36, _picture(n))
    assert (f.received, f.same_as_previous, f.missing, f.longest_hold) == (5, 0, 0, 1)
    for n in range(5, 9):  # one picture sent four times: on screen for 5 slots with frame 4
        f.add(40 * n, 64, 36, _picture(4))
    assert (f.same_as_previous, f.longest_hold) == (4, 5)
    f.add(40 * 12, 64, 36, _picture(12))  # 9, 10, 11 never came: picture 4 stayed on
    assert f.missing == 3 and f.longest_hold == 8
    f.add(40 * 13, 64, 36, _picture(12))
    assert f.longest_hold == 8 and f.same_as_previous == 5
    assert f.longest_hold_after_warm_up == 1  # everything so far is in the first 10 s
    f.add(10_000, 64, 36, _picture(12))  # held from 480 ms to 10 s: 10000 / 40 - 12 slots
    assert f.longest_hold_after_warm_up == f.longest_hold == 250 - 12 + 1


def test_the_verdict_needs_settling_in_time_and_latency_under_the_target() -> None:
    r = RunResult(30.0, "704*384", 1500, {})
    r.changes = [TierChange(1.0, 2, "704x384/4 steps", "448x256/4 steps", "load")]
    r.samples = [BlockSample(0.5 * i, i, "448x256/4 steps", 1300 + i, 1350, 0, 0)
                 for i in range(1, 40)]
    assert r.settled_after_blocks == 2 and r.ok(settle_blocks=10)
    assert not r.ok(settle_blocks=1)
    assert r.summary()["tiers"] == ["704x384/4 steps", "448x256/4 steps"]
    assert r.summary()["latency_ms"]["max"] == 1339
    r.samples.append(BlockSample(21.0, 41, "448x256/4 steps", 1600, 1350, 0, 0))
    assert not r.ok(settle_blocks=10)


def test_settings_become_the_server_s_config() -> None:
    run = LatencyRun(10, "704*384", None, None, ["engine.fp8=true", "latency.target_s=1.2"],
                     [], None, 60)
    text = run._config(8123)
    assert "[server]\nport = 8123\n" in text and "[engine]\nfp8 = true\n" in text
    assert "[latency]\ntarget_s = 1.2\n" in text and 'default_size = "704*384"' in text
    with pytest.raises(ValueError, match="expected section.key=value"):
        LatencyRun(10, "704*384", None, None, ["fp8"], [], None, 60)._config(1)


def test_latency_run_on_a_preview_2x_too_slow(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "latency-run", "--seconds", "15", "--size",
         "704*384", "--set", "engine.preview_speed=0.5", "--json", str(out),
         "--server-log", str(tmp_path / "server.log")],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    print(proc.stdout[-3000:])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    # the governor moved the session off 704x384 within its first blocks, and said so
    assert summary["tiers"][0] == "704x384/4 steps" and len(summary["tiers"]) >= 2
    assert summary["settled_after_blocks"] <= 10 and result["changes"][0]["message"]
    # the bot's video and the server's stats came throughout
    assert summary["frames"]["received"] >= 0.5 * 25 * 15, summary
    assert len(result["samples"]) >= 15 and summary["latency_ms"]["n"] > 0
    assert summary["target_ms"] == 1500
    assert ("SETTLED" in proc.stdout) == (proc.returncode == 0)
