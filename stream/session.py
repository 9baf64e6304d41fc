"""One avatar session: its clock, frames and playout audio, its audio source and its viewers.

The audio source is either the caller's microphone or a bot's WebSocket (never both at once): the
microphone feeds `AudioInput` directly, a bot's audio goes through its `SpeechSource` (a bounded
queue released at the pace of the clock). `AudioInput` feeds the engine and the playout store; the
engine's blocks land in the `FrameStore`. Every viewer (the caller's own peer, WHEP peers, MPEG-TS
readers, WebSocket media) is a consumer of the session's one media fan-out (`SessionMedia`: one
pacer on the clock, one encoder per output variant). A WebRTC viewer's RTCP feedback moves it
along the ladder and asks its variant for keyframes (stream/media/feedback.py). Any peer that
disconnects is torn down completely (its tasks cancelled and awaited, its tracks stopped and
unsubscribed, its peer connection closed); the session itself ends on DELETE, idle timeout,
maximum length, or an engine failure. Its `LatencyController` (stream/latency.py) governs the
generation tier and the playout delay from every block, and accounts for each block's latency
up to the first viewer it is sent to; generation-tier changes are announced to its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.api import AudioChunk, FrameBlock
from stream.config import StreamConfig
from stream.errors import ApiError
from stream.governor import GenerationTier, OutputGovernor, TierChange
from stream.latency import EngineControl, GenerationChange, LatencyController
from stream.media.audio_in import AudioInput
from stream.media.consumer import MediaPacket
from stream.media.fanout import SessionMedia
from stream.media.feedback import ViewerFeedback
from stream.media.timeline import FrameStore, MediaClock, PlayoutAudio, PlayoutOverflow
from stream.media.tracks import AvatarAudioTrack, AvatarVideoTrack
from stream.media.ts_feed import TsFeed
from stream.media.utterances import CutEngine, SpeechSource
from stream.metrics import Metrics
from stream.webrtc import (
    PeerConnection,
    answer_offer,
    negotiated_video_codec,
    offered_kinds,
    prefer_codecs,
    rtc_configuration,
)

log = logging.getLogger(__name__)

DISCONNECT_GRACE_S = 5.0  # a "disconnected" peer gets this long to come back


class _NoEngine:
    """Engine control of a session made without one (unit tests): tier changes are refused."""

    def set_tier(self, size: str | None, steps: int | None,
                 on_done: Callable[[BaseException | None], None]) -> None:
        on_done(NotImplementedError("this session has no engine to change tier"))

    def set_playout_delay(self, seconds: float) -> None:
        pass

    def sharing(self) -> int:
        return 1


@dataclass
class Peer:
    """A WebRTC peer of the session: the caller (mic in) or a WHEP viewer."""

    id: str
    kind: str  # "caller" | "whep"
    pc: RTCPeerConnection
    video: AvatarVideoTrack
    audio: AvatarAudioTrack
    feedback: ViewerFeedback
    tasks: set[asyncio.Task] = field(default_factory=set)
    remote_tracks: list[MediaStreamTrack] = field(default_factory=list)
    codec: str | None = None

    @property
    def stalled(self) -> bool:
        """Its media backed up (aiortc stopped taking it): nothing is dropped, it is dropped."""
        return self.video.consumer.stalled or self.audio.consumer.stalled

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        await self.video.detach()
        await self.audio.detach()
        for track in self.remote_tracks:
            track.stop()
        # shielded: a cancelled waiter would cancel aiortc's own close future (which aiortc then
        # fails to resolve); the close itself always runs to the end
        await asyncio.shield(self.pc.close())


class Socket(Protocol):
    """A bot's WebSocket attached to the session (stream/ws/handler.py)."""

    id: str

    async def aclose(self, code: int, reason: str) -> None: ...

    def generation_changed(self, change: GenerationChange) -> None:
        """The session's generation tier changed (the socket says so: `tier.changed`)."""
        ...


@dataclass
class SessionStats:
    blocks: int = 0
    silent_blocks: int = 0
    frames_sent: int = 0
    mic_frames_refused: int = 0  # a microphone far ahead of real time (see PlayoutOverflow)
    block_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=20))


