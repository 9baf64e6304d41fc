"""`avatar latency-run`: one talking session on a server for a given time, and what its latency
governor did: the generation tiers it chose (and at which block), the latency audio -> frame per
block, and whether the face kept moving.

It starts `avatar serve` as a child process (its own config: an API key, ICE on loopback only,
the session's size as the top rung, and any `--set section.key=value`; pass `--random-weights`
through `--serve-arg`), or uses a running server (`--url`, `--api-key`). Then a WebSocket bot
(the SDK, `avatar_client`) speaks speech-like utterances with short pauses, paced at real time
as a TTS would send them, asks for H.264 video on its own socket and `stats` every 0.5 s, and
decodes what it gets:

- per `stats` event: blocks done, the tier, `audio_to_frame_ms` (the server's audio received ->
  first frame of the block sent), the playout delay, late and skipped blocks;
- per `tier.changed` (kind generation): from, to, why, and the blocks done when it came;
- per video frame: whether its picture is the previous one again (a 64x36 grey thumbnail within
  0.5 grey levels) or a frame is missing (a gap in the media times), for the longest run of one
  picture held on screen.

The verdict (exit code 0 yes, 1 no): the governor's last change came within `--settle-blocks`
blocks of the start, and after it every block's latency stayed under the server's target.
This is how the GPU line of the latency issue is measured on `--random-weights`; on a CPU the
preview engine runs it too (tests/stream/test_latency_run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from stream.child_server import free_port, spawn, wait_ready
from stream.latency_probe import summary as latency_summary
from stream.soak import RATE, voice

log = logging.getLogger(__name__)

WARM_UP_MS = 10_000  # the first frames come before the governor has measured a block
THUMB = (36, 64)  # rows, columns of the grey thumbnail a repeat is judged on
SAME_PICTURE = 0.5  # mean absolute difference (grey levels) under which two pictures are one


# 1. What is measured ---------------------------------------------------------------------------


@dataclass
class BlockSample:
    t: float  # seconds since the session started
    blocks: int
    tier: str
    audio_to_frame_ms: int | None
    playout_delay_ms: int
    late_blocks: int
    skipped_blocks: int


@dataclass
class TierChange:
    t: float
    after_blocks: int  # blocks the session had done when the change was announced
    previous: str
    tier: str
    message: str


class Frames:
    """What the bot's own video showed."""

    def __init__(self) -> None:
        self.received = 0
        self.same_as_previous = 0
        self.missing = 0  # frames absent from the media timeline (the server dropped them)
        self.longest_hold = 1  # the most frames in a row showing one picture (1: always moving)
        self.longest_hold_after_warm_up = 1  # the same from media time WARM_UP_MS on
        self._run = 1
        self._last: np.ndarray | None = None
        self._last_pts: int | None = None

    def add(self, pts: int, width: int, height: int, rgb: bytes) -> None:
        grey = np.frombuffer(rgb, np.uint8).reshape(height, width, 3).mean(axis=2)
        rows = np.linspace(0, height - 1, THUMB[0]).astype(int)
        cols = np.linspace(0, width - 1, THUMB[1]).astype(int)
        thumb = grey[np.ix_(rows, cols)]
        gap = 0 if self._last_pts is None else max(0, round((pts - self._last_pts) / 40) - 1)
        same = self._last is not None and thumb.shape == self._last.shape and \
            float(np.abs(thumb - self._last).mean()) < SAME_PICTURE
        self.received += 1
        self.missing += gap
        self.same_as_previous += int(same)
        self._run += gap  # a missing frame leaves the previous picture on screen for its slot
        self._held(pts)
        self._run = self._run + 1 if same else 1
        self._held(pts)
        self._last, self._last_pts = thumb, pts

    def _held(self, pts: int) -> None:
        self.longest_hold = max(self.longest_hold, self._run)
        if pts >= WARM_UP_MS:
            self.longest_hold_after_warm_up = max(self.longest_hold_after_warm_up, self._run)

    def figures(self) -> dict[str, int]:
        return {"received": self.received, "missing": self.missing,
                "same_as_previous": self.same_as_previous, "longest_hold": self.longest_hold,
                "longest_hold_after_warm_up": self.longest_hold_after_warm_up}


