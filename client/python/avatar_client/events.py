"""Typed events and media frames of the avatar-stream WebSocket protocol (docs/protocol.md).

Every event has `type`, `event_id`, `seq` (1, 2, 3, ... per connection) and `pts` (session media
time in ms); `raw` keeps the whole message, fields this SDK version does not know included.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any

KIND_H264, KIND_JPEG, KIND_PCM = 1, 2, 3
FLAG_KEYFRAME, FLAG_DISCONTINUITY = 1, 2
_HEADER = struct.Struct("<BBHIQ")


@dataclass(frozen=True)
class Event:
    type: str
    event_id: str
    seq: int
    pts: int
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class SessionReady(Event):
    session_id: str = ""
    audio_in: dict[str, int] = field(default_factory=dict)
    audio_out: dict[str, int] = field(default_factory=dict)
    video: dict[str, int] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    stats_interval_ms: int = 0


@dataclass(frozen=True)
class SessionUpdated(Event):
    audio_in: dict[str, int] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    stats_interval_ms: int = 0
    client_event_id: str | None = None


@dataclass(frozen=True)
class UtteranceStarted(Event):
    utterance_id: str = ""
    t_first_frame_ms: int = 0


@dataclass(frozen=True)
class UtteranceEnded(Event):
    utterance_id: str = ""
    played_ms: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class InputAudioCleared(Event):
    utterance_id: str | None = None
    played_ms: int = 0
    dropped_ms: int = 0
    client_event_id: str | None = None


@dataclass(frozen=True)
class BufferLevel(Event):
    queued_ms: int = 0
    max_queued_ms: int = 0
    ahead_ms: int = 0


@dataclass(frozen=True)
class Stats(Event):
    queued_ms: int = 0
    utterances: int = 0
    latency: dict[str, Any] = field(default_factory=dict)
    socket: dict[str, int] = field(default_factory=dict)
    viewers: dict[str, int] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TierChanged(Event):
    """kind "output": this socket's media changed (reason "client"); kind "generation": the
    server's latency governor moved the session's generation tier (reason "governor"), given
    in `generation` ({size, steps}) and `previous_generation`, with its reason in `message`."""

    kind: str = "output"
    output: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    generation: dict[str, Any] | None = None
    previous_generation: dict[str, Any] | None = None
    message: str = ""


@dataclass(frozen=True)
class Error(Event):
    code: str = ""
    message: str = ""
    retryable: bool = False
    client_event_id: str | None = None


_TYPES: dict[str, type[Event]] = {
    "session.ready": SessionReady, "session.updated": SessionUpdated,
    "utterance.started": UtteranceStarted, "utterance.ended": UtteranceEnded,
    "input_audio.cleared": InputAudioCleared, "buffer.level": BufferLevel, "stats": Stats,
    "tier.changed": TierChanged, "error": Error,
}


def parse_event(message: dict[str, Any]) -> Event:
    """A server JSON event -> its typed form (unknown types become a plain `Event`)."""
    cls = _TYPES.get(str(message.get("type")), Event)
    known = {f.name for f in fields(cls)} - {"raw"}
    values = {k: v for k, v in message.items() if k in known}
    return cls(**{"type": "", "event_id": "", "seq": 0, "pts": 0, **values}, raw=message)


@dataclass(frozen=True)
class MediaFrame:
    """A binary server message: video (an H.264 Annex-B access unit or a JPEG image) or a
    40 ms slice of the avatar's audio (PCM s16le, mono, 48 kHz), at media time `pts` (ms)."""

    kind: int
    keyframe: bool
    discontinuity: bool
    duration_ms: int
    pts: int
    data: bytes = field(repr=False)

    @property
    def is_audio(self) -> bool:
        return self.kind == KIND_PCM

    @property
    def codec(self) -> str:
        return {KIND_H264: "h264", KIND_JPEG: "jpeg", KIND_PCM: "pcm"}.get(self.kind, "unknown")


def parse_media(data: bytes) -> MediaFrame:
    """A server binary frame; ValueError for bytes that are not one."""
    if len(data) < _HEADER.size:
        raise ValueError(f"a media frame starts with a {_HEADER.size}-byte header; got "
                         f"{len(data)} bytes")
    kind, flags, size, duration, pts = _HEADER.unpack_from(data)
    if not _HEADER.size <= size <= len(data):
        raise ValueError(f"media header length {size} is outside {_HEADER.size}..{len(data)}")
    return MediaFrame(kind, bool(flags & FLAG_KEYFRAME), bool(flags & FLAG_DISCONTINUITY),
                      duration, pts, bytes(data[size:]))
