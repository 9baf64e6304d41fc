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


def test_matching_holds_when_the_probers_onset_times_jitter() -> None:
    """The page's onset times wobble by some ms against the server's frames (seen: a spread of
    60 ms), so some round to the frame before their mark's; every mark still finds its onset."""
    rng = np.random.default_rng(3)
    sent = np.cumsum(rng.uniform(1.0, 1.8, 14)) + 100.0
    frames = np.floor((sent - 100.0 + 3.3) / 0.04).astype(int)  # the frame each onset lies in
    heard = sent + rng.uniform(-0.03, 0.03, len(sent))  # as the page timed them
    marks = [(float(s + 0.7), int(n)) for s, n in zip(sent, frames, strict=True)]
    matched = match_onsets(list(heard), marks)
    assert len(matched) == len(sent)
    assert all(abs(m.seconds - 0.7) <= 0.075 for m in matched)


def _probe(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    out, log = folder / "probe.json", folder / "server.log"
    rc = main(["latency-probe", "--seconds", "20", "--min-onsets", "6", "--json", str(out),
               "--server-log", str(log)])
    printed = capsys.readouterr().out
    # what the server said beyond the routine (re-anchored input, warnings, the session's end)
    notable = [line for line in log.read_text().splitlines()
               if ("WARNING" in line or "ERROR" in line or "re-anchored" in line
                   or "session ends" in line) and "API key" not in line and "PREVIEW" not in line]
    printed += "\n".join(notable[-20:])
    with capsys.disabled():
        print("\n" + printed)
    return rc, printed, json.loads(out.read_text())


@pytest.mark.browser
def test_latency_probe_prints_median_and_p95(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """One retry: a starved headless Chromium (its fake microphone delivering audio in bursts,
    its software decoder dropping frames) was seen to fail a run now and then on shared CI
    machines; the failed run's figures, the server's included, stay printed above the retry."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run .ci/install")
    if not loopback_only():
        pytest.skip("needs a loopback-only network namespace: run the suite with .ci/test")
    rc, printed, result = _probe(tmp_path / "first", capsys)
    if rc != 0:
        with capsys.disabled():
            print("the first probe failed (figures above); once more")
        rc, printed, result = _probe(tmp_path / "second", capsys)
    assert rc == 0, (printed, result["onsets_s"], result["marks"])
    assert "glass-to-glass latency: median" in printed and "p95" in printed
    assert result["error"] is None and len(result["latencies_ms"]) >= 6
    # the preview at full speed: the playout delay (about 1 s) and the browser's own buffers
    assert 200 <= result["median_ms"] <= 1500 and result["p95_ms"] <= 2500, result
    assert result["frames"] >= 25 * 20 * 0.7  # the page decoded (nearly) every frame