@dataclass
class RunResult:
    seconds: float
    size: str
    target_ms: int
    ready: dict[str, Any]  # the server's /readyz when the run started
    samples: list[BlockSample] = field(default_factory=list)
    changes: list[TierChange] = field(default_factory=list)
    frames: Frames = field(default_factory=Frames)
    errors: list[str] = field(default_factory=list)

    @property
    def settled_after_blocks(self) -> int:
        """Blocks done when the last tier change came (0: the first tier held)."""
        return self.changes[-1].after_blocks if self.changes else 0

    def latencies_after_settling(self) -> list[int]:
        settled = self.settled_after_blocks
        return [s.audio_to_frame_ms for s in self.samples
                if s.audio_to_frame_ms is not None and s.blocks > settled + 1]

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_after_settling()
        last = self.samples[-1] if self.samples else None
        return {
            "tiers": [self.changes[0].previous if self.changes else
                      self.samples[0].tier if self.samples else self.size]
            + [c.tier for c in self.changes],
            "settled_after_blocks": self.settled_after_blocks,
            "blocks": last.blocks if last else 0,
            "latency_ms": latency_summary(lat),
            "target_ms": self.target_ms,
            "skipped_blocks": last.skipped_blocks if last else 0,
            "late_blocks": last.late_blocks if last else 0,
            "frames": self.frames.figures(),
        }

    def ok(self, settle_blocks: int) -> bool:
        lat = self.latencies_after_settling()
        return (not self.errors and bool(lat) and self.settled_after_blocks <= settle_blocks
                and max(lat) < self.target_ms)


# 2. The run ------------------------------------------------------------------------------------


class LatencyRun:
    def __init__(self, seconds: float, size: str, url: str | None, api_key: str | None,
                 settings: list[str], serve_args: list[str], server_log: str | None,
                 ready_timeout: float):
        self.seconds, self.size = seconds, size
        self.base = url.rstrip("/") if url else ""
        self.key = api_key if url else secrets.token_urlsafe(24)
        self.settings, self.serve_args = settings, serve_args
        self.server_log, self.ready_timeout = server_log, ready_timeout

    def _config(self, port: int) -> str:
        sections: dict[str, dict[str, str]] = {
            "server": {"port": str(port), "api_keys": json.dumps([self.key])},
            "webrtc": {"host_addresses": '["127.0.0.1"]'},
            "sessions": {"default_size": json.dumps(self.size)},
        }
        for item in self.settings:
            name, _, value = item.partition("=")
            section, _, key = name.strip().rpartition(".")
            if not section or not key or not value:
                raise ValueError(f"--set {item!r}: expected section.key=value (a TOML value), "
                                 "e.g. engine.fp8=true or latency.target_s=1.5")
            sections.setdefault(section, {})[key] = value.strip()
        return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                       for name, keys in sections.items())

    def start_server(self, folder: Path) -> subprocess.Popen:
        port = free_port()
        config = folder / "latency-run.toml"
        config.write_text(self._config(port))
        self.base = f"http://127.0.0.1:{port}"
        log = Path(self.server_log) if self.server_log else folder / "server.log"
        return spawn(config, log, tuple(self.serve_args))

    async def run(self, report: TextIO) -> RunResult:
        with tempfile.TemporaryDirectory(prefix="avatar-latency-run-") as tmp:
            proc = None if self.base else self.start_server(Path(tmp))
            try:
                headers = {"Authorization": f"Bearer {self.key}"} if self.key else None
                ready = await wait_ready(  # loading and compiling take minutes: say so
                    self.base, proc, self.ready_timeout, headers,
                    lambda status: print(f"waiting for the server ({status})", flush=True))
                return await self.session(ready, report)
            finally:
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()

    async def session(self, ready: dict[str, Any], report: TextIO) -> RunResult:
        from avatar_client import AvatarSocket, create_session, delete_session

        session = await create_session(self.base, api_key=self.key, size=self.size)
        result = RunResult(self.seconds, self.size, 0, ready)
        try:
            async with await AvatarSocket.connect(session) as sock:
                await sock.update(sample_rate=RATE, video="h264", audio=False,
                                  stats_interval_ms=500)
                started = time.monotonic()
                reader = asyncio.get_running_loop().create_task(
                    self.read(sock, result, started, report), name="latency-run-reader")
                try:
                    await self.speak(sock, started)
                finally:
                    await sock.close()
                    await asyncio.gather(reader, return_exceptions=True)
                if reader.done() and not reader.cancelled() and reader.exception():
                    result.errors.append(f"reader: {reader.exception()!r}")
        finally:
            with contextlib.suppress(Exception):
                await delete_session(session)
        return result

    async def speak(self, sock: Any, started: float) -> None:
        """Utterances of 2-6 s with 0.3-1 s pauses, as long as the run lasts."""
        rng = np.random.default_rng(7)
        n = 0
        while time.monotonic() - started < self.seconds:
            n += 1
            await sock.stream(voice(float(rng.uniform(2.0, 6.0)), seed=n))
            await asyncio.sleep(float(rng.uniform(0.3, 1.0)))

    async def read(self, sock: Any, result: RunResult, started: float, report: TextIO) -> None:
        from avatar_client import MediaFrame, Stats, TierChanged
        from avatar_client.media import VideoDecoder

        decoder, blocks, printed = VideoDecoder(), 0, 0.0
        print(f"{'t s':>6} {'blocks':>6} {'tier':>20} {'audio->frame ms':>15} "
              f"{'delay ms':>8} {'late':>5} {'skipped':>7} {'frames':>6} {'hold':>5}",
              file=report, flush=True)
        async for item in sock.events():
            now = round(time.monotonic() - started, 2)
            if isinstance(item, MediaFrame):
                if not item.is_audio:
                    for width, height, rgb in await asyncio.to_thread(decoder.decode, item):
                        result.frames.add(item.pts, width, height, rgb)
            elif isinstance(item, Stats):
                lat = item.latency
                blocks = int(item.raw.get("blocks", 0))
                result.target_ms = int(lat.get("target_ms", 0))
                sample = BlockSample(now, blocks, _tier(item.generation),
                                     lat.get("audio_to_frame_ms"),
                                     int(lat.get("playout_delay_ms", 0)),
                                     int(lat.get("late_blocks", 0)),
                                     int(lat.get("skipped_blocks", 0)))
                result.samples.append(sample)
                if now - printed >= 5.0:
                    printed = now
                    shown = "-" if sample.audio_to_frame_ms is None else sample.audio_to_frame_ms
                    print(f"{now:6.1f} {blocks:6d} {sample.tier:>20} {shown:>15} "
                          f"{sample.playout_delay_ms:8d} {sample.late_blocks:5d} "
                          f"{sample.skipped_blocks:7d} {result.frames.received:6d} "
                          f"{result.frames.longest_hold:5d}", file=report, flush=True)
            elif isinstance(item, TierChanged) and item.kind == "generation":
                change = TierChange(now, blocks, _tier(item.previous_generation),
                                    _tier(item.generation), item.message)
                result.changes.append(change)
                print(f"{now:6.1f} tier.changed after {blocks} blocks: {change.previous} -> "
                      f"{change.tier} ({change.message})", file=report, flush=True)


