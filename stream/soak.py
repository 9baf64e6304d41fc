"""`avatar soak`: a server under churn for a given time, and whether it stays flat.

It starts `avatar serve` (the preview engine, an API key of its own, ICE on loopback only) as a
child process, opens N sessions, and for the whole run keeps, per session:

- a WebSocket bot (the SDK, `avatar_client`) speaking utterances of 0.5-3 s of a synthetic voice,
  faster than real time, every third one interrupted part-way;
- viewers joining and leaving: WebRTC (WHEP, aiortc) viewers that stay 3-12 s, and now and then
  an MPEG-TS reader.

Every `--every` seconds it reads the server's /metrics (its own RSS, open file descriptors,
threads, event-loop tasks, sessions and viewers) and prints a line. At the end it stops the
clients, ends the sessions and takes a last sample. Audio is accounted per utterance: every
millisecond the bots sent is either played (`utterance.ended.played_ms`) or cleared by their own
interrupts (`input_audio.cleared.dropped_ms`); anything else is lost. The verdict: flat (no
growth from the middle of the run to its end, and back to the idle figures once the clients
have gone) and nothing lost; the exit code says so (0 yes, 1 no).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from stream.child_server import free_port, spawn, wait_ready

log = logging.getLogger(__name__)

RATE = 16000


# 1. What is measured ---------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    rss_mb: float
    fds: int
    threads: int
    tasks: int
    sessions: int
    viewers: int


@dataclass
class Audio:
    utterances: int = 0
    interrupted: int = 0
    sent_ms: int = 0
    played_ms: int = 0
    cleared_ms: int = 0  # dropped by the bots' own interrupts

    @property
    def lost_ms(self) -> int:
        return self.sent_ms - self.played_ms - self.cleared_ms


@dataclass
class SoakResult:
    seconds: float
    sessions: int
    samples: list[Sample]
    idle: Sample  # before any client
    final: Sample  # after every client left
    audio: Audio
    viewers_joined: int = 0
    ts_readers: int = 0
    errors: list[str] = field(default_factory=list)
    growth: dict[str, float] = field(default_factory=dict)
    flat: bool = False

    @property
    def ok(self) -> bool:
        return self.flat and self.audio.lost_ms == 0 and not self.errors


def verdict(samples: list[Sample], idle: Sample, final: Sample) -> tuple[bool, dict[str, float]]:
    """Flat: the last third of the run is no higher than its middle third (beyond a
    tolerance), and once every client has gone the per-client resources (file descriptors,
    tasks) are back to their idle figures. Memory and threads are not compared with idle: the
    first sessions load codecs and start the encoder and set-up pools, which stay.

    The per-client resources come and go with the clients, whose number at a sample is chance
    (viewers join and leave every few seconds): they are compared per client above idle, at the
    run's median number of clients, so the tolerance keeps its units (a leak of 15 tasks over
    the run is 15 tasks either way) and a sample taken while 8 viewers watched is not read as
    growth over one taken while 3 did (seen: +15.5 tasks, -0.2 per client)."""
    third = max(1, len(samples) // 3)
    middle, last = samples[third:2 * third] or samples, samples[2 * third:] or samples
    growth: dict[str, float] = {}
    ok = final.sessions == 0 and final.viewers == 0
    clients = statistics.median(s.sessions + s.viewers for s in samples)

    def level(s: Sample, name: str) -> float:
        if name not in ("fds", "tasks"):
            return float(getattr(s, name))
        above = getattr(s, name) - getattr(idle, name)
        return above / max(1, s.sessions + s.viewers) * clients

    for name, run_slack, idle_slack in (("rss_mb", 15.0, None), ("fds", 8, 4),
                                        ("threads", 3, None), ("tasks", 15, 2)):
        mid = statistics.median(level(s, name) for s in middle)
        end = statistics.median(level(s, name) for s in last)
        growth[f"{name}_run"] = round(end - mid, 2)
        growth[f"{name}_after"] = round(getattr(final, name) - getattr(idle, name), 2)
        ok &= end - mid <= run_slack
        ok &= idle_slack is None or growth[f"{name}_after"] <= idle_slack
    return ok, growth


# 2. The clients --------------------------------------------------------------------------------


def voice(seconds: float, seed: int) -> bytes:
    """A speech-like s16le 16 kHz signal: harmonics of a gliding pitch under syllables."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 1000) * (RATE // 1000)) / RATE  # whole ms: exact accounting
    pitch = 110 + 30 * rng.random() + 12 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * (3 + 2 * rng.random()) * t), 0, None) ** 0.7
    pcm = 0.25 * wave * syllables / 2.6
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


