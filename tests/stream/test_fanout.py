"""The media fan-out: one encoder per variant for any number of consumers, joining at a
keyframe, a slow consumer dropping stale video for itself only, audio never dropped."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np

from engine.api import FrameBlock
from stream.config import MediaConfig
from stream.media.encoder import make_executor
from stream.media.fanout import MediaConsumer, SessionMedia, VariantKey
from stream.media.timeline import FrameStore, MediaClock, PlayoutAudio


def media_of(seconds_of_frames: float = 6.0) -> tuple[SessionMedia, MediaClock]:
    clock = MediaClock(time.monotonic(), delay=0.0)
    frames = FrameStore(capacity=1000)
    rng = np.random.default_rng(0)
    for b in range(int(seconds_of_frames / 0.48) + 1):
        frames.put(FrameBlock(b, 12 * b, rng.integers(0, 255, (12, 64, 128, 3), np.uint8)))
    playout = PlayoutAudio(seconds=10.0)
    playout.write(0, np.full(48000 * 5, 100, np.int16))
    media = SessionMedia(clock, frames, playout, MediaConfig(), make_executor(MediaConfig()),
                         "test")
    return media, clock


async def drain(consumer: MediaConsumer, into: list) -> None:
    while True:
        await consumer.wait()
        while (packet := consumer.get_nowait()) is not None:
            into.append(packet)


async def test_consumers_of_a_variant_share_one_encoder_and_slow_ones_drop_for_themselves(
) -> None:
    media, _ = media_of()
    key = VariantKey("h264", 128, 64, 25)
    fast, other, slow = (MediaConsumer(n, max_video=4) for n in ("fast", "other", "slow"))
    got_fast: list = []
    got_other: list = []
    tasks = [asyncio.create_task(drain(fast, got_fast)), asyncio.create_task(drain(other,
                                                                                   got_other))]
    for consumer in (fast, slow):
        await media.subscribe(consumer, key, audio=False)
    await asyncio.sleep(1.0)
    await media.subscribe(other, key, audio=False)  # joins later
    await asyncio.sleep(1.0)
    assert list(media.variants) == [key]  # three consumers, one encoder
    variant = media.variants[key]
    for t in tasks:
        t.cancel()
    await media.aclose()

    assert variant.encoded >= 40
    pts = [p.pts_ms for p in got_fast]
    assert got_fast[0].keyframe and pts == list(range(pts[0], pts[0] + 40 * len(pts), 40))
    # the late joiner starts at a keyframe (asked for at once) and then shares the bytes
    assert got_other[0].keyframe and got_other[0].pts_ms - (pts[0] + 1000) < 200
    shared = {p.pts_ms: p.data for p in got_fast}
    assert all(shared[p.pts_ms] == p.data for p in got_other)
    # the slow one (never drained) kept only a bounded, fresh queue; the others lost nothing
    assert slow.pending() <= 4 and slow.video_dropped > 30
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for p in got_fast for f in decoder.decode(av.Packet(p.data))]
    assert len(decoded) >= len(got_fast) - 1 and decoded[0].width == 128


async def test_variants_by_size_and_rate_and_audio_for_who_asks() -> None:
    media, _ = media_of()
    half = MediaConsumer("half")
    jpeg = MediaConsumer("jpeg")
    got_half: list = []
    got_jpeg: list = []
    tasks = [asyncio.create_task(drain(half, got_half)), asyncio.create_task(drain(jpeg,
                                                                                   got_jpeg))]
    await media.subscribe(half, VariantKey("h264", 64, 32, 12.5), audio=True)
    await media.subscribe(jpeg, VariantKey("jpeg", 128, 64, 5), audio=False)
    await asyncio.sleep(1.2)
    assert len(media.variants) == 2
    await media.unsubscribe(jpeg)
    assert len(media.variants) == 1  # its encoder went with its last consumer
    for t in tasks:
        t.cancel()
    await media.aclose()
    video = [p for p in got_half if p.kind == "video"]
    audio = [p for p in got_half if p.kind == "audio"]
    assert all(b.pts_ms - a.pts_ms == 80 for a, b in zip(video, video[1:], strict=False))
    assert all(b.pts_ms - a.pts_ms == 40 for a, b in zip(audio, audio[1:], strict=False))
    assert audio and all(len(p.data) == 3840 for p in audio)
    frames = [p for p in got_jpeg if p.kind == "video"]
    assert all(p.kind == "video" for p in got_jpeg) and all(
        b.pts_ms - a.pts_ms == 200 for a, b in zip(frames, frames[1:], strict=False))
    with av.open(__import__("io").BytesIO(frames[0].data), "r", format="mjpeg") as c:
        assert next(c.decode(video=0)).width == 128


async def test_a_consumer_whose_audio_backs_up_is_stalled_not_dropped() -> None:
    media, _ = media_of()
    stuck = MediaConsumer("stuck", max_audio_s=0.4)
    await media.subscribe(stuck, None, audio=True)
    await asyncio.sleep(0.8)
    await media.aclose()
    assert stuck.stalled and stuck.pending() >= 10  # everything kept; its owner closes it
