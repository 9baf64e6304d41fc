"""The chatbot WebSocket protocol: message types, validation against the JSON Schemas, event and
media framing. No I/O here; docs/protocol.md is the human-readable spec.

Every text frame is one JSON object with a `type`. Incoming messages are validated against their
schema in protocol.schema.json (one per message); an invalid one becomes a `ProtocolError` whose
code and message say what is wrong and what is accepted. Outgoing events carry `event_id`, `seq`
(per connection, 1, 2, 3, ...) and `pts` (session media time in ms).

Server binary frames carry media behind a 16-byte little-endian header:

    u8 kind (1 H.264 access unit, Annex-B | 2 JPEG image | 3 PCM s16le mono 48 kHz)
    u8 flags (bit 0 keyframe, bit 1 discontinuity: frames were dropped before this one)
    u16 header length (16; a reader skips any longer header)
    u32 duration in ms
    u64 pts: session media time in ms
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from stream.media.fanout import MediaPacket

SCHEMA_PATH = Path(__file__).with_name("protocol.schema.json")
SCHEMA_ID = "urn:avatar-stream:ws-protocol:1"
PROTOCOL_VERSION = 1

SAMPLE_RATES = (8000, 16000, 24000, 48000)
DEFAULT_RATE, DEFAULT_CHANNELS = 16000, 1

# every event the server sends (a test checks each has a schema)
SERVER_EVENTS = ("session.ready", "session.updated", "utterance.started", "utterance.ended",
                 "input_audio.cleared", "buffer.level", "stats", "tier.changed", "error")
CLIENT_MESSAGES = ("session.update", "utterance.end", "utterance.interrupt", "session.keepalive")

# error codes -> retryable
ERRORS = {
    "invalid_json": False,  # a text frame that is not a JSON object
    "unknown_type": False,
    "invalid_message": False,  # a field of the wrong type, out of range, or unknown
    "invalid_audio_frame": False,  # a binary frame that does not hold whole samples
    "buffer_full": True,  # the queue is full: the server reads on once there is room
    "rate_limited": True,  # too many messages a second: the server reads slower
    "internal": True,
}

# close codes (RFC 6455; 4000-4999 are the application's)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the session ended, or the server shuts down
CLOSE_POLICY = 1008  # the client does not read what it is sent
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_REPLACED = 4001  # a newer connection of the same session took over

KIND_H264, KIND_JPEG, KIND_PCM = 1, 2, 3
FLAG_KEYFRAME, FLAG_DISCONTINUITY = 1, 2
HEADER = struct.Struct("<BBHIQ")
_KINDS = {"h264": KIND_H264, "jpeg": KIND_JPEG, "pcm": KIND_PCM}


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str, client_event_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_event_id = client_event_id


# 1. schemas ----------------------------------------------------------------------------------


@cache
def schema() -> dict[str, Any]:
    with SCHEMA_PATH.open() as f:
        doc: dict[str, Any] = json.load(f)
    return doc


@cache
def _validator(side: str, kind: str) -> Draft202012Validator:
    registry: Registry = Registry().with_resource(SCHEMA_ID, Resource.from_contents(schema()))
    return Draft202012Validator({"$ref": f"{SCHEMA_ID}#/{side}/{kind}"}, registry=registry)


def _problem(side: str, kind: str, message: dict[str, Any]) -> str | None:
    """The first schema violation of `message`, in words naming the field, or None."""
    errors = sorted(_validator(side, kind).iter_errors(message), key=lambda e: list(e.path))
    if not errors:
        return None
    err = errors[0]
    where = ".".join(str(p) for p in err.absolute_path) or "the message"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        return f"{kind}: {err.message} in {where}; accepted fields: {', '.join(allowed)}"
    if err.validator == "enum":
        return (f"{kind}: {where}={json.dumps(err.instance)} is not accepted; accepted: "
                f"{', '.join(json.dumps(v) for v in err.validator_value)}")
    return f"{kind}: {where}: {err.message}"


def server_problem(event: dict[str, Any]) -> str | None:
    """Why `event` (a server event) does not match the spec, or None (tests use it)."""
    kind = event.get("type")
    if kind not in schema()["server"]:
        return f"{kind!r} is not a server event of the spec"
    return _problem("server", str(kind), event)


# 2. client messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int = DEFAULT_RATE
    channels: int = DEFAULT_CHANNELS

    def as_dict(self) -> dict[str, int]:
        return {"sample_rate": self.sample_rate, "channels": self.channels}


@dataclass(frozen=True)
class ClientMessage:
    type: str
    event_id: str | None
    fields: dict[str, Any]


def parse_client(text: str) -> ClientMessage:
    """A text frame -> a valid client message, or ProtocolError."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("invalid_json", "a text frame must be one JSON object, e.g. "
                            '{"type": "utterance.end"}; this one is not valid JSON') from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_json", "a text frame must be one JSON object with a "
                            f"'type', not a JSON {type(message).__name__}")
    event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in schema()["client"]:
        raise ProtocolError("unknown_type", f"unknown message type {json.dumps(kind)}; "
                            f"accepted: {', '.join(CLIENT_MESSAGES)} (audio goes in binary "
                            "frames)", event_id)
    problem = _problem("client", kind, message)
    if problem is not None:
        raise ProtocolError("invalid_message", problem, event_id)
    return ClientMessage(kind, event_id, message)


def check_pcm(data: bytes, fmt: AudioFormat) -> None:
    """A binary frame must hold whole samples of the declared format."""
    frame = 2 * fmt.channels
    if len(data) % frame:
        raise ProtocolError("invalid_audio_frame", f"a binary frame of {len(data)} bytes does "
                            f"not hold whole samples: PCM s16le with {fmt.channels} channel(s) "
                            f"needs a multiple of {frame} bytes; the frame was ignored")


# 3. server events and media ------------------------------------------------------------------


class EventStamper:
    """event_id, seq and pts for one connection's events."""

    def __init__(self) -> None:
        self.seq = 0
        self._prefix = f"evt_{secrets.token_hex(4)}_"

    def stamp(self, kind: str, pts_ms: int, fields: dict[str, Any]) -> dict[str, Any]:
        if kind not in SERVER_EVENTS:
            raise ValueError(f"{kind!r} is not a server event of the protocol")
        self.seq += 1
        return {"type": kind, "event_id": f"{self._prefix}{self.seq}", "seq": self.seq,
                "pts": max(0, int(pts_ms)), **fields}


def error_event(code: str, message: str, client_event_id: str | None = None) -> dict[str, Any]:
    """The fields of an `error` event."""
    return {"code": code, "message": message, "retryable": ERRORS[code],
            "client_event_id": client_event_id}


def pack_media(packet: MediaPacket) -> bytes:
    flags = (FLAG_KEYFRAME if packet.keyframe else 0) | (
        FLAG_DISCONTINUITY if packet.discontinuity else 0)
    return HEADER.pack(_KINDS[packet.codec], flags, HEADER.size, packet.duration_ms,
                       packet.pts_ms) + packet.data


def unpack_media(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(kind, flags, duration_ms, pts_ms, payload) of a server binary frame; ValueError for
    bytes that are not one (shorter than a header, or a header length outside it)."""
    if len(data) < HEADER.size:
        raise ValueError(f"a media frame starts with a {HEADER.size}-byte header; got "
                         f"{len(data)} bytes")
    kind, flags, size, duration, pts = HEADER.unpack_from(data)
    if not HEADER.size <= size <= len(data):
        raise ValueError(f"media header length {size} is outside {HEADER.size}..{len(data)}")
    return kind, flags, duration, pts, data[size:]
