"""aiortc test clients: a caller (synthetic microphone in, avatar out) and a WHEP viewer.

They record what a player would need for A/V measurements: every decoded video frame's mouth
opening and every 5 ms of decoded audio's loudness, each stamped with the *sender's* wall clock
derived from RTCP sender reports (the mapping browsers use for lip sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from dataclasses import dataclass, field

import av
import numpy as np
from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtcpSrPacket

from engine.preview import mouth_box

NTP_EPOCH = 2**32


class SignalTrack(AudioStreamTrack):
    """A microphone that plays `signal` (float32 mono 48 kHz, looped) in real time."""

    def __init__(self, signal: np.ndarray):
        super().__init__()
        self.signal = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
        self._pos = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        n = 960
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        idx = (np.arange(self._pos, self._pos + n)) % len(self.signal)
        frame = av.AudioFrame.from_ndarray(self.signal[idx].reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, 48000)
        self._pos += n
        return frame


def bursts(seconds: float, seed: int = 0) -> np.ndarray:
    """Tone bursts of random lengths separated by silences: sharp loudness edges."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * 48000), np.float32)
    t = 0.3
    while t < seconds:
        on = rng.uniform(0.15, 0.5)
        start, stop = int(t * 48000), int(min(seconds, t + on) * 48000)
        k = np.arange(stop - start)
        out[start:stop] = 0.5 * np.sin(2 * np.pi * 220 * k / 48000)
        t += on + rng.uniform(0.15, 0.5)
    return out


@dataclass
class Reports:
    """RTCP sender reports per media kind: (ntp seconds, rtp timestamp)."""

    by_kind: dict[str, list[tuple[float, int]]] = field(default_factory=dict)


def _patch_receivers(pc: RTCPeerConnection, reports: Reports) -> None:
    for transceiver in pc.getTransceivers():
        receiver: RTCRtpReceiver = transceiver.receiver
        kind = transceiver.kind
        original = receiver._handle_rtcp_packet

        async def handle(packet, original=original, kind=kind):  # noqa: ANN001, ANN202
            if isinstance(packet, RtcpSrPacket):
                ntp = packet.sender_info.ntp_timestamp
                reports.by_kind.setdefault(kind, []).append(
                    ((ntp >> 32) + (ntp & 0xFFFFFFFF) / NTP_EPOCH,
                     packet.sender_info.rtp_timestamp))
            return await original(packet)

        receiver._handle_rtcp_packet = handle


@dataclass
class Recording:
    video: list[tuple[int, float, float]] = field(default_factory=list)  # (rtp pts, arrival, mouth)
    audio: list[tuple[int, float, np.ndarray]] = field(default_factory=list)  # (rtp pts, arrival, rms per 5 ms)
    video_size: tuple[int, int] | None = None


