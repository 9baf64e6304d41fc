"""GET /v1/sessions/{id}/ws: a bot's WebSocket into a session (the protocol: docs/protocol.md).

One `BotSocket` per connection, three tasks: the reader (the request's own task: messages in,
audio into the session's `SpeechSource`), the writer (events and media out, events first: control
never waits behind media) and the stats timer. Bounded everywhere, nothing dropped silently:

- audio: when the speech queue is full the server sends `buffer.level` and a retryable
  `buffer_full` error, then reads nothing more from the socket until there is room (TCP
  back-pressure reaches the bot); a message is never refused for a full queue;
- message rate: above `max_messages_per_s` the reader slows down (a `rate_limited` error says so);
- messages larger than `max_message_bytes` close the socket (1009, with the limit in the reason);
- a client that does not read: its events queue up to `max_pending_events`, its media audio up to
  `send_timeout_s`, and a send that waits longer than `send_timeout_s` closes the socket (1008);
  stale video drops for it alone (stream/media/fanout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from stream.config import WebSocketConfig
from stream.errors import ApiError
from stream.latency import GenerationChange
from stream.media.fanout import MediaConsumer, SessionMedia, VariantKey
from stream.media.timeline import PLAYOUT_RATE
from stream.metrics import Metrics
from stream.session import Session
from stream.ws.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    PROTOCOL_VERSION,
    AudioFormat,
    ClientMessage,
    EventStamper,
    ProtocolError,
    check_pcm,
    error_event,
    pack_media,
    parse_client,
)

log = logging.getLogger(__name__)

YIELD_EVERY = 32  # messages read back to back before the reader lets other tasks run
CLOSE_TIMEOUT_S = 2.0
# the kernel's buffers for one socket, each way: back-pressure reaches a bot that floods the
# socket (instead of megabytes of audio waiting unseen in the server's kernel, an interrupt
# behind them), and a client that stops reading is noticed after this much, not after 4 MB
SOCKET_BUFFER_BYTES = 256 * 1024


@dataclass(frozen=True)
class Output:
    """The media this socket receives (its output tier)."""

    video: str = "none"  # "none" | "h264" | "jpeg"
    audio: bool = False
    width: int = 0
    height: int = 0
    fps: float = 25.0

    def variant(self, media: SessionMedia) -> VariantKey | None:
        if self.video == "none":
            return None
        return media.video_key(self.video, self.width, self.height, self.fps)


class _Socket(web.WebSocketResponse):
    """aiohttp closes an oversized message with 1009 and no reason; this names the limit."""

    too_big_reason = b""

    async def close(self, *, code: int = CLOSE_NORMAL, message: bytes = b"",
                    drain: bool = True) -> bool:
        if code == CLOSE_TOO_BIG and not message:
            message = self.too_big_reason
        return await super().close(code=code, message=message, drain=drain)


class RateLimiter:
    """A token bucket: `rate` messages a second, bursts of up to `rate`."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Spend one token; returns how long to wait before reading the next message."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate) - 1.0
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class BotSocket:
    def __init__(self, request: web.Request, session: Session, cfg: WebSocketConfig,
                 metrics: Metrics, engine: dict[str, Any], engine_load: Callable[[], float]):
        self.id = f"ws-{secrets.token_urlsafe(6)}"
        self.request = request
        self.session = session
        self.cfg = cfg
        self.metrics = metrics
        self.engine = engine
        self.engine_load = engine_load
        self.ws = _Socket(max_msg_size=cfg.max_message_bytes, heartbeat=cfg.heartbeat_s,
                          compress=False, timeout=CLOSE_TIMEOUT_S)
        self.ws.too_big_reason = (f"message larger than websocket.max_message_bytes "
                                  f"({cfg.max_message_bytes} bytes)").encode()
        self.stamper = EventStamper()
        self.audio_in = AudioFormat()
        w, h = session.size
        self.output = Output(width=w, height=h)
        self.stats_interval = cfg.stats_interval_s
        self.consumer = MediaConsumer(self.id, max_audio_s=cfg.send_timeout_s + 1.0,
                                      kind="websocket")
        self._events: deque[str] = deque()
        self._wake = asyncio.Event()
        self.consumer.notify = self._wake
        self._stats_changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._interrupts: deque[str | None] = deque()  # client event ids awaiting cleared
        self._full_reported = False
        self._rate_reported = 0.0
        self._sending_since: float | None = None
        # figures
        self.bytes_sent = 0
        self.video_frames = 0
        self.audio_slices = 0
        self.received = 0
        self.log = logging.LoggerAdapter(log, {"session": session.id})

    # 1. the connection -------------------------------------------------------------------------

    async def run(self) -> web.WebSocketResponse:
        self.session.check_audio_source("socket")  # before the upgrade: a JSON 409 if busy
        await self.ws.prepare(self.request)
        self._bound_kernel_buffers()
        self.metrics.inc("avatar_ws_connections_total")
        speech = self.session.speech_source()
        try:
            await self.session.attach_socket(self)
            speech.listener = self._on_speech
            self._spawn(self._write(), f"ws-write-{self.id}")
            self._spawn(self._watch(), f"ws-watch-{self.id}")
            self._spawn(self._stats(), f"ws-stats-{self.id}")
            self.emit("session.ready", {
                "session_id": self.session.id, "protocol": PROTOCOL_VERSION,
                "audio_in": self.audio_in.as_dict(),
                "audio_out": {"sample_rate": PLAYOUT_RATE, "channels": 1},
                "video": {"width": self.session.size[0], "height": self.session.size[1],
                          "fps": 25},
                "output": asdict(self.output),
                "stats_interval_ms": round(self.stats_interval * 1000),
                "limits": {"max_queued_audio_ms": round(self.cfg.max_queued_audio_s * 1000),
                           "release_ahead_ms": round(self.cfg.release_ahead_s * 1000),
                           "max_message_bytes": self.cfg.max_message_bytes,
                           "max_messages_per_s": self.cfg.max_messages_per_s},
                "engine": self.engine})
            self.log.info("websocket %s connected", self.id)
            await self._read()
        except ApiError as exc:  # the session ended or got a caller meanwhile
            await self._close(CLOSE_POLICY, exc.message[:120])
        except Exception:
            self.log.exception("websocket %s failed", self.id)
            await self._close(CLOSE_INTERNAL, "internal server error (see the server log)")
        finally:
            await self._teardown(speech)
        return self.ws

    async def aclose(self, code: int, reason: str) -> None:
        """Close from outside (the session ends, or a newer socket takes over)."""
        await self._close(code, reason)

    def _bound_kernel_buffers(self) -> None:
        transport = self.request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, code: int, reason: str) -> None:
        """Idempotent; waits for the close frame at most CLOSE_TIMEOUT_S, then drops the
        connection (a client that does not read cannot take even the close frame)."""
        if self._closed is None:
            self._closing.set()
            self._wake.set()
            if code not in (CLOSE_NORMAL, CLOSE_GOING_AWAY):
                self.log.info("websocket %s closed: %d %s", self.id, code, reason)
            self._closed = asyncio.get_running_loop().create_task(
                self._close_now(code, reason), name=f"ws-close-{self.id}")
        await asyncio.shield(self._closed)

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:123]),
                                   CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            # a client that takes nothing gets a moment more for what is queued (the close
            # frame too), then the connection is dropped: nothing is buffered for it forever
            transport = self.request.transport
            if transport is not None:
                transport.close()
                asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, transport.abort)

    async def _teardown(self, speech: Any) -> None:
        if speech.listener == self._on_speech:
            speech.listener = None
        self.session.detach_socket(self)
        await self.session.media.unsubscribe(self.consumer)
        self._closing.set()
        self._wake.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close(CLOSE_NORMAL, "")
        self.log.info("websocket %s gone (%d messages in, %d bytes out)", self.id,
                      self.received, self.bytes_sent)

    # 2. reading ------------------------------------------------------------------------------

    async def _read(self) -> None:
        limiter = RateLimiter(self.cfg.max_messages_per_s)
        burst = 0
        while not self._closing.is_set():
            msg = await self.ws.receive()
            if msg.type == WSMsgType.TEXT:
                self.received += 1
                await self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.received += 1
                await self._on_audio(msg.data)
            elif msg.type == WSMsgType.ERROR:
                code = "message_too_big" if self.ws.close_code == CLOSE_TOO_BIG else "protocol"
                self.metrics.inc("avatar_ws_errors_total", code=code)
                self.log.info("websocket %s: %s", self.id, msg.data)
                return
            else:  # CLOSE, CLOSING, CLOSED
                return
            wait = limiter.take()
            if wait > 0:
                now = time.monotonic()
                if now - self._rate_reported > 5.0:  # once per episode
                    self._rate_reported = now
                    self.error("rate_limited", f"more than {self.cfg.max_messages_per_s} "
                               "messages a second (websocket.max_messages_per_s): the server "
                               "reads this socket slower now; send fewer, larger audio frames "
                               "(20-100 ms each)")
                await asyncio.sleep(wait)
                burst = 0
            else:
                burst += 1
                if burst >= YIELD_EVERY:  # a burst read back to back must not starve others
                    burst = 0
                    await asyncio.sleep(0)

    async def _on_text(self, text: str) -> None:
        try:
            message = parse_client(text)
        except ProtocolError as exc:
            self.metrics.inc("avatar_ws_messages_total", type="invalid")
            self.error(exc.code, exc.message, exc.client_event_id)
            return
        self.metrics.inc("avatar_ws_messages_total", type=message.type)
        self.session.touch()
        speech = self.session.speech_source()
        if message.type == "session.update":
            await self._update(message)
        elif message.type == "utterance.end":
            speech.end_utterance()
        elif message.type == "utterance.interrupt":
            self._interrupts.append(message.event_id)
            speech.interrupt()
        # session.keepalive: the touch above is all it does

    async def _on_audio(self, data: bytes) -> None:
        self.metrics.inc("avatar_ws_messages_total", type="audio")
        fmt = self.audio_in
        try:
            check_pcm(data, fmt)
        except ProtocolError as exc:
            self.error(exc.code, exc.message)
            return
        if not data:
            return
        samples = np.frombuffer(data, dtype="<i2")
        seconds = len(samples) / fmt.channels / fmt.sample_rate
        speech = self.session.speech_source()
        if not speech.has_room(seconds):
            if not self._full_reported:
                self._full_reported = True
                speech.buffer_level()
                self.error("buffer_full", f"the audio queue is full ({speech.queued_ms} ms "
                           f"queued, websocket.max_queued_audio_s = "
                           f"{self.cfg.max_queued_audio_s:g} s): the server reads nothing more "
                           "from this socket until the avatar has played enough of it; nothing "
                           "is dropped. Send at most buffer.level.max_queued_ms ahead.")
            await self._until(speech.wait_for_room(seconds))
            if self._closing.is_set():
                return
        elif speech.queue.seconds < speech.queue.capacity_s / 2:
            self._full_reported = False  # a new episode needs the queue half empty first
        speech.push(samples, fmt.sample_rate, fmt.channels)
        self.session.touch()

    async def _until(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Await `coro` unless the socket closes first."""
        waiter = asyncio.ensure_future(coro)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, closing):
                fut.cancel()
            await asyncio.gather(waiter, closing, return_exceptions=True)

    # 3. session.update -----------------------------------------------------------------------

    async def _update(self, message: ClientMessage) -> None:
        fields = message.fields
        try:
            audio_in = self.audio_in
            if "audio_in" in fields:
                audio_in = AudioFormat(**{**self.audio_in.as_dict(), **fields["audio_in"]})
            output = self._output(fields.get("output", {})) if "output" in fields else \
                self.output
        except ProtocolError as exc:
            self.error(exc.code, exc.message, message.event_id)
            return
        self.audio_in = audio_in
        if "stats_interval_ms" in fields:
            self.stats_interval = fields["stats_interval_ms"] / 1000
            self._stats_changed.set()
        previous, self.output = self.output, output
        if output != previous:
            await self.session.media.subscribe(self.consumer, output.variant(self.session.media),
                                              output.audio)
        self.emit("session.updated", {"audio_in": audio_in.as_dict(), "output": asdict(output),
                                      "stats_interval_ms": round(self.stats_interval * 1000),
                                      "client_event_id": message.event_id})
        if output != previous:
            self.emit("tier.changed", {"kind": "output", "output": asdict(output),
                                       "previous": asdict(previous), "reason": "client"})
            self.metrics.inc("avatar_tier_changes_total", kind="output", reason="client")

    def generation_changed(self, change: GenerationChange) -> None:
        """The latency governor moved the session's generation tier: this socket's output is
        what it was (frames are scaled to it), the picture behind it is not."""
        output = asdict(self.output)
        self.emit("tier.changed", {
            "kind": "generation", "output": output, "previous": output, "reason": "governor",
            "generation": {"size": change.tier.size, "steps": change.tier.steps},
            "previous_generation": {"size": change.previous.size,
                                    "steps": change.previous.steps},
            "message": change.reason})

    def _output(self, req: dict[str, Any]) -> Output:
        sw, sh = self.session.size
        out = replace(self.output, **{k: req[k] for k in ("video", "audio", "fps") if k in req})
        width, height = req.get("width"), req.get("height")
        for name, value, limit in (("width", width, sw), ("height", height, sh)):
            if value is not None and value > limit:
                raise ProtocolError("invalid_message", f"session.update: output.{name}={value} "
                                    f"is larger than the session's video ({sw}x{sh}); accepted "
                                    f"16..{limit} (frames are only ever scaled down)")
        if width is not None and height is None:
            height = round(width * sh / sw)
        elif height is not None and width is None:
            width = round(height * sw / sh)
        if width is not None and height is not None:
            # H.264 4:2:0 needs even sides; JPEG gets the same so a switch keeps the size
            out = replace(out, width=max(16, width - width % 2), height=max(16, height - height % 2))
        return out

    # 4. events and media out ---------------------------------------------------------------

    def emit(self, kind: str, fields: dict[str, Any], pts_ms: int | None = None) -> None:
        if self._closing.is_set():
            return
        if pts_ms is None:
            pts_ms = self.session.playout.play_position() * 1000 // PLAYOUT_RATE
        if len(self._events) >= self.cfg.max_pending_events:
            self.metrics.inc("avatar_ws_errors_total", code="not_reading")
            self._spawn(self._close(CLOSE_POLICY, f"the client is not reading: more than "
                                    f"{self.cfg.max_pending_events} events wait to be sent"),
                        f"ws-close-{self.id}")
            return
        self._events.append(json.dumps(self.stamper.stamp(kind, pts_ms, fields)))
        self._wake.set()

    def error(self, code: str, message: str, client_event_id: str | None = None) -> None:
        self.metrics.inc("avatar_ws_errors_total", code=code)
        self.emit("error", error_event(code, message, client_event_id))

    def _on_speech(self, kind: str, pts_ms: int, fields: dict[str, Any]) -> None:
        if kind == "input_audio.cleared":
            fields = {**fields, "client_event_id":
                      self._interrupts.popleft() if self._interrupts else None}
        self.emit(kind, fields, pts_ms)

    async def _write(self) -> None:
        while not self._closing.is_set():
            if self._events:
                text = self._events.popleft()
                await self._send(self.ws.send_str(text), len(text))
            elif (packet := self.consumer.get_nowait()) is not None:
                data = pack_media(packet)
                await self._send(self.ws.send_bytes(data), len(data))
                if packet.kind == "video":
                    self.video_frames += 1
                    self.session.frame_sent(packet)  # counted with the viewers' frames
                else:
                    self.audio_slices += 1
            else:
                self._wake.clear()
                await self._wake.wait()

    async def _send(self, coro: Coroutine[Any, Any, None], size: int) -> None:
        # never cancelled from here: a cancelled aiohttp send leaves its drain waiter
        # cancelled for every later send; `_watch` notices a send that hangs instead
        self._sending_since = time.monotonic()
        try:
            await coro
        except ConnectionError:
            self._closing.set()
            return
        finally:
            self._sending_since = None
        self.bytes_sent += size

    async def _watch(self) -> None:
        """A client that does not read: a send hanging for send_timeout_s, or media piling up
        for it (audio is never dropped) -> closed with 1008."""
        timeout = self.cfg.send_timeout_s
        while not self._closing.is_set():
            await asyncio.sleep(min(0.25, timeout / 4))
            since = self._sending_since
            if since is not None and time.monotonic() - since > timeout:
                why = f"a send waited {timeout:g} s"
            elif self.consumer.stalled:
                why = "its media backed up"
            else:
                continue
            self.metrics.inc("avatar_ws_errors_total", code="not_reading")
            await self._close(CLOSE_POLICY, f"the client is not reading ({why}; "
                              "websocket.send_timeout_s)")
            return

    async def _stats(self) -> None:
        while True:
            self._stats_changed.clear()
            interval = self.stats_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stats_changed.wait(),
                                       interval if interval > 0 else None)
                continue  # the interval changed: start over
            self.emit("stats", self.figures())

    def figures(self) -> dict[str, Any]:
        session = self.session
        speech = session.speech_source().figures()
        compute = session.stats.block_seconds
        governed = session.latency.figures()
        return {
            **{k: speech[k] for k in ("queued_ms", "ahead_ms", "released_ms", "dropped_ms",
                                      "utterances")},
            "blocks": session.stats.blocks, "silent_blocks": session.stats.silent_blocks,
            "frames_sent": session.stats.frames_sent,
            "viewers": session.describe()["viewers"],
            "latency": {"playout_delay_ms": round(session.clock.delay * 1000),
                        "t_first_frame_ms": speech["t_first_frame_ms"],
                        "block_compute_ms": round(sum(compute) / len(compute) * 1000)
                        if compute else None, **governed["latency"]},
            "generation": governed["generation"],
            "socket": {"video_frames": self.video_frames,
                       "video_dropped": self.consumer.video_dropped,
                       "audio_ms": self.audio_slices * 40, "bytes_sent": self.bytes_sent,
                       "messages_received": self.received},
            "engine": {"load": round(max(0.0, self.engine_load()), 3)},
        }


async def bot_socket(request: web.Request, session: Session, cfg: WebSocketConfig,
                     metrics: Metrics, engine: dict[str, Any],
                     engine_load: Callable[[], float]) -> web.WebSocketResponse:
    """The route's handler body (stream/app.py authenticates and finds the session)."""
    return await BotSocket(request, session, cfg, metrics, engine, engine_load).run()
