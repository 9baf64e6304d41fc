"""A LiveKit room without a LiveKit server, for the avatar worker's tests.

`FakeLink` joins `FakeRoom`s in memory: every room sees the others' participants, byte streams
(`stream_bytes` -> the receiver's `register_byte_stream_handler`), RPCs (`perform_rpc` -> the
callee's `register_rpc_method`, `UNSUPPORTED_METHOD` when it has none) and published tracks
(`publish_track` -> `track_published` / `local_track_published`). It is built from livekit's
public types (`rtc.EventEmitter`, `rtc.RpcInvocationData`, `rtc.RpcError`, `rtc.ByteStreamInfo`,
the participant and track enums) and carries the attributes livekit-agents reads; the tracks are
real `rtc` tracks, so a test can subscribe to them with `rtc.AudioStream` / `rtc.VideoStream`.
What it does not model: the network, SFU, WebRTC encoding, token checks.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc

_ids = itertools.count(1)


@dataclass
class FakePublication:
    sid: str
    name: str
    kind: int
    source: int
    track: Any
    subscribed: bool = True


@dataclass
class FakeParticipant:
    """One participant: the local participant of its own room, a remote one in the others."""

    link: FakeLink
    room: FakeRoom
    identity: str
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
    name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    track_publications: dict[str, FakePublication] = field(default_factory=dict)
    _rpc_handlers: dict[str, Any] = field(default_factory=dict)
    rpc_calls: list[tuple[str, str, str]] = field(default_factory=list)  # (to, method, payload)

    @property
    def sid(self) -> str:
        return f"PA_{self.identity}"

    def register_rpc_method(self, method: str, handler: Any = None) -> Any:
        if handler is None:  # used as a decorator
            return lambda fn: self.register_rpc_method(method, fn)
        self._rpc_handlers[method] = handler
        return handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None, **_: Any) -> str:
        self.rpc_calls.append((destination_identity, method, payload))
        await asyncio.sleep(0)  # the network: never synchronous
        callee = self.link.participant(destination_identity)
        handler = callee._rpc_handlers.get(method) if callee else None
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD,
                               f"{destination_identity} has no method {method}")
        data = rtc.RpcInvocationData(f"RQ_{next(_ids)}", self.identity, payload,
                                     response_timeout or 10.0, method)
        result = handler(data)
        if inspect.isawaitable(result):
            result = await result
        return str(result)

    async def stream_bytes(self, name: str, *, topic: str = "",
                           destination_identities: list[str] | None = None,
                           attributes: dict[str, str] | None = None,
                           **_: Any) -> FakeByteWriter:
        info = rtc.ByteStreamInfo(stream_id=f"BS_{next(_ids)}", mime_type="application/octet-"
                                  "stream", topic=topic, timestamp=int(time.time() * 1000),
                                  size=None, attributes=dict(attributes or {}), name=name)
        readers = []
        for room in self.link.rooms:
            identity = room.local_participant.identity
            if room is self.room or (destination_identities
                                     and identity not in destination_identities):
                continue
            handler = room.byte_handlers.get(topic)
            if handler is not None:
                reader = FakeByteReader(info)
                readers.append(reader)
                handler(reader, self.identity)
        return FakeByteWriter(info, readers)

    async def publish_track(self, track: Any, options: Any = None) -> FakePublication:
        pub = FakePublication(f"TR_{next(_ids)}", track.name, track.kind,
                              getattr(options, "source", 0), track)
        self.track_publications[pub.sid] = pub
        self.room.emit("local_track_published", pub, track)
        for room in self.link.rooms:
            if room is not self.room:
                room.emit("track_published", pub, self)
        return pub


class FakeByteReader:
    def __init__(self, info: rtc.ByteStreamInfo):
        self.info = info
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> FakeByteReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.get()
        if chunk is None:
            self._chunks.put_nowait(None)
            raise StopAsyncIteration
        return chunk


class FakeByteWriter:
    def __init__(self, info: rtc.ByteStreamInfo, readers: list[FakeByteReader]):
        self.info = info
        self._readers = readers

    async def write(self, data: bytes) -> None:
        for reader in self._readers:
            reader._chunks.put_nowait(bytes(data))

    async def aclose(self, *_: Any, **__: Any) -> None:
        for reader in self._readers:
            reader._chunks.put_nowait(None)


class FakeRoom(rtc.EventEmitter[str]):
    def __init__(self, link: FakeLink, identity: str, name: str, kind: int,
                 attributes: dict[str, str] | None = None):
        super().__init__()
        self.link = link
        self.name = name
        self.local_participant = FakeParticipant(link, self, identity, kind, identity,
                                                 dict(attributes or {}))
        self.byte_handlers: dict[str, Any] = {}
        self.connected = True

    @property
    def remote_participants(self) -> dict[str, FakeParticipant]:
        if not self.connected:
            return {}
        return {r.local_participant.identity: r.local_participant for r in self.link.rooms
                if r is not self}

    def isconnected(self) -> bool:
        return self.connected

    def register_byte_stream_handler(self, topic: str, handler: Any) -> None:
        self.byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.byte_handlers.pop(topic, None)

    async def disconnect(self) -> None:
        """Leave: the others see the participant go; this room is disconnected."""
        if not self.connected:
            return
        self.connected = False
        self.link.rooms.remove(self)
        for room in self.link.rooms:
            room.emit("participant_disconnected", self.local_participant)
        self.emit("connection_state_changed", rtc.ConnectionState.CONN_DISCONNECTED)
        self.emit("disconnected", "CLIENT_INITIATED")


class FakeLink:
    """The room on the (absent) server: participants join it as `FakeRoom`s."""

    def __init__(self, name: str = "test-room"):
        self.name = name
        self.rooms: list[FakeRoom] = []

    def join(self, identity: str, *, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
             attributes: dict[str, str] | None = None) -> FakeRoom:
        room = FakeRoom(self, identity, self.name, kind, attributes)
        for other in self.rooms:
            other.emit("participant_connected", room.local_participant)
            other.emit("participant_active", room.local_participant)
        self.rooms.append(room)
        return room

    def participant(self, identity: str) -> FakeParticipant | None:
        for room in self.rooms:
            if room.local_participant.identity == identity:
                return room.local_participant
        return None