def _tier(g: dict[str, Any] | None) -> str:
    """A generation tier ({size, steps}) as the server's logs write it: 448x256/4 steps."""
    if not g:
        return ""
    return f"{str(g.get('size', '')).replace('*', 'x')}/{g.get('steps')} steps"


# 3. The command --------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency-run", help="one talking session for a while: the tiers the "
                                           "latency governor chose and the latency per block")
    p.add_argument("--seconds", type=float, default=180.0, help="length (default 180)")
    p.add_argument("--size", default="704*384", help="the session's size (default 704*384)")
    p.add_argument("--url", help="a running server (default: start `avatar serve` here)")
    p.add_argument("--api-key", help="its API key (with --url)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config value for the server started here, as TOML, e.g. "
                        "engine.fp8=true (repeatable)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an argument for `avatar serve`, e.g. --serve-arg=--random-weights")
    p.add_argument("--settle-blocks", type=int, default=10,
                   help="the governor's last change must come within this many blocks")
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="seconds to wait for the server to load and warm up (default 1800)")
    p.add_argument("--server-log", help="keep the log of the server started here")
    p.add_argument("--json", help="also write the whole result to this JSON file")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    if not 5 <= args.seconds <= 24 * 3600:
        print(f"error: --seconds {args.seconds} is outside 5..86400", file=sys.stderr)
        return 2
    if args.url and not args.api_key:
        print("error: --url needs the server's --api-key", file=sys.stderr)
        return 2
    run = LatencyRun(args.seconds, args.size, args.url, args.api_key, args.set, args.serve_arg,
                     args.server_log, args.ready_timeout)
    try:
        run._config(0)
        result = asyncio.run(run.run(sys.stdout))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    lat = summary["latency_ms"]
    print(f"\nready: {json.dumps(result.ready.get('capacity', result.ready))}")
    print(f"tiers: {' -> '.join(summary['tiers'])}; settled after "
          f"{summary['settled_after_blocks']} blocks of {summary['blocks']}")
    print(f"latency audio -> frame after settling: median {lat['median']} ms, p95 {lat['p95']} "
          f"ms, max {lat['max']} ms over {lat['n']} samples (target {result.target_ms} ms)")
    f = summary["frames"]
    print(f"frames: {f['received']} received, {f['missing']} missing, longest hold "
          f"{f['longest_hold']} frames ({f['longest_hold_after_warm_up']} after the first "
          f"{WARM_UP_MS // 1000} s); {summary['late_blocks']} late and "
          f"{summary['skipped_blocks']} skipped blocks")
    for error in result.errors:
        print(f"error: {error}")
    ok = result.ok(args.settle_blocks)
    print("SETTLED, under the target" if ok else "NOT OK")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "summary": summary, "ready": result.ready, "errors": result.errors,
            "changes": [asdict(c) for c in result.changes],
            "samples": [asdict(s) for s in result.samples]}, indent=1))
    return 0 if ok else 1
