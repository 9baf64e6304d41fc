"""What an aiortc caller sees of the preview's marks ([engine] preview_marks): the frame number
of every decoded frame (a frame shown again reads the same number) and the onset patch, matched
to the onsets the caller itself sent (`stream.latency_probe.match_onsets`, through the frame
numbers): latency per onset, from the caller's microphone to its decoded picture.
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
from stream.latency_probe import OnsetLatency, match_onsets
from tests.stream.rtc_client import Client, SignalTrack

MISREAD_FRAMES = 12  # neighbours further apart than a block: one of them was misread


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

    def drop_misread(self) -> None:
        """A code that a codec artefact turned into another valid one (the parity cell catches
        one wrong cell, not two) stands alone: the frames either side of a real one read within
        a block of it. The one before the newest is checked, and forgotten if it stands alone."""
        if len(self.frames) < 3:
            return
        (_, a, _), (at, b, lit), (_, c, _) = self.frames[-3:]
        if a is not None and b is not None and c is not None and \
                abs(b - a) > MISREAD_FRAMES and abs(c - b) > MISREAD_FRAMES:
            self.frames[-2] = (at, None, lit)


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
            self.seen.drop_misread()


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


def marked_runs(seen: Seen) -> list[tuple[float, int]]:
    """(arrival, frame number) of the first frame of each run of lit frames."""
    runs, lit_before = [], False
    for at, code, lit in seen.frames:
        if lit and not lit_before and code is not None:
            runs.append((at, code))
        lit_before = lit
    return runs


def onset_latencies(seen: Seen, sent: np.ndarray) -> list[OnsetLatency]:
    """Each marked frame matched to the onset it shows (stream/latency_probe.py)."""
    return match_onsets(list(sent), marked_runs(seen))


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


async def sample_every(seconds: float, interval: float, read) -> list:  # noqa: ANN001
    """`read()` every `interval` seconds for `seconds`."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(interval)
        out.append((time.monotonic(), read()))
    return out


async def marked_whep(http: ClientSession, session: dict) -> MarkedClient:
    """Watch the session through WHEP; the avatar's frames are read for marks."""
    client = MarkedClient()
    client.pc.addTransceiver("video", direction="recvonly")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(session["urls"]["whep"], data=client.pc.localDescription.sdp,
                         headers={"Authorization": f"Bearer {session['token']}",
                                  "Content-Type": "application/sdp"}) as r:
        text = await r.text()
        assert r.status == 201, text
    await client.pc.setRemoteDescription(RTCSessionDescription(text, "answer"))
    return client


def frame_latencies(seen: Seen, t0: float, after: float) -> list[tuple[float, float]]:
    """(arrival, latency) per decoded frame arriving after `after`: arrival - (t0 + n/25), the
    time from its audio's media time to the viewer having it (one clock: the server runs in the
    test's process)."""
    return [(at, at - (t0 + code * 0.04)) for at, code, _ in seen.frames
            if code is not None and at >= after]
