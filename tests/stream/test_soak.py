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
