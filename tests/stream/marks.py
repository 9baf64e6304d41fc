"""What an aiortc caller sees of the preview's marks ([engine] preview_marks): the frame number
of every decoded frame (a frame shown again reads the same number) and the onset patch, matched
to the onsets the caller itself sent: glass-to-glass latency per onset.

Matching an onset to the frame that shows it goes through the frame numbers, so it holds at
any latency: the onset sent at caller time S lies in the audio of media frame n, and S - n/25
is the same for every onset (the server stamps the caller's audio contiguously from its
anchor), so the most common value of S - n/25 over all (onset, marked frame) pairs is that
offset, and each marked frame is the onset whose S - n/25 is within a frame of it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from aiohttp import ClientSession
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from engine.preview_marks import onset_patch_lit, read_frame_code
from tests.stream.rtc_client import Client, SignalTrack

FRAME_S = 0.04


def onsets(signal: np.ndarray, rate: int = 48000, quiet_s: float = 0.12) -> np.ndarray:
    """Sample positions where `signal` starts sounding after at least `quiet_s` of silence."""
    loud = np.abs(signal) > 1e-3
    idx = np.flatnonzero(loud)
    if not len(idx):
        return idx
    gaps = np.diff(idx) > quiet_s * rate
    starts = [idx[0]] + list(idx[1:][gaps])
    return np.array(starts)


@dataclass
class Seen:
    """Decoded frames: (arrival time.monotonic(), frame number or None, onset patch lit)."""

    frames: list[tuple[float, int | None, bool]] = field(default_factory=list)
    size: tuple[int, int] | None = None


class MarkedClient(Client):
    """A caller whose video frames are read for the preview's marks, not recorded whole."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = Seen()
        self.mic: SignalTrack | None = None

    async def _consume(self, track) -> None:  # noqa: ANN001
        if track.kind != "video":
            while True:  # the avatar's audio: taken and dropped
                try:
                    await track.recv()
                except MediaStreamError:
                    return
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            rgb = frame.to_ndarray(format="rgb24")
            self.seen.size = (rgb.shape[1], rgb.shape[0])
            self.seen.frames.append((now, read_frame_code(rgb), onset_patch_lit(rgb)))


async def marked_call(http: ClientSession, session: dict, mic: SignalTrack) -> MarkedClient:
    """Connect as the caller with microphone `mic`; the avatar's frames are read for marks."""
    client = MarkedClient()
    client.mic = mic
    client.pc.addTrack(mic)
    client.pc.addTransceiver("video", direction="recvonly")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(session["urls"]["offer"], json={
            "sdp": client.pc.localDescription.sdp, "type": "offer"},
            headers={"Authorization": f"Bearer {session['token']}"}) as r:
        body = await r.json()
        assert r.status == 200, body
    await client.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
    return client


def sent_onsets(mic: SignalTrack, until: float) -> np.ndarray:
    """time.monotonic() at which the caller's microphone sent each onset, up to `until`."""
    assert mic._start is not None, "the microphone never started"
    period = len(mic.signal) / 48000
    base = onsets(mic.signal.astype(np.float32) / 32768) / 48000
    loops = int((until - mic._start) / period) + 1
    times = np.concatenate([mic._start + k * period + base for k in range(loops)])
    return times[times <= until]


@dataclass(frozen=True)
class OnsetLatency:
    sent: float  # time.monotonic() the onset left the caller
    seen: float  # the first decoded frame showing it arrived
    frame: int  # that frame's number

    @property
    def seconds(self) -> float:
        return self.seen - self.sent


def marked_runs(seen: Seen) -> list[tuple[float, int]]:
    """(arrival, frame number) of the first frame of each run of lit frames."""
    runs, lit_before = [], False
    for at, code, lit in seen.frames:
        if lit and not lit_before and code is not None:
            runs.append((at, code))
        lit_before = lit
    return runs


def onset_latencies(seen: Seen, sent: np.ndarray) -> list[OnsetLatency]:
    """Each marked frame matched to the onset it shows (see the module docstring)."""
    runs = marked_runs(seen)
    if not runs or not len(sent):
        return []
    offsets = np.array([s - n * FRAME_S for _, n in runs for s in sent])
    bins = np.round(offsets / 0.02).astype(np.int64)
    values, counts = np.unique(bins, return_counts=True)
    mode = values[np.argmax(counts)] * 0.02
    out = []
    for at, n in runs:
        distance = np.abs(sent - n * FRAME_S - mode)
        j = int(np.argmin(distance))
        if distance[j] <= 2 * FRAME_S:
            out.append(OnsetLatency(float(sent[j]), at, n))
    return out


def longest_repeat(seen: Seen, after: float) -> int:
    """The most consecutive decoded frames (arriving after `after`) showing one frame number."""
    best = run = 0
    last = None
    for at, code, _ in seen.frames:
        if code is None:
            continue
        run = run + 1 if code == last else 1
        last = code
        if at >= after:
            best = max(best, run)
    return best


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.array(values)
    return {"n": len(a), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


async def sample_every(seconds: float, interval: float, read) -> list:  # noqa: ANN001
    """`read()` every `interval` seconds for `seconds`."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(interval)
        out.append((time.monotonic(), read()))
    return out
