"""Glass-to-glass latency in headless Chromium: `avatar latency-probe` for 20 s (a click in the
fake microphone -> the preview's onset mark seen in the decoded video, on the page's clock), and
the matching it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream.cli import main
from stream.latency_probe import click_track, match_onsets
from tests.stream.test_browser import CHROMIUM, loopback_only


def test_matching_holds_at_a_latency_longer_than_the_gaps() -> None:
    clicks = np.flatnonzero(np.diff((np.abs(click_track(30.0)) > 0).astype(int)) == 1) / 48000
    sent = 100.0 + clicks  # the prober's clock; the server's media time starts 3.3 s later
    latency = 2.5  # longer than any gap between clicks (1.0-1.8 s)
    marks = [(s + latency + 0.01 * (i % 3), int(round((s - 100.0 + 3.3) / 0.04)))
             for i, s in enumerate(sent)]
    marks.insert(4, (115.0, 9999))  # a mark no click explains is left out
    matched = match_onsets(list(sent), marks)
    assert len(matched) == len(sent)
    # to within a frame: an onset lies anywhere in its 40 ms frame
    assert all(abs(m.seconds - latency) <= 0.045 for m in matched)


@pytest.mark.browser
def test_latency_probe_prints_median_and_p95(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run .ci/install")
    if not loopback_only():
        pytest.skip("needs a loopback-only network namespace: run the suite with .ci/test")
    out, log = tmp_path / "probe.json", tmp_path / "server.log"
    rc = main(["latency-probe", "--seconds", "20", "--min-onsets", "6", "--json", str(out),
               "--server-log", str(log)])
    printed = capsys.readouterr().out
    # what the server said beyond the routine (re-anchored input, warnings, the session's end)
    notable = [line for line in log.read_text().splitlines()
               if ("WARNING" in line or "ERROR" in line or "re-anchored" in line
                   or "session ends" in line) and "API key" not in line and "PREVIEW" not in line]
    with capsys.disabled():
        print("\n" + printed + "\n".join(notable[-20:]))
    result = json.loads(out.read_text())
    assert rc == 0, (printed, notable[-20:], result["onsets_s"], result["marks"])
    assert "glass-to-glass latency: median" in printed and "p95" in printed
    assert result["error"] is None and len(result["latencies_ms"]) >= 6
    # the preview at full speed: the playout delay (about 1 s) and the browser's own buffers
    assert 200 <= result["median_ms"] <= 1500 and result["p95_ms"] <= 2500, result
    assert result["frames"] >= 25 * 20 * 0.7  # the page decoded (nearly) every frame