class Session:
    def __init__(self, sid: str, token: str, viewer_token: str, expires_at: float,
                 size: tuple[int, int],
                 clock: MediaClock, cfg: StreamConfig, executor: Executor,
                 push_audio: Callable[[AudioChunk], None], close_engine: Callable[[], None],
                 on_closed: Callable[[Session], Awaitable[None]] | None = None,
                 avatar: dict[str, Any] | None = None,
                 cut_audio: CutEngine | None = None, engine: EngineControl | None = None,
                 metrics: Metrics | None = None, tier: GenerationTier | None = None):
        self.id = sid
        self.token = token  # scope "call": the speaker's page and the backend
        self.viewer_token = viewer_token  # scope "view": viewer, OBS and MPEG-TS links
        self.expires_at = expires_at
        self.size = size
        self.avatar = avatar or {}  # what the engine says of the avatar (the preview: its face)
        self.clock = clock
        self.cfg = cfg
        self.executor = executor
        self.created = time.monotonic()
        self.last_activity = self.created
        lat = cfg.latency
        longest = max(clock.delay, lat.delay_max_s)  # the playout delay may grow to this
        # frames from the longest playout delay plus two blocks of slack; 10 s more of audio
        self.frames = FrameStore(capacity=int((longest + 1.0) * 25) + 24)
        self.playout = PlayoutAudio(seconds=longest + 10.0, clock=clock)
        self.audio_in = AudioInput(clock, push_audio, self.playout, resync_s=lat.late_audio_s)
        self.media = SessionMedia(clock, self.frames, self.playout, cfg.media, executor, sid,
                                  size, on_failure=lambda exc: self.fail("encoder", exc),
                                  pause_dbfs=lat.pause_dbfs)
        self.metrics = metrics
        start = tier or GenerationTier(cfg.sessions.default_size, cfg.engine.sampling.steps)
        self.latency = LatencyController(
            sid, lat, clock, self.media.pacer, self.audio_in.arrived, engine or _NoEngine(),
            metrics, start.size, start.steps, cfg.media.playout_margin_s,
            on_change=self._generation_changed)
        self.ts: TsFeed | None = None  # the MPEG-TS feed, made for the first stream.ts reader
        self.speech: SpeechSource | None = None  # made when a bot's socket first connects
        self._cut_audio = cut_audio
        self.peers: dict[str, Peer] = {}
        self.ts_readers: dict[str, asyncio.Task] = {}
        self.sockets: dict[str, Socket] = {}
        self.stats = SessionStats()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.failed = False  # ended by a failure inside it (its sockets are told so: 1011)
        self._close_engine = close_engine
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task] = set()
        self._closing: asyncio.Task | None = None
        self._caller_lock = asyncio.Lock()  # one caller at a time, even with offers racing
        self._pending_viewers = 0  # WHEP answers being made (counted against max_viewers)
        self.log = logging.LoggerAdapter(log, {"session": sid})

    # 1. engine results (on the event loop) --------------------------------------------------

    def on_block(self, block: FrameBlock) -> None:
        self.frames.put(block)
        self.stats.blocks += 1
        self.stats.silent_blocks += int(block.silent_samples > 0)
        self.stats.block_seconds.append(block.timings.total)
        self.latency.on_block(block, time.monotonic())

    def _generation_changed(self, change: GenerationChange) -> None:
        for socket in list(self.sockets.values()):
            socket.generation_changed(change)

    def _output_changed(self, change: TierChange) -> None:
        if self.metrics is not None:
            self.metrics.inc("avatar_tier_changes_total", kind="output", reason="governor")

    def on_engine_error(self, exc: BaseException) -> None:
        self.fail("engine", exc)

    def fail(self, where: str, exc: BaseException) -> None:
        """A failure inside this session (its generation or its encoding) ends it, and it
        alone: its viewers and sockets are told why; the server and other sessions go on."""
        if self._closing is None:
            self.failed = True
            self.log.error("session fails: %s failure: %s", where, exc)
            self._spawn(self.aclose(f"{where} failure: {exc}"), f"close-{self.id}")

    # 2. liveness ------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    @property
    def viewer_count(self) -> int:
        return len(self.peers) + len(self.ts_readers) + self._pending_viewers

    def ts_feed(self) -> TsFeed:
        """The session's one MPEG-TS stream (the first rung in H.264, AAC audio)."""
        if self.ts is None:
            self.ts = TsFeed(self.media, self.media.rung("h264", 0), f"ts-{self.id}")
        return self.ts

    def idle_for(self) -> float:
        if self.viewer_count or self.sockets:
            return 0.0
        return time.monotonic() - self.last_activity

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # 3. a bot's socket: the session's audio source ---------------------------------------------

    def speech_source(self) -> SpeechSource:
        """The bot audio source (made on first use; it outlives any one socket)."""
        if self.speech is None:
            if self._cut_audio is None:
                raise RuntimeError("this session was made without an engine cut (cut_audio)")
            ws = self.cfg.websocket
            self.speech = SpeechSource(self.clock, self.frames, self.audio_in, self.playout,
                                       self._cut_audio, ws.max_queued_audio_s,
                                       ws.release_ahead_s, name=f"speech-{self.id}")
            self.speech.start()
        return self.speech

    def check_audio_source(self, kind: str) -> None:
        """One audio source at a time: a bot's socket or a caller's microphone."""
        if self.closed.is_set():
            raise ApiError(410, "session_ended", f"session {self.id} has ended")
        if kind == "socket" and any(p.kind == "caller" for p in self.peers.values()):
            raise ApiError(409, "audio_source_busy", f"session {self.id} has a WebRTC caller "
                           "whose microphone is its audio source; a bot's WebSocket cannot "
                           "join it (watch it through WHEP, the OBS page or stream.ts instead)")
        if kind == "caller" and self.sockets:
            raise ApiError(409, "audio_source_busy", f"session {self.id} is driven by a bot's "
                           "WebSocket; a call cannot join it (watch it through the viewer link "
                           "or WHEP instead)")

    async def attach_socket(self, socket: Socket) -> None:
        """`socket` becomes the session's bot connection; a previous one is closed (a bot that
        reconnects takes over; its queued audio carries on playing)."""
        self.check_audio_source("socket")
        for old in list(self.sockets.values()):
            self.log.info("websocket %s replaced by %s", old.id, socket.id)
            self.sockets.pop(old.id, None)
            await old.aclose(4001, "replaced by a newer connection to this session")
        self.sockets[socket.id] = socket
        self.touch()

    def detach_socket(self, socket: Socket) -> None:
        if self.sockets.get(socket.id) is socket:
            del self.sockets[socket.id]
        self.touch()

    # 4. WebRTC peers -------------------------------------------------------------------------

    async def add_peer(self, kind: str, offer_sdp: str) -> tuple[Peer, str]:
        """Answer a caller's offer (mic in, avatar out) or a WHEP viewer's (avatar out)."""
        if self.closed.is_set():
            raise ApiError(410, "session_ended", f"session {self.id} has ended")
        if kind == "caller":
            self.check_audio_source("caller")
            async with self._caller_lock:
                return await self._add_peer(kind, offer_sdp)
        if self.viewer_count >= self.cfg.sessions.max_viewers:
            raise ApiError(429, "too_many_viewers", f"session {self.id} already has "
                           f"{self.cfg.sessions.max_viewers} viewers (sessions.max_viewers)",
                           retryable=True, headers={"Retry-After": "10"})
        self._pending_viewers += 1
        try:
            return await self._add_peer(kind, offer_sdp)
        finally:
            self._pending_viewers -= 1

    async def _add_peer(self, kind: str, offer_sdp: str) -> tuple[Peer, str]:
        pid = secrets.token_urlsafe(8)
        kinds = offered_kinds(offer_sdp)
        if "video" not in kinds:
            raise ApiError(400, "unsupported_offer", "the offer has no video section; the "
                           "server sends the avatar's video (and its audio, if offered)")
        pc = PeerConnection(rtc_configuration(self.cfg.webrtc),
                            on_failure=lambda: self._spawn(self.remove_peer(pid),
                                                           f"drop-{self.id}-{pid}"))
        video = AvatarVideoTrack(self.media, f"{kind}-{pid}", on_sent=self.frame_sent)
        audio = AvatarAudioTrack(self.media, f"{kind}-{pid}-audio")
        if "audio" in kinds:  # a track the offer has no section for would break aiortc
            pc.addTrack(audio)
        sender = pc.addTrack(video)
        governor = OutputGovernor(self.media.ladder) if self.cfg.media.adapt_variants else None
        feedback = ViewerFeedback(video, sender, governor, f"{self.id}/{pid}",
                                  on_change=self._output_changed)
        peer = Peer(pid, kind, pc, video, audio, feedback)
        prefer_codecs(pc, "video", self.cfg.webrtc.video_codecs)
        if kind == "caller":
            pc.on("track", lambda track: self._on_remote_track(peer, track))
        pc.on("connectionstatechange", lambda: self._on_state(peer))
        try:
            answer = await answer_offer(pc, offer_sdp)
        except BaseException:
            await peer.aclose()
            raise
        if self.closed.is_set():  # the session ended while the answer was being made
            await peer.aclose()
            raise ApiError(410, "session_ended", f"session {self.id} has ended")
        peer.codec = negotiated_video_codec(answer)
        video.codec = peer.codec or "VP8"
        if kind == "caller":
            # a new call replaces the previous one (a page reload, a reconnect)
            for old in [p for p in self.peers.values() if p.kind == "caller"]:
                self.log.info("caller %s replaced by %s", old.id, pid)
                await self.remove_peer(old.id)
        self.peers[pid] = peer
        self.touch()
        self.log.info("%s peer %s connected (video %s)", kind, pid, peer.codec)
        return peer, answer

    def frame_sent(self, packet: MediaPacket) -> None:
        """A viewer's track (or a bot's socket) handed a video frame to its connection."""
        self.stats.frames_sent += 1
        self.latency.frame_sent(packet)

    def _on_remote_track(self, peer: Peer, track: MediaStreamTrack) -> None:
        peer.remote_tracks.append(track)
        if track.kind != "audio":
            return
        task = asyncio.get_running_loop().create_task(self._read_mic(track),
                                                      name=f"mic-{self.id}-{peer.id}")
        peer.tasks.add(task)
        task.add_done_callback(peer.tasks.discard)

    async def _read_mic(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.AudioFrame):
                try:
                    self.audio_in.push_frame(frame)
                except PlayoutOverflow as exc:  # a sender far faster than real time
                    self.stats.mic_frames_refused += 1
                    if self.stats.mic_frames_refused == 1:
                        self.log.warning("caller audio refused: %s", exc)
            self.touch()

    def _on_state(self, peer: Peer) -> None:
        state = peer.pc.connectionState
        if state in ("failed", "closed"):
            self._spawn(self.remove_peer(peer.id), f"drop-{self.id}-{peer.id}")
        elif state == "disconnected":
            self._spawn(self._drop_if_still_disconnected(peer), f"grace-{self.id}-{peer.id}")

    async def _drop_if_still_disconnected(self, peer: Peer) -> None:
        await asyncio.sleep(DISCONNECT_GRACE_S)
        if peer.pc.connectionState in ("disconnected", "failed", "closed"):
            await self.remove_peer(peer.id)

    async def remove_peer(self, pid: str) -> bool:
        peer = self.peers.pop(pid, None)
        if peer is None:
            return False
        self.touch()
        await peer.aclose()
        self.log.info("%s peer %s gone", peer.kind, pid)
        return True

    async def drop_stalled(self) -> None:
        """Peers whose media backed up (audio is never dropped, so they are): disconnected."""
        for peer in [p for p in self.peers.values() if p.stalled]:
            self.log.warning("%s peer %s takes no media (its queue backed up): disconnected",
                             peer.kind, peer.id)
            await self.remove_peer(peer.id)

    # 5. shutdown -----------------------------------------------------------------------------

    async def aclose(self, reason: str) -> None:
        """End the session. Idempotent; the teardown runs to the end even if the caller of
        aclose is cancelled half-way (it is one task, awaited shielded by every caller)."""
        if self._closing is None:
            self.closed.set()
            self.close_reason = reason
            self._closing = asyncio.get_running_loop().create_task(self._teardown(),
                                                                   name=f"teardown-{self.id}")
        await asyncio.shield(self._closing)

    async def _teardown(self) -> None:
        lat = self.latency
        self.log.info("session ends: %s (%.0f s; %d blocks, %d silent, %d late, %d skipped; "
                      "%d frames sent; %.1f s of audio in, %d resyncs)", self.close_reason,
                      time.monotonic() - self.created, self.stats.blocks,
                      self.stats.silent_blocks, lat.late_blocks, lat.skipped_blocks,
                      self.stats.frames_sent, self.audio_in.samples_in / 16000,
                      self.audio_in.resyncs)
        self._close_engine()
        for pid in list(self.peers):
            await self.remove_peer(pid)
        code = 1011 if self.failed else 1001  # 1011: the server met a condition it cannot fix
        for socket in list(self.sockets.values()):
            await socket.aclose(code, f"the session ended: {self.close_reason}"[:120])
        readers = list(self.ts_readers.values())
        for task in readers:
            task.cancel()
        if readers:  # the readers leave the feed on the way out
            await asyncio.wait(readers, timeout=5.0)
        if self.ts is not None:
            await self.ts.aclose()
        if self.speech is not None:
            await self.speech.aclose()
        await self.media.aclose()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._on_closed is not None:
            await self._on_closed(self)

    def describe(self) -> dict:
        return {
            "session_id": self.id,
            "video": {"width": self.size[0], "height": self.size[1], "fps": 25},
            "playout_delay_ms": round(self.clock.delay * 1000),
            "age_s": round(time.monotonic() - self.created, 1),
            "viewers": {"caller": sum(p.kind == "caller" for p in self.peers.values()),
                        "whep": sum(p.kind == "whep" for p in self.peers.values()),
                        "mpegts": len(self.ts_readers), "websocket": len(self.sockets)},
            "blocks": self.stats.blocks, "silent_blocks": self.stats.silent_blocks,
            "frames_sent": self.stats.frames_sent,
            "audio_in_seconds": round(self.audio_in.samples_in / 16000, 2),
            # the caller's audio fell more than [latency] late_audio_s behind real time this
            # often and went on at the present (the gap played as silence)
            "audio_in_resyncs": self.audio_in.resyncs,
            **self.latency.figures(),
            "avatar": self.avatar,
            "output": {"ladder": [v.name for v in self.media.ladder],
                       "peers": {p.id: {"kind": p.kind, "codec": p.codec,
                                        "variant": p.video.variant_key.name,
                                        **p.feedback.figures()}
                                 for p in self.peers.values()}},
        }