class Ended:
    """The utterance ids a bot's socket has seen end (filled by its event reader)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._changed = asyncio.Event()

    def add(self, utterance_id: str) -> None:
        self.ids.add(utterance_id)
        self._changed.set()

    async def wait(self, utterance_id: str, within: float) -> None:
        async with asyncio.timeout(within):
            while utterance_id not in self.ids:
                self._changed.clear()
                await self._changed.wait()


class Run:
    """One soak: the server child process, its sessions and their clients."""

    def __init__(self, seconds: float, sessions: int, every: float, seed: int):
        self.seconds, self.sessions, self.every = seconds, sessions, every
        self.rng = random.Random(seed)
        self.key = secrets.token_urlsafe(24)
        self.audio = Audio()
        self.errors: list[str] = []
        self.viewers_joined = 0
        self.ts_readers = 0
        self.stopping = asyncio.Event()
        self.base = ""
        self.http: aiohttp.ClientSession | None = None

    # the server ---------------------------------------------------------------------------

    def start_server(self, folder: Path) -> subprocess.Popen:
        port = free_port()
        config = folder / "soak.toml"
        config.write_text(
            f'[server]\nport = {port}\napi_keys = ["{self.key}"]\n'
            "max_session_creations_per_minute = 10000\n"
            '[webrtc]\nhost_addresses = ["127.0.0.1"]\n'
            '[sessions]\ndefault_size = "256*128"\nidle_timeout_s = 60.0\n'
            f"[engine]\nmax_sessions = {self.sessions + 2}\n")
        self.base = f"http://127.0.0.1:{port}"
        return spawn(config, folder / "server.log")

    @property
    def key_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def sample(self, started: float) -> Sample:
        from prometheus_client.parser import text_string_to_metric_families

        # a connection of its own each time: an idle keep-alive connection would hold a task
        # and a file descriptor in the server and blur the figures being taken
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as h:
            async with h.get(f"{self.base}/metrics", headers=self.key_header) as r:
                text = await r.text()
        values = {s.name: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples}
        return Sample(round(time.monotonic() - started, 1),
                      round(values.get("process_resident_memory_bytes", 0) / 1e6, 1),
                      int(values.get("process_open_fds", 0)), int(values.get("avatar_threads", 0)),
                      int(values.get("avatar_event_loop_tasks", 0)),
                      int(values.get("avatar_sessions_active", 0)),
                      int(values.get("avatar_viewers_active", 0)))

    # a bot ----------------------------------------------------------------------------------

    async def bot(self, session: Any, index: int) -> None:
        from avatar_client import AvatarSocket, InputAudioCleared, UtteranceEnded

        async with await AvatarSocket.connect(session) as sock:
            ended = Ended()

            async def account() -> None:  # from the server's own events, every one of them
                async for item in sock.events():
                    if isinstance(item, UtteranceEnded):
                        self.audio.played_ms += item.played_ms
                        ended.add(item.utterance_id)
                    elif isinstance(item, InputAudioCleared):
                        self.audio.cleared_ms += item.dropped_ms

            recorder = asyncio.get_running_loop().create_task(account(), name="soak-account")
            try:
                n = 0
                while not self.stopping.is_set():
                    n += 1
                    await self.utterance(sock, ended, index, n)
                    await asyncio.sleep(self.rng.uniform(0.0, 1.0))  # the bot thinks
            finally:
                await sock.close()  # the recorder ends with the connection
                await asyncio.gather(recorder, return_exceptions=True)

    async def utterance(self, sock: Any, ended: Ended, index: int, n: int) -> None:
        """One utterance, sent faster than real time; every third one interrupted after a
        third of it. Returns once the server says it has been played (or cut)."""
        seconds = self.rng.uniform(0.5, 3.0)
        pcm = voice(seconds, seed=index * 100_000 + n)
        cut = n % 3 == 0
        frame = 2 * RATE // 25  # 40 ms
        sent = 0
        for start in range(0, len(pcm), frame):
            if cut and sent >= len(pcm) // 3:
                break
            if await sock.send_audio(pcm[start:start + frame]):
                sent += len(pcm[start:start + frame])
        self.audio.utterances += 1
        self.audio.sent_ms += sent // 2 // (RATE // 1000)  # whole ms by construction
        utterance = f"utt_{n}"  # the server numbers a socket's utterances in order
        if cut:
            await asyncio.sleep(self.rng.uniform(0.0, 0.4))
            await sock.interrupt(within=15)
            self.audio.interrupted += 1
        else:
            await sock.end_utterance()
        await ended.wait(utterance, within=60)

    # viewers ------------------------------------------------------------------------------

    async def webrtc_viewer(self, session: Any, stay: float) -> None:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        assert self.http is not None
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        readers: list[asyncio.Task] = []

        async def drain(track: Any) -> None:
            with contextlib.suppress(Exception):
                while True:
                    await track.recv()

        pc.on("track", lambda track: readers.append(asyncio.get_running_loop().create_task(
            drain(track), name="soak-viewer-track")))
        auth = {"Authorization": f"Bearer {session.viewer_token}"}
        location = None
        try:
            await pc.setLocalDescription(await pc.createOffer())
            async with self.http.post(session.urls["whep"], data=pc.localDescription.sdp,
                                      headers={**auth, "Content-Type": "application/sdp"}) as r:
                if r.status != 201:
                    if r.status != 429:  # a full session is expected under churn
                        self.errors.append(f"WHEP {r.status}: {await r.text()}")
                    return
                location = r.headers["Location"]
                answer = await r.text()
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            self.viewers_joined += 1
            await asyncio.wait_for(self.stopping.wait(), stay)
        except TimeoutError:
            pass
        finally:
            if location is not None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with self.http.delete(f"{self.base}{location}", headers=auth):
                        pass
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await pc.close()

    async def ts_reader(self, session: Any, stay: float) -> None:
        assert self.http is not None
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(stay):
                async with self.http.get(session.urls["stream_ts"]) as r:
                    if r.status == 200:
                        self.ts_readers += 1
                        async for _ in r.content.iter_chunked(65536):
                            pass

    async def viewers(self, session: Any) -> None:
        while not self.stopping.is_set():
            stay = self.rng.uniform(3.0, 12.0)
            if self.rng.random() < 0.2:
                await self.ts_reader(session, stay)
            else:
                await self.webrtc_viewer(session, stay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.rng.uniform(0.2, 2.0))

    # the run --------------------------------------------------------------------------------

    async def run(self, report: Any) -> SoakResult:
        from avatar_client import create_session, delete_session

        from stream.webrtc import restrict_host_addresses

        restrict_host_addresses(("127.0.0.1",))  # the viewers' ICE: loopback only
        with tempfile.TemporaryDirectory(prefix="avatar-soak-") as tmp:
            proc = self.start_server(Path(tmp))
            self.http = aiohttp.ClientSession()
            try:
                await wait_ready(self.base, proc, headers=self.key_header)
                started = time.monotonic()
                await asyncio.sleep(1.0)
                idle = await self.sample(started)
                sessions = [await create_session(self.base, api_key=self.key, size="256*128")
                            for _ in range(self.sessions)]
                clients = [asyncio.get_running_loop().create_task(coro, name=name) for i, s in
                           enumerate(sessions) for coro, name in
                           ((self.bot(s, i), f"soak-bot-{i}"),
                            (self.viewers(s), f"soak-viewers-{i}"),
                            (self.viewers(s), f"soak-viewers-{i}b"))]
                samples: list[Sample] = []
                print(f"{'t s':>7} {'RSS MB':>8} {'fds':>5} {'threads':>7} {'tasks':>6} "
                      f"{'sessions':>8} {'viewers':>7} {'sent s':>7} {'played s':>8} "
                      f"{'cleared s':>9} {'lost ms':>7}", file=report, flush=True)
                while time.monotonic() - started < self.seconds:
                    await asyncio.sleep(min(self.every, self.seconds - (time.monotonic()
                                                                        - started)))
                    failed = [t for t in clients if t.done() and t.exception()]
                    for t in failed:
                        self.errors.append(f"{t.get_name()}: {t.exception()!r}")
                        clients.remove(t)
                    s = await self.sample(started)
                    samples.append(s)
                    a = self.audio
                    print(f"{s.t:7.0f} {s.rss_mb:8.1f} {s.fds:5d} {s.threads:7d} {s.tasks:6d} "
                          f"{s.sessions:8d} {s.viewers:7d} {a.sent_ms / 1000:7.1f} "
                          f"{a.played_ms / 1000:8.1f} {a.cleared_ms / 1000:9.1f} "
                          f"{a.lost_ms:7d}", file=report, flush=True)
                self.stopping.set()
                done, pending = await asyncio.wait(clients, timeout=90)
                for t in pending:
                    t.cancel()
                    self.errors.append(f"{t.get_name()} did not stop")
                for t in done:
                    if not t.cancelled() and t.exception():
                        self.errors.append(f"{t.get_name()}: {t.exception()!r}")
                for s in sessions:
                    await delete_session(s)
                await self.http.close()  # the clients' pooled connections go too
                await asyncio.sleep(6.0)  # teardown, and aiortc's last timers
                final = await self.sample(started)
            finally:
                await self.http.close()
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        flat, growth = verdict(samples, idle, final)
        return SoakResult(round(time.monotonic() - started, 1), self.sessions, samples, idle,
                          final, self.audio, self.viewers_joined, self.ts_readers,
                          self.errors, growth, flat)


# 3. The command --------------------------------------------------------------------------------


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="run a server under churn (sessions, viewers, bots) and "
                                    "check it stays flat")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the run (default 2)")
    p.add_argument("--sessions", type=int, default=4, help="sessions at once (default 4)")
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the whole result to this JSON file")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    for noisy in ("aioice", "aiortc"):  # a line per ICE check of every viewer otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not 0.5 <= args.minutes <= 24 * 60 or not 1 <= args.sessions <= 64:
        print("error: --minutes must be 0.5..1440 and --sessions 1..64", file=sys.stderr)
        return 2
    result = asyncio.run(Run(args.minutes * 60, args.sessions, args.every,
                             args.seed).run(sys.stdout))
    a = result.audio
    print(f"\n{result.sessions} sessions for {result.seconds:.0f} s; {result.viewers_joined} "
          f"WebRTC viewers and {result.ts_readers} MPEG-TS readers came and went")
    print(f"idle: RSS {result.idle.rss_mb} MB, {result.idle.fds} fds, {result.idle.threads} "
          f"threads, {result.idle.tasks} tasks; after the run: RSS {result.final.rss_mb} MB, "
          f"{result.final.fds} fds, {result.final.threads} threads, {result.final.tasks} tasks")
    print(f"growth: {result.growth}")
    print(f"audio: {a.utterances} utterances ({a.interrupted} interrupted), sent "
          f"{a.sent_ms / 1000:.1f} s = played {a.played_ms / 1000:.1f} s + cleared by "
          f"interrupts {a.cleared_ms / 1000:.1f} s; lost {a.lost_ms} ms")
    for error in result.errors:
        print(f"error: {error}")
    print("FLAT, nothing lost" if result.ok else "NOT OK")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=1))
    return 0 if result.ok else 1
