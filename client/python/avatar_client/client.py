"""The bot's connection to a session: `AvatarSocket` over the `websockets` package.

    session = await create_session("http://127.0.0.1:8080")
    async with await AvatarSocket.connect(session) as bot:
        result = await bot.say(pcm_16k)            # one utterance; waits until it was played
        print(result.started.t_first_frame_ms, result.ended.played_ms)

Audio may be sent faster than real time. The socket paces itself so that the server's queue never
fills (a bucket of `limits.max_queued_audio_ms` x 0.8 that refills at real time): the server then
never has to hold the socket back, and an interrupt never waits behind queued audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import websockets

from avatar_client.audio import chunks, read_pcm
from avatar_client.events import (
    Error,
    Event,
    InputAudioCleared,
    MediaFrame,
    SessionReady,
    SessionUpdated,
    UtteranceEnded,
    UtteranceStarted,
    parse_event,
    parse_media,
)
from avatar_client.rest import SessionInfo

E = TypeVar("E", bound=Event)
BURST_SHARE = 0.8  # of the server's queue that the socket lets itself run ahead


def _number(utterance_id: str) -> int:
    """utt_12 -> 12 (0 for an id of another form)."""
    tail = utterance_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class ServerError(RuntimeError):
    def __init__(self, event: Error):
        super().__init__(f"{event.code}: {event.message}")
        self.event = event


@dataclass(frozen=True)
class Spoken:
    """One utterance as the avatar played it."""

    started: UtteranceStarted | None  # None if none of it was played
    ended: UtteranceEnded


class _Pacer:
    """Keeps the audio sent at most `burst_s` ahead of real time (refilling at 1x)."""

    def __init__(self, burst_s: float):
        self.burst = burst_s
        self.credit = burst_s
        self.stamp = time.monotonic()

    async def spend(self, seconds: float) -> None:
        now = time.monotonic()
        self.credit = min(self.burst, self.credit + now - self.stamp)
        self.stamp = now
        if self.credit < seconds:
            await asyncio.sleep(seconds - self.credit)
            self.credit = seconds
            self.stamp = time.monotonic()
        self.credit -= seconds


class AvatarSocket:
    def __init__(self, ws: websockets.ClientConnection, ready: SessionReady,
                 max_buffered: int = 2048):
        self.ws = ws
        self.ready = ready
        self.audio_in = dict(ready.audio_in)
        self.output = dict(ready.output)  # the media on this socket now (session.updated)
        self._pacer = _Pacer(ready.limits.get("max_queued_audio_ms", 30000) / 1000
                             * BURST_SHARE)
        self._inbox: asyncio.Queue[Event | MediaFrame | None] = asyncio.Queue(max_buffered)
        self._history: list[Event] = [ready]  # recent events; index + _base = position
        self._base = 0
        self._last_utterance = 0  # the highest utterance number an event has named
        self._changed = asyncio.Event()
        self._interrupted = 0  # bumps on interrupt(): streams in progress stop sending
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="avatar-read")
        self.dropped = 0  # items the application did not take from events() in time
        self.closed_reason: str | None = None

    # 1. connecting ------------------------------------------------------------------------

    @classmethod
    async def connect(cls, session: SessionInfo | str, token: str | None = None,
                      **kwargs: Any) -> AvatarSocket:
        """Connect to a session (a `SessionInfo`, or its ws URL plus `token`)."""
        if isinstance(session, SessionInfo):
            url, token = session.ws_url, token or session.token
        else:
            url = session
        if token is None:
            raise ValueError("a session token is needed (SessionInfo.token)")
        ws = await websockets.connect(url, additional_headers={
            "Authorization": f"Bearer {token}"}, max_size=None, **kwargs)
        first = json.loads(await ws.recv())
        ready = parse_event(first)
        if not isinstance(ready, SessionReady):
            await ws.close()
            raise RuntimeError(f"expected session.ready first, got {first.get('type')!r}")
        return cls(ws, ready)

    async def __aenter__(self) -> AvatarSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader

    # 2. control ---------------------------------------------------------------------------

    async def _send_json(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message))

    async def _send(self, data: str | bytes) -> None:
        try:
            await self.ws.send(data)
        except websockets.ConnectionClosed as exc:
            raise ConnectionError(f"the connection closed ({exc})") from exc

    async def update(self, *, sample_rate: int | None = None, channels: int | None = None,
                     video: str | None = None, audio: bool | None = None,
                     width: int | None = None, height: int | None = None,
                     fps: float | None = None,
                     stats_interval_ms: int | None = None) -> SessionUpdated:
        """session.update: input format, media on this socket (video "h264" | "jpeg" |
        "none", audio True/False, size, fps), stats period. Returns what is now in force."""
        message: dict[str, Any] = {"type": "session.update",
                                   "event_id": f"update-{time.monotonic_ns()}"}
        audio_in = {k: v for k, v in (("sample_rate", sample_rate), ("channels", channels))
                    if v is not None}
        output = {k: v for k, v in (("video", video), ("audio", audio), ("width", width),
                                    ("height", height), ("fps", fps)) if v is not None}
        if audio_in:
            message["audio_in"] = audio_in
        if output:
            message["output"] = output
        if stats_interval_ms is not None:
            message["stats_interval_ms"] = stats_interval_ms
        mark = self._position()
        await self._send_json(message)
        updated = await self._expect(SessionUpdated, mark, client_event_id=message["event_id"])
        self.audio_in = dict(updated.audio_in)
        self.output = dict(updated.output)
        return updated

    async def end_utterance(self) -> None:
        await self._send_json({"type": "utterance.end"})

    async def keepalive(self) -> None:
        await self._send_json({"type": "session.keepalive"})

    async def interrupt(self, within: float = 5.0) -> InputAudioCleared:
        """Stop speaking now: audio this SDK has not sent yet is dropped, the server drops its
        queue and cuts what was released. Returns how much of the utterance was played."""
        self._interrupted += 1
        event_id = f"interrupt-{time.monotonic_ns()}"
        mark = self._position()
        await self._send_json({"type": "utterance.interrupt", "event_id": event_id})
        self._pacer.credit = self._pacer.burst  # the server's queue is empty again
        return await self._expect(InputAudioCleared, mark, within, client_event_id=event_id)

    # 3. audio -----------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return int(self.audio_in.get("sample_rate", 16000))

    async def send_audio(self, pcm: bytes) -> bool:
        """One binary frame of PCM s16le in the declared format (paced, see the module).
        Returns False if an `interrupt()` came while it waited for the pacer: the frame
        belongs to the speech that was cut, so it is not sent."""
        frame = 2 * int(self.audio_in.get("channels", 1))
        generation = self._interrupted
        await self._pacer.spend(len(pcm) / frame / self.sample_rate)
        if self._interrupted != generation:
            return False
        await self._send(pcm)
        return True

    async def stream(self, pcm: bytes | Iterable[bytes] | AsyncIterable[bytes],
                     chunk_ms: float = 40.0, end: bool = True) -> bool:
        """Send an utterance: PCM bytes (cut into `chunk_ms` frames) or an (async) iterator of
        chunks, e.g. straight from a TTS. Returns False if an interrupt stopped it."""
        generation = self._interrupted
        if isinstance(pcm, bytes | bytearray):
            pcm = chunks(bytes(pcm), self.sample_rate, chunk_ms,
                         int(self.audio_in.get("channels", 1)))
        if isinstance(pcm, AsyncIterable):
            async for chunk in pcm:
                if self._interrupted != generation:
                    return False
                await self.send_audio(chunk)
        else:
            for chunk in pcm:
                if self._interrupted != generation:
                    return False
                await self.send_audio(chunk)
        if self._interrupted != generation:
            return False
        if end:
            await self.end_utterance()
        return True

    async def stream_file(self, path: str | Path, chunk_ms: float = 40.0,
                          end: bool = True) -> bool:
        """Send an audio file (any format FFmpeg reads), resampled to the declared rate."""
        if int(self.audio_in.get("channels", 1)) != 1:
            await self.update(channels=1)
        pcm = await asyncio.to_thread(read_pcm, path, self.sample_rate)
        return await self.stream(pcm, chunk_ms, end)

    async def say(self, pcm: bytes | Iterable[bytes] | AsyncIterable[bytes],
                  chunk_ms: float = 40.0, within: float = 120.0) -> Spoken:
        """Send one utterance and wait until the avatar has played it (or was interrupted)."""
        mark = self._position()
        # the server numbers utterances in order (utt_1, utt_2, ...): this one comes after
        # every one seen so far (an interrupted one still ends later, at its cut)
        after = self._last_utterance
        await self.stream(pcm, chunk_ms)
        deadline = time.monotonic() + within
        while True:
            ended = await self._expect(UtteranceEnded, mark, deadline - time.monotonic())
            mark = self._index_of(ended) + 1
            if _number(ended.utterance_id) > after:
                break
        started = next((e for e in self._history if isinstance(e, UtteranceStarted)
                        and e.utterance_id == ended.utterance_id), None)
        return Spoken(started, ended)

    # 4. events ----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event | MediaFrame]:
        """Every event and media frame, in arrival order, until the connection closes."""
        while True:
            item = await self._inbox.get()
            if item is None:
                self._inbox.put_nowait(None)  # for any other iterator
                return
            yield item

    async def wait_for(self, kind: type[E], within: float = 30.0, **match: Any) -> E:
        """The next event of `kind` (with fields equal to `match`) from now on."""
        return await self._expect(kind, self._position(), within, **match)

    def _position(self) -> int:
        return self._base + len(self._history)

    def _index_of(self, event: Event) -> int:
        return self._base + next(i for i, e in enumerate(self._history) if e is event)

    def _since(self, mark: int) -> list[Event]:
        return self._history[max(0, mark - self._base):]

    async def _expect(self, kind: type[E], mark: int, within: float = 30.0,
                      **match: Any) -> E:
        deadline = time.monotonic() + within
        while True:
            for event in self._since(mark):
                if isinstance(event, kind) and all(getattr(event, k) == v
                                                   for k, v in match.items()):
                    return event
                if isinstance(event, Error) and event.client_event_id is not None and \
                        event.client_event_id == match.get("client_event_id"):
                    raise ServerError(event)
            if self._reader.done():
                raise ConnectionError(f"the connection closed ({self.closed_reason})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind.__name__} within {within} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self._deliver(parse_media(message))
                    continue
                event = parse_event(json.loads(message))
                self._history.append(event)
                utterance = getattr(event, "utterance_id", None)
                if utterance:
                    self._last_utterance = max(self._last_utterance, _number(utterance))
                if len(self._history) > 10_000:  # bounded: old events go
                    del self._history[:5_000]
                    self._base += 5_000
                self._changed.set()
                self._deliver(event)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_reason = f"{self.ws.close_code} {self.ws.close_reason or ''}".strip()
            self._changed.set()
            with contextlib.suppress(asyncio.QueueFull):
                self._inbox.put_nowait(None)

    def _deliver(self, item: Event | MediaFrame) -> None:
        if self._inbox.full():  # the application is not reading events(): oldest goes
            self._inbox.get_nowait()
            self.dropped += 1
        self._inbox.put_nowait(item)
