"""`avatar latency-probe`: glass-to-glass latency, measured in headless Chromium.

A microphone makes a sound; how long until the avatar's face shows it? The probe starts
`avatar serve` (the preview engine with its measurement marks, [engine] preview_marks; ICE on
loopback only) as a child process, unless `--url` names a running server that has them, and
opens the call page in headless Chromium with `?probe=1` and a fake microphone playing a WAV of
short tone bursts ("clicks") at irregular intervals. The page (client/web/probe.js) records on
its own clock when each click starts in the microphone track it sends, and when each decoded
frame carrying the preview's onset mark (a white corner patch on the frame whose audio starts a
sound) is due on screen, with the frame number stamped in that frame. `match_onsets` pairs them
and the command prints every onset's latency, the median and the 95th percentile.

Matching goes through the frame numbers, so it holds at any latency, even one longer than the
gap between clicks: the click heard at page time S lies in the audio of media frame n, and
S - n/25 is the same for every click (the server stamps the caller's audio contiguously), so the
most common value of S - n/25 over all (click, marked frame) pairs is that offset, and each
marked frame shows the click whose S - n/25 lies within two frames of it.

The same matching serves the aiortc tests (tests/stream/marks.py), which stamp onsets on their
own caller's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.child_server import free_port, spawn, wait_ready

FRAME_S = 0.04
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required"]


# 1. Matching onsets to the frames that show them -------------------------------------------------


@dataclass(frozen=True)
class OnsetLatency:
    sent: float  # when the frame's audio was at the microphone (the prober's clock, s)
    seen: float  # when the first frame showing it was (due to be) on screen
    frame: int  # that frame's number

    @property
    def seconds(self) -> float:
        return self.seen - self.sent


def match_onsets(sent: Sequence[float], marks: Sequence[tuple[float, int]],
                 tolerance_frames: int = 4, max_latency_s: float = 10.0) -> list[OnsetLatency]:
    """Each mark (seen time, frame number) paired with the onset it shows (the module doc);
    marks that match no onset (a sound the prober did not make) are left out. Only pairs
    seen 0..`max_latency_s` after the onset count. A mark seen on a later frame of the patch
    than its first (a receiver that skipped a frame) is timed for that frame's own audio: the
    onset's time plus the frames between."""
    onsets = np.asarray(sent, np.float64)
    pairs = [(s, n) for seen, n in marks for s in onsets if 0 < seen - s < max_latency_s]
    if not pairs:
        return []
    offsets = np.array([s - n * FRAME_S for s, n in pairs])
    bins = np.round(offsets / FRAME_S).astype(np.int64)
    values, counts = np.unique(bins, return_counts=True)
    best = values[np.argmax(counts)]
    mode = float(np.median(offsets[np.abs(bins - best) <= 1]))  # within a frame of the mode
    out, used = [], set()
    for seen, n in marks:
        frames = np.round((n * FRAME_S + mode - onsets) / FRAME_S)  # the mark's frame - onset's
        j = int(np.argmin(np.abs(frames)))
        # -1: the prober's own timing of an onset jitters by some ms (its audio callbacks), so
        # an onset late in its frame can round to the frame before; a later frame of the patch
        # (up to tolerance_frames) is timed for its own audio
        if -1 <= frames[j] <= tolerance_frames and j not in used and seen > onsets[j]:
            used.add(j)
            later = max(0.0, float(frames[j]))
            out.append(OnsetLatency(float(onsets[j] + later * FRAME_S), float(seen), int(n)))
    return out