def mouth_dark_fraction(rgb: np.ndarray) -> float:
    """Share of the preview's mouth box that is mouth-dark (the mouth-opening signal)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = mouth_box(w, h)
    region = rgb[max(0, y0):y1, max(0, x0):x1].astype(np.int16)
    dark = (region.sum(axis=2) < 150) & (region[:, :, 0] > region[:, :, 2])
    return float(dark.mean())


class Client:
    """One peer connection to the server, recording what it receives."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.reports = Reports()
        self.recording = Recording()
        self.tasks: list[asyncio.Task] = []
        self.location: str | None = None
        self.peer_id: str | None = None
        self.video_ssrc: int | None = None  # set by watch_keyframes
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:  # noqa: ANN001
        self.tasks.append(asyncio.get_running_loop().create_task(
            self._consume(track), name=f"client-{track.kind}"))

    async def _consume(self, track) -> None:  # noqa: ANN001
        take = self.on_video if track.kind == "video" else self.on_audio
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            take(frame, time.monotonic())

    def on_video(self, frame: av.VideoFrame, now: float) -> None:
        """A decoded video frame, received at `now` (time.monotonic()): recorded."""
        rgb = frame.to_ndarray(format="rgb24")
        self.recording.video_size = (rgb.shape[1], rgb.shape[0])
        self.recording.video.append((frame.pts, now, mouth_dark_fraction(rgb)))

    def on_audio(self, frame: av.AudioFrame, now: float) -> None:
        """A decoded audio frame: its loudness per 5 ms recorded."""
        pcm = frame.to_ndarray().astype(np.float32).reshape(-1, len(frame.layout.channels))
        mono = pcm.mean(axis=1) / 32768.0
        step = frame.sample_rate // 200  # 5 ms
        rms = np.sqrt(np.mean(mono[: len(mono) // step * step].reshape(-1, step) ** 2, axis=1))
        self.recording.audio.append((frame.pts, now, rms))

    def origin(self, kind: str) -> int:
        """The first RTP timestamp aiortc saw for `kind` (its decoded pts are relative to it)."""
        for t in self.pc.getTransceivers():
            if t.kind == kind:
                return t.receiver._RTCRtpReceiver__timestamp_mapper._origin
        raise KeyError(kind)

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _offer(client: Client) -> str:
    """The client's offer, made once its transceivers are added (RTCP reports recorded)."""
    _patch_receivers(client.pc, client.reports)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    return client.pc.localDescription.sdp


async def call(http: ClientSession, session: dict, signal: np.ndarray | None = None,
               mic: SignalTrack | None = None) -> Client:
    """Connect as the caller: the synthetic mic (`mic`, or one playing `signal`) goes in, the
    avatar comes back."""
    client = Client()
    if mic is None:
        mic = SignalTrack(signal if signal is not None else bursts(10.0))
    client.pc.addTrack(mic)
    client.pc.addTransceiver("video", direction="recvonly")
    sdp = await _offer(client)
    async with http.post(session["urls"]["offer"], json={"sdp": sdp, "type": "offer"},
                         headers={"Authorization": f"Bearer {session['token']}"}) as r:
        body = await r.json()
        assert r.status == 200, body
    client.peer_id = body["peer_id"]
    await client.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
    return client


async def whep(http: ClientSession, session: dict, client: Client | None = None,
               audio: bool = True) -> Client:
    """Watch the session through WHEP (video, and audio unless `audio` is false)."""
    client = Client() if client is None else client
    client.pc.addTransceiver("video", direction="recvonly")
    if audio:
        client.pc.addTransceiver("audio", direction="recvonly")
    sdp = await _offer(client)
    async with http.post(session["urls"]["whep"], data=sdp,
                         headers={"Authorization": f"Bearer {session['token']}",
                                  "Content-Type": "application/sdp"}) as r:
        text = await r.text()
        assert r.status == 201, text
        client.location = r.headers["Location"]
    await client.pc.setRemoteDescription(RTCSessionDescription(text, "answer"))
    return client


async def wait_for(predicate, seconds: float, interval: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


@dataclass
class RtpCount:
    """What a counting-only client received: packets, bytes and frames (RTP timestamps) per
    kind, the frames stamped with their arrival time."""

    packets: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    frames: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def frames_between(self, kind: str, start: float, stop: float) -> int:
        return sum(start <= t < stop for _, t in self.frames.get(kind, []))


def count_only(client: Client) -> RtpCount:
    """Make `client` count RTP instead of decoding it: a viewer that costs its own process
    little, for measuring what viewers cost the server."""
    count = RtpCount()
    for transceiver in client.pc.getTransceivers():
        kind = transceiver.kind

        async def handle(packet, arrival_time_ms, kind=kind):  # noqa: ANN001, ANN202
            count.packets[kind] = count.packets.get(kind, 0) + 1
            count.bytes[kind] = count.bytes.get(kind, 0) + len(packet.payload)
            frames = count.frames.setdefault(kind, [])
            if not frames or frames[-1][0] != packet.timestamp:
                frames.append((packet.timestamp, time.monotonic()))

        transceiver.receiver._handle_rtp_packet = handle
    return count


async def whep_counting(http: ClientSession, session: dict) -> tuple[Client, RtpCount]:
    """A WHEP viewer that only counts what it receives."""
    client = Client()
    client.pc.addTransceiver("video", direction="recvonly")
    client.pc.addTransceiver("audio", direction="recvonly")
    count = count_only(client)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(session["urls"]["whep"], data=client.pc.localDescription.sdp,
                         headers={"Authorization": f"Bearer {session['token']}",
                                  "Content-Type": "application/sdp"}) as r:
        text = await r.text()
        assert r.status == 201, text
        client.location = r.headers["Location"]
    await client.pc.setRemoteDescription(RTCSessionDescription(text, "answer"))
    return client, count


def h264_keyframe(payload: bytes) -> bool:
    """Does this H.264 RTP payload start an IDR picture (or its SPS)? RFC 6184: a single NAL
    unit, a STAP-A aggregate, or the first fragment of an FU-A."""
    if not payload:
        return False
    nal = payload[0] & 0x1F
    if nal == 24:  # STAP-A: (size, NAL) pairs
        pos = 1
        while pos + 2 < len(payload):
            size = int.from_bytes(payload[pos:pos + 2], "big")
            if payload[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + size
        return False
    if nal == 28:  # FU-A: the start fragment carries the NAL type
        return len(payload) > 1 and bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
    return nal in (5, 7)


def watch_keyframes(client: Client) -> list[float]:
    """Arrival times (monotonic) of the H.264 keyframes `client` receives, and the server's
    video SSRC in `client.video_ssrc` once the first packet is in."""
    arrivals: list[float] = []
    for transceiver in client.pc.getTransceivers():
        if transceiver.kind != "video":
            continue
        receiver = transceiver.receiver
        original = receiver._handle_rtp_packet

        async def handle(packet, arrival_time_ms, original=original):  # noqa: ANN001, ANN202
            client.video_ssrc = packet.ssrc
            if h264_keyframe(packet.payload) and (
                    not arrivals or time.monotonic() - arrivals[-1] > 0.02):
                arrivals.append(time.monotonic())
            return await original(packet, arrival_time_ms=arrival_time_ms)

        receiver._handle_rtp_packet = handle
    return arrivals


class Bottleneck:
    """An in-process network bottleneck on what `client` receives: RTP leaves a drop-tail queue
    at `kbps` (a router's buffer of `queue_s` at that rate), reaching aiortc late or not at all,
    with the arrival time of its delivery (what the receiver's bandwidth estimator sees).

    The client asks for each lost packet once, as browsers do (theirs pace NACKs by the RTT):
    aiortc's own receiver asks again for every packet missing among the last 128 at each new
    gap, a retransmission storm on a saturated link; without any NACK its jitter buffer holds
    every frame behind a hole for 128 packets, and nothing decodes for seconds.
    """

    def __init__(self, client: Client, kbps: float, queue_s: float = 0.5):
        from aiortc import clock

        asked: set[int] = set()
        for transceiver in client.pc.getTransceivers():
            receiver = transceiver.receiver
            original_nack = receiver._send_rtcp_nack

            async def nack_once(media_ssrc: int, lost: list[int],
                                original_nack=original_nack) -> None:  # noqa: ANN001
                new = [seq for seq in lost if seq not in asked]
                asked.update(new)
                if len(asked) > 4096:
                    asked.clear()
                if new:
                    await original_nack(media_ssrc, new)

            receiver._send_rtcp_nack = nack_once

        self.rate = kbps * 1000 / 8  # bytes per second
        self.limit = self.rate * queue_s
        self.free_at = 0.0
        self.passed = self.dropped = 0
        transport = client.pc.getTransceivers()[0].receiver.transport
        original = transport._handle_rtp_data
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await original(data, arrival_time_ms=clock.current_ms())

        async def handle(data: bytes, arrival_time_ms: int) -> None:
            now = time.monotonic()
            start = max(now, self.free_at)
            if (start - now) * self.rate + len(data) > self.limit:
                self.dropped += 1
                return
            self.passed += 1
            self.free_at = start + len(data) / self.rate
            queue.put_nowait((self.free_at, data))

        transport._handle_rtp_data = handle
        client.tasks.append(asyncio.get_running_loop().create_task(deliver(), name="bottleneck"))
