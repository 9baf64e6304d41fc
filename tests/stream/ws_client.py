"""A raw test client of the bot WebSocket (the `websockets` package): it records every event and
media frame, and checks each event against the spec as it arrives (schema, seq order)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import websockets

from stream.ws.protocol import KIND_H264, KIND_JPEG, KIND_PCM, server_problem, unpack_media
from tests.stream.rtc_client import mouth_dark_fraction


@dataclass
class Media:
    kind: int
    flags: int
    duration_ms: int
    pts_ms: int
    payload: bytes


@dataclass
class Recorder:
    events: list[dict[str, Any]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def audio(self) -> tuple[int, np.ndarray]:
        """(pts of the first slice, all PCM received, int16 48 kHz), checking continuity."""
        slices = [m for m in self.media if m.kind == KIND_PCM]
        if not slices:
            return 0, np.zeros(0, np.int16)
        pts = [s.pts_ms for s in slices]
        assert all(b - a == 40 for a, b in zip(pts, pts[1:], strict=False)), "audio gap"
        return pts[0], np.concatenate([np.frombuffer(s.payload, "<i2") for s in slices])

    def mouths(self) -> list[tuple[int, float]]:
        """(pts, mouth-dark fraction) of every JPEG frame received."""
        out = []
        for m in self.media:
            if m.kind == KIND_JPEG:
                with av.open(io.BytesIO(m.payload), "r", format="mjpeg") as c:
                    rgb = next(c.decode(video=0)).to_ndarray(format="rgb24")
                out.append((m.pts_ms, mouth_dark_fraction(rgb)))
        return out


class WsClient:
    def __init__(self, ws: websockets.ClientConnection):
        self.ws = ws
        self.rec = Recorder()
        self._task = asyncio.get_running_loop().create_task(self._read(), name="test-ws-read")
        self._new = asyncio.Event()

    @classmethod
    async def connect(cls, session: dict[str, Any], token: str | None = None,
                      **kwargs: Any) -> WsClient:
        url = f"{session['urls']['ws']}?token={token or session['token']}"
        return cls(await websockets.connect(url, max_size=None, **kwargs))

    async def _read(self) -> None:
        seq = 0
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    kind, flags, duration, pts, payload = unpack_media(message)
                    assert kind in (KIND_H264, KIND_JPEG, KIND_PCM), kind
                    self.rec.media.append(Media(kind, flags, duration, pts, payload))
                else:
                    event = json.loads(message)
                    problem = server_problem(event)
                    if problem is not None:
                        self.rec.problems.append(problem)
                    if event.get("seq") != seq + 1:
                        self.rec.problems.append(f"seq {event.get('seq')} after {seq}")
                    seq = event.get("seq", seq)
                    self.rec.events.append(event)
                self._new.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.ws.close_code is not None:
                self.rec.close_code = self.ws.close_code
                self.rec.close_reason = self.ws.close_reason or ""
            self._new.set()

    async def send(self, message: dict[str, Any] | bytes) -> None:
        await self.ws.send(message if isinstance(message, bytes) else json.dumps(message))

    async def wait(self, kind: str, within: float = 10.0, after: int = 0,
                   **match: Any) -> dict[str, Any]:
        """The first event of `kind` (with fields equal to `match`) at index >= `after`."""
        deadline = time.monotonic() + within
        while True:
            for event in self.rec.events[after:]:
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or self._task.done():
                raise AssertionError(f"no {kind} {match or ''} within {within} s; got "
                                     f"{[e['type'] for e in self.rec.events]}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def closed(self, within: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.shield(self._task), within)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5)
        assert not self.rec.problems, self.rec.problems


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, level: float = 0.5) -> bytes:
    """A steady sine (never silent for more than a sample) as s16le mono."""
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2").tobytes()


async def send_pcm(client: WsClient, pcm: bytes, chunk_bytes: int = 1280) -> None:
    for i in range(0, len(pcm), chunk_bytes):
        await client.send(pcm[i:i + chunk_bytes])


def loud_span(audio: np.ndarray, threshold: int = 200, window: int = 96) -> tuple[int, int]:
    """[first, last] sample index of the non-silent part (5 ms RMS windows above threshold)."""
    n = len(audio) // window
    rms = np.sqrt(np.mean(audio[: n * window].astype(np.float64).reshape(n, window) ** 2, axis=1))
    loud = np.flatnonzero(rms > threshold)
    if not len(loud):
        return -1, -1
    return int(loud[0]) * window, int(loud[-1] + 1) * window
