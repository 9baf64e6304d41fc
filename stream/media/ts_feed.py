"""A session's MPEG-TS output: one feed, muxed once, read by every stream.ts reader.

    SessionMedia --H.264 access units (the first rung) + AAC--> TsFeed (one MediaConsumer,
        one TsMuxer) --TS chunks--> TsReader, TsReader, ...   (each its own bounded queue)

The feed exists while a reader does. A reader joins at the next keyframe chunk (it starts with
the PAT and PMT) and then gets every byte: audio is never dropped, so a reader cannot skip
ahead either. One that falls more than `ts_max_lag_s` of media time behind (a client that
stopped reading, a path slower than the stream) is cut, with a log line, instead of buffering
without bound; its queue never holds more than that.

Packetizing runs on the event loop: it is byte slicing (about 40 TS packets for a P-frame and
one PES of audio per 40 ms), measured in microseconds, and keeps the byte order exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.api import FPS
from stream.media.consumer import MediaConsumer, MediaPacket
from stream.media.fanout import SessionMedia
from stream.media.mpegts import TsMuxer, ms_to_clock, samples_to_clock
from stream.media.timeline import PLAYOUT_RATE
from stream.media.variant import VariantKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TsChunk:
    data: bytes
    media_s: float  # output-timeline time of the packet it carries
    keyframe: bool  # starts with PAT/PMT and a video keyframe: a reader may start here


class TsReader:
    """One stream.ts response's queue of chunks."""

    def __init__(self, name: str, max_lag_s: float, on_cut: Callable[[], None] | None = None):
        self.name = name
        self.max_lag_s = max_lag_s
        self.on_cut = on_cut
        self._chunks: deque[TsChunk] = deque()
        self._wake = asyncio.Event()
        self.started = False
        self.cut_reason: str | None = None
        self.bytes_sent = 0

    @property
    def lag_s(self) -> float:
        """Media time between the oldest chunk still waiting and the newest."""
        if len(self._chunks) < 2:
            return 0.0
        return self._chunks[-1].media_s - self._chunks[0].media_s

    def offer(self, chunk: TsChunk) -> None:
        if self.cut_reason is not None:
            return
        if not self.started:
            if not chunk.keyframe:
                return
            self.started = True
        self._chunks.append(chunk)
        self._wake.set()
        if self.lag_s > self.max_lag_s:
            self.cut(f"it fell {self.lag_s:.1f} s behind the stream (media.ts_max_lag_s = "
                     f"{self.max_lag_s:g}); a reader must take the stream in real time")

    def cut(self, reason: str) -> None:
        if self.cut_reason is None:
            self.cut_reason = reason
            self._chunks.clear()
            self._wake.set()
            log.warning("stream.ts reader %s disconnected: %s", self.name, reason)
            if self.on_cut is not None:
                self.on_cut()

    async def next(self) -> bytes | None:
        """Everything queued, once there is something; None once the reader is cut."""
        while not self._chunks and self.cut_reason is None:
            self._wake.clear()
            await self._wake.wait()
        if self.cut_reason is not None:
            return None
        data = b"".join(c.data for c in self._chunks)
        self._chunks.clear()
        self.bytes_sent += len(data)
        return data


class TsFeed:
    """The session's TS stream: subscribes while it has readers, muxes, fans out."""

    def __init__(self, media: SessionMedia, key: VariantKey, name: str):
        self.media = media
        self.key = key
        self.name = name
        # the feed never lags (muxing is quick), but a starved loop must not cost audio
        self.consumer = MediaConsumer(name, max_video=2 * FPS, max_audio_s=30.0, kind="mpegts")
        self.readers: dict[str, TsReader] = {}
        self._muxer = TsMuxer()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def add(self, reader: TsReader) -> None:
        async with self._lock:
            self.readers[reader.name] = reader
            if self._task is None:
                self._muxer = TsMuxer()
                await self.media.subscribe(self.consumer, self.key, audio="aac")
                self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
            elif self.consumer.variant is not None:
                self.consumer.variant.request_keyframe("join")  # the newcomer starts there

    async def remove(self, reader: TsReader) -> None:
        async with self._lock:
            if self.readers.pop(reader.name, None) is not None and not self.readers:
                await self._stop()

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.media.unsubscribe(self.consumer)
        self.consumer = MediaConsumer(self.name, max_video=2 * FPS, max_audio_s=30.0,
                                      kind="mpegts")

    async def aclose(self) -> None:
        for reader in list(self.readers.values()):
            reader.cut("the session ended")
        async with self._lock:
            self.readers.clear()
            await self._stop()

    def figures(self) -> list[dict]:
        return [{"reader": r.name, "bytes_sent": r.bytes_sent, "lag_s": round(r.lag_s, 3)}
                for r in self.readers.values()]

    def _mux(self, packet: MediaPacket) -> TsChunk:
        if packet.kind == "video":  # timestamps on the output timeline, like the audio's
            out_ms = packet.out * 1000 // FPS
            data = self._muxer.video(packet.data, ms_to_clock(out_ms), packet.keyframe)
            return TsChunk(data, out_ms / 1000, packet.keyframe)
        sample = packet.sample if packet.sample is not None else packet.pts_ms * 48
        data = self._muxer.audio(packet.data, samples_to_clock(sample, PLAYOUT_RATE))
        return TsChunk(data, sample / PLAYOUT_RATE, False)

    async def _run(self) -> None:
        while True:
            await self.consumer.wait()
            while (packet := self.consumer.get_nowait()) is not None:
                chunk = self._mux(packet)
                for reader in list(self.readers.values()):
                    reader.offer(chunk)
