"""AvatarMedia: the socket's media decoded for a player (RGB pictures, PCM slices), aligned at
the start, dropped frames stood in for, events handed over at once; on scripted media frames and
against the real server (H.264 and JPEG)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
from avatar_client import AvatarSocket, MediaFrame, create_session, delete_session, parse_event
from avatar_client.media import AudioSlice, AvatarMedia, VideoImage

from tests.stream.conftest import Running

W, H = 64, 32


def jpeg(shade: int) -> bytes:
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = W, H, "yuvj420p", Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), shade, np.uint8), format="rgb24")
    return b"".join(bytes(p) for p in ctx.encode(frame.reformat(format="yuvj420p")))


def video(pts: int, shade: int = 128) -> MediaFrame:
    return MediaFrame(2, True, False, 40, pts, jpeg(shade))


def audio(pts: int, level: int = 0) -> MediaFrame:
    return MediaFrame(3, False, False, 40, pts, struct.pack("<h", level) * 1920)


class ScriptedBot:
    """What AvatarMedia uses of an AvatarSocket, playing a fixed list of items."""

    def __init__(self, items: list[Any], output_video: str = "jpeg"):
        self.items = items
        self.output = {"video": output_video, "audio": True}
        self.ready = SimpleNamespace(session_id="test")

    async def events(self) -> AsyncIterator[Any]:
        for item in self.items:
            await asyncio.sleep(0)
            yield item


async def collect(media: AvatarMedia) -> list[VideoImage | AudioSlice]:
    out = [item async for item in media]
    await media.aclose()
    return out


async def test_audio_starts_with_the_first_picture_and_events_go_to_the_callback() -> None:
    event = parse_event({"type": "buffer.level", "event_id": "e", "seq": 2, "pts": 0,
                         "queued_ms": 0, "max_queued_ms": 30000, "ahead_ms": 0})
    seen: list[Any] = []

    async def on_event(e: Any) -> None:  # a coroutine function is awaited
        seen.append(e)

    bot = ScriptedBot([audio(0), audio(40), event, audio(80), video(80), audio(120),
                       video(120)])
    items = await collect(AvatarMedia(bot, on_event))  # type: ignore[arg-type]
    assert seen == [event]
    assert [(type(i).__name__, i.pts) for i in items] == [
        ("VideoImage", 80), ("AudioSlice", 80), ("VideoImage", 120), ("AudioSlice", 120)]
    picture = items[0]
    assert isinstance(picture, VideoImage) and (picture.width, picture.height) == (W, H)
    rgb = np.frombuffer(picture.rgb, np.uint8).reshape(H, W, 3)
    assert abs(int(rgb.mean()) - 128) <= 3  # the JPEG's grey, decoded to RGB
    assert items[1].duration_ms == 40  # type: ignore[union-attr]


def order(items: list[VideoImage | AudioSlice]) -> list[str]:
    return [f"{'v' if isinstance(i, VideoImage) else 'a'}{i.pts}" for i in items]


async def test_each_picture_comes_before_the_audio_of_its_slot() -> None:
    # the server's order: a slot's slice, then its picture (encoded meanwhile)
    at_25 = [audio(0), video(0), audio(40), video(40), audio(80), audio(120), video(120)]
    assert order(await collect(AvatarMedia(ScriptedBot(at_25)))) == [  # type: ignore[arg-type]
        "v0", "a0", "v40", "a40", "a80", "v120", "a120"]  # 80's picture was dropped
    slow = [MediaFrame(2, True, False, 80, pts, jpeg(99)) for pts in (0, 80)]  # 12.5 fps
    at_12 = [audio(0), slow[0], audio(40), audio(80), slow[1], audio(120), audio(160)]
    assert order(await collect(AvatarMedia(ScriptedBot(at_12)))) == [  # type: ignore[arg-type]
        "v0", "a0", "a40", "v80", "a80", "a120", "a160"]


async def test_dropped_frames_are_stood_in_for_when_asked() -> None:
    script = [video(0, 50), video(40, 60), video(160, 70), video(200, 80)]  # 80, 120 dropped
    filled = await collect(AvatarMedia(ScriptedBot(script), fill_dropped=True))  # type: ignore
    assert [(i.pts, i.repeated) for i in filled] == [  # type: ignore[union-attr]
        (0, False), (40, False), (80, True), (120, True), (160, False), (200, False)]
    assert filled[2].rgb == filled[1].rgb  # type: ignore[union-attr]
    plain = await collect(AvatarMedia(ScriptedBot(script)))  # type: ignore[arg-type]
    assert [i.pts for i in plain] == [0, 40, 160, 200]


async def test_a_damaged_frame_is_skipped_and_counted() -> None:
    bot = ScriptedBot([video(0), MediaFrame(2, True, False, 40, 40, b"not a jpeg"), video(80)])
    media = AvatarMedia(bot)  # type: ignore[arg-type]
    items = await collect(media)
    assert [i.pts for i in items] == [0, 80] and media.decode_errors == 1


async def test_h264_and_jpeg_from_the_server_decode_to_the_session_size(
        running: Running) -> None:
    session = await create_session(running.base)
    async with await AvatarSocket.connect(session) as bot:
        for codec in ("h264", "jpeg"):
            await bot.update(video=codec, audio=True, fps=12.5)
            media = AvatarMedia(bot)
            pictures: list[VideoImage] = []
            slices: list[AudioSlice] = []
            async for item in media:
                (pictures if isinstance(item, VideoImage) else slices).append(item)  # type: ignore
                if len(pictures) == 8:
                    break
            await media.aclose()
            assert media.decode_errors == 0, codec
            assert {(p.width, p.height) for p in pictures} == {(256, 128)}, codec
            assert all(b.pts - a.pts == 80 for a, b in zip(pictures, pictures[1:],
                                                           strict=False)), codec
            assert slices and slices[0].pts >= pictures[0].pts, codec
    await delete_session(session)


async def test_a_failing_event_callback_does_not_stop_the_media() -> None:
    event = parse_event({"type": "stats", "event_id": "e", "seq": 2, "pts": 0})

    def broken(_: Any) -> None:
        raise RuntimeError("the application's bug")

    bot = ScriptedBot([video(0), event, audio(0), video(40), audio(40)])
    items = await collect(AvatarMedia(bot, broken))  # type: ignore[arg-type]
    assert order(items) == ["v0", "a0", "v40", "a40"]
