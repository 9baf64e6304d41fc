"""`avatar soak` for two minutes (the CI version of the 30-minute run): 4 sessions with bots
speaking and interrupting and viewers coming and going; the server stays flat and no audio is
lost. The figures are printed (run pytest with -s to see them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.cli import main
from tests.stream.test_browser import loopback_only

pytestmark = pytest.mark.slow


def test_two_minutes_of_churn_stay_flat_and_lose_no_audio(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    if not loopback_only():
        pytest.skip("the viewers' WebRTC needs a loopback-only network namespace (.ci/test)")
    out = tmp_path / "soak.json"
    rc = main(["soak", "--minutes", "2", "--sessions", "4", "--every", "10",
               "--json", str(out)])
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    result = json.loads(out.read_text())
    audio = result["audio"]
    assert result["errors"] == []
    assert result["viewers_joined"] >= 10 and audio["utterances"] >= 20
    assert audio["interrupted"] >= 5
    lost = audio["sent_ms"] - audio["played_ms"] - audio["cleared_ms"]
    assert lost == 0, audio  # every sent millisecond played or cleared by an interrupt
    assert result["final"]["sessions"] == 0 and result["final"]["viewers"] == 0
    assert result["flat"], result["growth"]
    assert rc == 0 and "FLAT, nothing lost" in printed


# t s, RSS MB, fds, threads, tasks, sessions, viewers: a CI run's samples (2026-12-02), where the
# raw task count rose 15.5 from the middle third to the last only because more viewers happened
# to be watching at the later samples
TRACE = [(11, 209.0, 28, 7, 106, 4, 7), (21, 218.9, 24, 7, 93, 4, 7), (31, 221.8, 22, 7, 94, 4, 7),
         (41, 228.2, 22, 7, 103, 4, 8), (51, 233.0, 20, 7, 89, 4, 7), (61, 238.0, 18, 7, 74, 4, 4),
         (71, 241.8, 21, 7, 86, 4, 7), (81, 245.0, 18, 7, 69, 4, 3), (91, 251.8, 20, 7, 94, 4, 7),
         (101, 252.3, 21, 7, 97, 4, 7), (111, 252.6, 19, 7, 78, 4, 5),
         (120, 252.6, 23, 7, 101, 4, 8)]


def test_tasks_are_compared_per_client_and_a_leak_still_shows() -> None:
    from stream.soak import Sample, verdict

    idle, final = Sample(0, 117.1, 10, 4, 6, 0, 0), Sample(130, 252.4, 9, 7, 5, 0, 0)
    flat, growth = verdict([Sample(*row) for row in TRACE], idle, final)
    assert flat and abs(growth["tasks_run"]) < 1, growth
    # 3 tasks more at each sample after the middle of the run, whoever is watching: a leak
    leaking = [Sample(*row[:4], row[4] + max(0, 3 * (i - 5)), *row[5:])
               for i, row in enumerate(TRACE)]
    flat, growth = verdict(leaking, idle, final)
    assert not flat and growth["tasks_run"] > 15, growth