def summary(values: Sequence[float]) -> dict[str, Any]:
    """n, median, p95 and max of `values` (in their own unit)."""
    if not len(values):
        return {"n": 0, "median": None, "p95": None, "max": None}
    a = np.asarray(values, np.float64)
    return {"n": len(a), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


# 2. The microphone's clicks ----------------------------------------------------------------------


def click_track(seconds: float, rate: int = 48000, seed: int = 13) -> np.ndarray:
    """Tone bursts of 60 ms (1 kHz, 5 ms ramps) at irregular gaps of 1.0-1.8 s: float32 mono."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * rate), np.float32)
    n = int(0.06 * rate)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (0.005 * rate))
    burst = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / rate) * ramp).astype(np.float32)
    t = 0.5
    while t + 0.1 < seconds:
        start = int(t * rate)
        out[start:start + n] = burst
        t += rng.uniform(1.0, 1.8)
    return out


def write_wav(path: Path, signal: np.ndarray, rate: int = 48000) -> Path:
    pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


# 3. The run --------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    url: str
    seconds: float
    onsets_heard: int  # clicks the page heard in its microphone
    marks_seen: int  # frames with the onset mark the page saw
    frames: int  # decoded frames the page looked at
    latencies_ms: list[int]
    median_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    error: str | None = None
    onsets_s: list[float] = field(default_factory=list)  # the page's records, as they came
    marks: list[tuple[float, int]] = field(default_factory=list)
    # the session's own figures at the end, as the page last polled them (GET /v1/sessions/ID):
    # blocks, silent blocks, input resyncs, latency and generation; they say why a bad run was
    server: dict[str, Any] = field(default_factory=dict)


def start_server(folder: Path, size: str) -> tuple[subprocess.Popen, str]:
    """`avatar serve` with the preview's marks, on a free loopback port, its WebRTC viewers kept
    on the first rung of the output ladder: what the probe measures is the pipeline's latency,
    and Chromium's bandwidth estimate on loopback was seen to fall to 90-390 kbit/s (0% loss,
    no queue) a few seconds into a call, which moved the page to the 12.5 fps, 344x196 rung:
    half the frames gone, and the marks scaled until their frame numbers misread."""
    port = free_port()
    config = folder / "probe.toml"
    config.write_text(f'[server]\nport = {port}\n[webrtc]\nhost_addresses = ["127.0.0.1"]\n'
                      f'[sessions]\ndefault_size = "{size}"\n[engine]\npreview_marks = true\n'
                      '[media]\nadapt_variants = false\n')
    return spawn(config, folder / "server.log"), f"http://127.0.0.1:{port}"


async def probe(base: str, seconds: float, size: str, wav: Path, chromium: str) -> ProbeResult:
    """One call from headless Chromium for `seconds`; the page's records matched."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=chromium, headless=True,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = await (await browser.new_context()).new_page()
            await page.goto(f"{base}/call?probe=1&size={size}")
            await page.click("#start")
            await page.wait_for_function("window.avatarStats.state === 'connected'",
                                         timeout=30_000)
            await asyncio.sleep(seconds)
            seen = await page.evaluate("window.avatarProbe")
            server = await page.evaluate("window.avatarStats.server || {}")
        finally:
            await browser.close()
    if seen is None:
        return ProbeResult(base, seconds, 0, 0, 0, [], None, None, None,
                           "the page started no probe (is probe.js served?)")
    marks = [(m["t"] / 1000, m["frame"]) for m in seen["marks"]]
    matched = match_onsets([t / 1000 for t in seen["onsets"]], marks)
    figures = summary([m.seconds for m in matched])
    ms = {k: None if figures[k] is None else round(1000 * figures[k], 1)
          for k in ("median", "p95", "max")}
    return ProbeResult(base, seconds, len(seen["onsets"]), len(marks), seen["frames"],
                       [round(1000 * m.seconds) for m in matched], ms["median"], ms["p95"],
                       ms["max"], seen.get("error"), [t / 1000 for t in seen["onsets"]], marks,
                       server)


async def run(args: argparse.Namespace) -> ProbeResult:
    with tempfile.TemporaryDirectory(prefix="avatar-probe-") as tmp:
        folder = Path(tmp)
        wav = write_wav(folder / "clicks.wav", click_track(60.0))
        proc = None
        base = args.url
        if base is None:
            proc, base = start_server(folder, args.size)
        try:
            await wait_ready(base, proc)
            return await probe(base, args.seconds, args.size, wav, args.chromium)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if args.server_log:
                    shutil.copy(folder / "server.log", args.server_log)


def server_line(stats: dict[str, Any]) -> str:
    """The session's figures that explain a latency: what was generated, skipped and resynced."""
    lat, gen = stats.get("latency") or {}, stats.get("generation") or {}
    return (f"{stats.get('blocks')} blocks ({stats.get('silent_blocks')} silent, "
            f"{lat.get('late_blocks')} late, {lat.get('skipped_blocks')} skipped), "
            f"{stats.get('frames_sent')} frames sent, {stats.get('audio_in_resyncs')} audio "
            f"input resyncs, target delay {lat.get('target_delay_ms')} ms (inserted "
            f"{lat.get('delay_inserted_ms')} ms, dropped {lat.get('delay_dropped_ms')} ms), "
            f"stages {lat.get('stages_ms')}, tier {gen.get('size')}/{gen.get('steps')} steps")


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency-probe", help="measure glass-to-glass latency in headless "
                                             "Chromium (clicks in, marked frames out)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the call (default 30)")
    p.add_argument("--size", default="448*256", help="generation size (default 448*256)")
    p.add_argument("--url", help="a running server whose preview has [engine] preview_marks "
                                 "(default: start one; best with [media] adapt_variants = "
                                 "false, so the page is not moved to a scaled rung)")
    p.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    p.add_argument("--min-onsets", type=int, default=5,
                   help="fewer matched onsets than this is a failure (exit 1; default 5)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--server-log", help="keep the log of the server it started here")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if not 3 <= args.seconds <= 3600:
        print(f"error: --seconds {args.seconds}: accepted 3..3600", file=sys.stderr)
        return 2
    if not Path(args.chromium).exists():
        print(f"error: no browser at {args.chromium}: install Chromium (Debian: apt-get install "
              "chromium) or pass --chromium", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("error: the probe drives Chromium through Playwright: pip install playwright",
              file=sys.stderr)
        return 2
    result = asyncio.run(run(args))
    for i, ms in enumerate(result.latencies_ms):
        print(f"onset {i + 1}: {ms} ms")
    print(f"{len(result.latencies_ms)} onsets matched ({result.onsets_heard} heard in the "
          f"microphone, {result.marks_seen} marked frames seen, {result.frames} frames decoded "
          f"in {result.seconds:.0f} s)")
    print(f"glass-to-glass latency: median {result.median_ms} ms, p95 {result.p95_ms} ms, "
          f"max {result.max_ms} ms")
    if result.server:
        print(f"server: {server_line(result.server)}")
    if result.error:
        print(f"error: {result.error}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0 if len(result.latencies_ms) >= args.min_onsets and not result.error else 1
