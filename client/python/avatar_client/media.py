"""The avatar's media from an `AvatarSocket`, decoded for a player: RGB images and PCM slices in
presentation order, and the socket's events handed to a callback the moment they arrive.

    media = AvatarMedia(bot, on_event=handle)        # events (UtteranceStarted, ...) at once
    async for item in media:                         # VideoImage | AudioSlice
        ...
    await media.aclose()

Two tasks, so control never waits behind media: a reader takes everything off the socket
(events go to `on_event` there and then, awaited if it is a coroutine function, so keep it
short; media into a queue of about two seconds), and the
iterator decodes video off the event loop (PyAV, one worker thread: an H.264 decoder is a
sequence) while the caller plays what it got. When the queue is full the reader waits, the
socket stops being read, and the server drops stale video for this socket alone (audio never).

Players want one timeline: with `align` (the default when video was asked for) audio starts with
the first video frame, so both begin at the same media time, and each picture comes before the
audio of its slot (see `_audio`); with `fill_dropped` a video frame the server dropped for this
socket (the next one has a gap before it) is stood in for by a copy of the previous picture, so a
recorder's frame count keeps matching the audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from avatar_client.client import AvatarSocket
from avatar_client.events import Event, MediaFrame

log = logging.getLogger(__name__)

AUDIO_RATE = 48000  # the server's audio out: PCM s16le mono, 40 ms slices
QUEUE_ITEMS = 100  # about 2 s of media (25 video frames + 25 audio slices a second)
MAX_FILL = 50  # at most this many stand-in frames for one gap (2 s at 25 fps)


@dataclass(frozen=True)
class VideoImage:
    """One decoded video frame."""

    pts: int  # session media time, ms
    duration_ms: int  # its display time (40 at 25 fps)
    width: int
    height: int
    rgb: bytes = field(repr=False)  # packed RGB24, row after row (width * height * 3 bytes)
    repeated: bool = False  # a copy of the previous picture standing in for a dropped frame


@dataclass(frozen=True)
class AudioSlice:
    """A slice of the avatar's audio (what viewers hear with the frame at `pts`)."""

    pts: int  # session media time, ms
    pcm: bytes = field(repr=False)  # s16le mono
    sample_rate: int = AUDIO_RATE

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate * 1000


class VideoDecoder:
    """Media frames (H.264 access units, JPEG images) -> RGB24 pictures, with PyAV.

    Keeps decoder state between calls (H.264 is a sequence): one per stream, one thread at a
    time."""

    def __init__(self) -> None:
        self._codecs: dict[str, Any] = {}

    def decode(self, frame: MediaFrame) -> list[tuple[int, int, bytes]]:
        """(width, height, rgb) for each picture the frame completes (normally exactly one)."""
        import av

        if frame.codec not in ("h264", "jpeg"):
            raise ValueError(f"media kind {frame.kind} ({frame.codec}) is not video")
        ctx = self._codecs.get(frame.codec)
        if ctx is None:
            ctx = av.CodecContext.create("h264" if frame.codec == "h264" else "mjpeg", "r")
            if frame.codec == "h264":
                ctx.flags |= av.codec.context.Flags.low_delay  # one picture out per unit in
            self._codecs[frame.codec] = ctx
        out = []
        for picture in ctx.decode(av.Packet(frame.data)):
            rgb = picture.to_ndarray(format="rgb24")
            out.append((picture.width, picture.height, rgb.tobytes()))
        return out


class AvatarMedia:
    """Decoded media of one socket (see the module). Iterate it once."""

    def __init__(self, bot: AvatarSocket,
                 on_event: Callable[[Event], Awaitable[None] | None] | None = None, *,
                 align: bool | None = None, fill_dropped: bool = False,
                 max_queued: int = QUEUE_ITEMS):
        self.bot = bot
        self.on_event = on_event
        self.align = bot.output.get("video", "none") != "none" if align is None else align
        self.fill_dropped = fill_dropped
        self._queue: asyncio.Queue[MediaFrame | None] = asyncio.Queue(max_queued)
        self._decoder = VideoDecoder()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avatar-decode")
        self._reader: asyncio.Task[None] | None = None
        self._last_video: VideoImage | None = None
        self._early_audio: deque[AudioSlice] = deque(maxlen=25)  # before the first picture
        self._held: AudioSlice | None = None  # waiting for its picture (see _audio)
        self.decode_errors = 0

    def start(self) -> None:
        """Start reading the socket (iterating starts it too)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"avatar-media-{self.bot.ready.session_id}")

    async def _read(self) -> None:
        async for item in self.bot.events():
            if isinstance(item, MediaFrame):
                await self._queue.put(item)
            elif self.on_event is not None:
                try:
                    result = self.on_event(item)
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # the caller's bug must not stop the avatar's media
                    log.exception("on_event failed on %s", item.type)
        await self._queue.put(None)  # the socket closed: iteration ends after what came before

    async def __aiter__(self) -> AsyncIterator[VideoImage | AudioSlice]:
        self.start()
        loop = asyncio.get_running_loop()
        while (frame := await self._queue.get()) is not None:
            if frame.is_audio:
                for piece in self._audio(AudioSlice(frame.pts, frame.data)):
                    yield piece
                continue
            try:
                pictures = await loop.run_in_executor(self._executor, self._decoder.decode,
                                                      frame)
            except Exception:  # a damaged frame: the next keyframe recovers
                self.decode_errors += 1
                continue
            for width, height, rgb in pictures:
                for out in self._video(VideoImage(frame.pts, frame.duration_ms, width, height,
                                                  rgb)):
                    yield out
        if self._held is not None:
            yield self._held

    # Order. The server sends a slot's audio slice just before its picture (the picture is
    # encoded first), so each slice that starts a new picture's slot is held until that picture
    # has been yielded (at most until the next slice: then its picture was dropped). A player
    # that shows a picture once the audio before it has played (Pipecat's sync_with_audio)
    # then shows picture t with audio t, not one slot late.

    def _audio(self, piece: AudioSlice) -> list[AudioSlice]:
        if not self.align:
            return [piece]
        last = self._last_video
        if last is None:
            self._early_audio.append(piece)  # it may belong with the first picture
            return []
        out = [self._held] if self._held is not None else []
        self._held = None
        if piece.pts < last.pts + last.duration_ms:
            out.append(piece)  # the picture showing now covers it (fps below 25)
        else:
            self._held = piece
        return out

    def _video(self, image: VideoImage) -> list[VideoImage | AudioSlice]:
        out: list[VideoImage | AudioSlice] = []
        last, self._last_video = self._last_video, image
        if last is None:
            # the slice of the first picture arrives just before it: keep what is not earlier
            out.append(image)
            out.extend(a for a in self._early_audio if a.pts + a.duration_ms > image.pts)
            self._early_audio.clear()
            return out
        step = max(1, last.duration_ms)
        missing = min(MAX_FILL, round((image.pts - last.pts) / step) - 1)
        if self.fill_dropped and missing > 0:
            out.extend(VideoImage(last.pts + k * step, step, last.width, last.height, last.rgb,
                                  repeated=True) for k in range(1, missing + 1))
        out.append(image)
        if self._held is not None and self._held.pts < image.pts + image.duration_ms:
            out.append(self._held)
            self._held = None
        return out

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._executor.shutdown(wait=False, cancel_futures=True)
