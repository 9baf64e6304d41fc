"""Units of the media output: the ladder, the keyframe token bucket, the pacer's catch-up (audio
never skipped), a consumer's figures, the MPEG-TS packetizer read back by FFmpeg, the config."""

from __future__ import annotations

import asyncio
import io
import time

import av
import numpy as np
import pytest

from engine.api import ConfigError, FrameBlock
from stream.config import MediaConfig, Rung, StreamConfig
from stream.media.consumer import MediaConsumer, MediaPacket
from stream.media.encoder import AacEncoder, H264Encoder
from stream.media.mpegts import PID_AUDIO, PID_VIDEO, TS_PACKET, TsMuxer, crc32_mpeg2
from stream.media.pacer import FramePacer, Tick
from stream.media.timeline import FrameStore, MediaClock, PlayoutAudio
from stream.media.variant import KeyframeRequests, VariantKey, ladder_for


def test_the_ladder_follows_the_sessions_aspect_and_never_scales_up() -> None:
    rungs = MediaConfig().variants
    wide = ladder_for(rungs, (704, 384))
    assert [(v.width, v.height, v.fps, v.bitrate_kbps) for v in wide] == [
        (704, 384, 25, 1500), (528, 288, 25, 800), (352, 192, 25, 350), (352, 192, 12.5, 200)]
    tall = ladder_for(rungs, (384, 704))  # a portrait session: the same areas, standing
    assert [(v.width, v.height) for v in tall] == [(384, 704), (288, 528), (192, 352),
                                                   (192, 352)]
    small = ladder_for((Rung("704*384", 25.0, 900), Rung("101*101", 12.5, 100)), (256, 128))
    assert [(v.width, v.height) for v in small] == [(256, 128), (142, 70)]  # never larger
    assert all(v.width % 2 == 0 and v.height % 2 == 0 for v in (*wide, *tall, *small))


def test_keyframe_requests_burst_then_the_rate_and_coalesce() -> None:
    now = [100.0]
    bucket = KeyframeRequests(per_s=1.0, burst=2, clock=lambda: now[0])
    bucket.request("pli")
    assert bucket.take() == "pli"
    bucket.request("fir")
    bucket.request("pli")  # waits with the FIR: one keyframe serves both
    assert bucket.take() == "fir" and bucket.coalesced == 1
    bucket.request("resync")
    assert bucket.take() is None  # the burst is spent: it waits, it is not lost
    bucket.request("join")  # a newcomer has a budget of its own, and serves the resync too
    assert bucket.take() == "join" and bucket.take() is None
    bucket.request("pli")
    now[0] += 0.5
    assert bucket.take() is None
    now[0] += 0.5
    assert bucket.take() == "pli" and bucket.take() is None
    bucket.request("pli")
    bucket.served()  # a periodic keyframe went out meanwhile: nothing is left to make
    now[0] += 5.0
    assert bucket.take() is None and bucket.pending is None
    assert dict(bucket.requested) == {"pli": 4, "fir": 1, "resync": 1, "join": 1}


def test_variant_keys_decimate_evenly_and_check_their_values() -> None:
    half = VariantKey("h264", 352, 192, 12.5, 200)
    assert [n for n in range(10) if half.takes(n)] == [1, 3, 5, 7, 9]
    assert half.name == "h264-352x192@12.5-200k"
    with pytest.raises(ValueError, match="codec"):
        VariantKey("av1", 352, 192, 25)
    with pytest.raises(ValueError, match="fps"):
        VariantKey("vp8", 352, 192, 50)


async def test_a_late_loop_skips_pictures_but_never_audio() -> None:
    clock = MediaClock(time.monotonic(), delay=0.0)
    frames = FrameStore(capacity=1000)
    frames.put(FrameBlock(0, 0, np.zeros((12, 64, 128, 3), np.uint8)))
    playout = PlayoutAudio(seconds=10.0)
    playout.write(0, np.arange(48000 * 3, dtype=np.int64).astype(np.int16))
    pacer = FramePacer(clock, frames, playout)
    ticks: list[Tick] = []
    pacer.subscribe(ticks.append)
    await asyncio.sleep(0.3)
    time.sleep(0.3)  # noqa: ASYNC251 - the loop stalls for 7.5 frames
    await asyncio.sleep(0.3)
    await pacer.aclose()
    indexes = [t.index for t in ticks]
    assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))  # every audio slice
    audio = np.concatenate([t.audio for t in ticks])
    assert np.array_equal(audio, playout.read(indexes[0] * 1920, len(indexes) * 1920))
    skipped = [t for t in ticks if not t.shown]
    assert pacer.jumps == 1 and len(skipped) >= 5 and all(t.rgb is None for t in skipped)
    assert [t for t in ticks if t.shown and t.index >= 12 and t.repeated]  # past the last frame


def test_a_consumer_counts_what_its_viewer_saw() -> None:
    consumer = MediaConsumer("v", max_video=8)

    class Variant:
        key = VariantKey("h264", 64, 32, 25)

        def request_keyframe(self, cause: str = "") -> None:
            pass

    consumer.join(Variant())  # type: ignore[arg-type]
    for index, repeated in ((0, False), (1, True), (4, False)):
        consumer.offer_video(MediaPacket("video", index * 40, 40, b"x", "h264",
                                         keyframe=index == 0, repeated=repeated))
    while consumer.get_nowait() is not None:
        pass
    figures = consumer.figures()
    assert figures["frames_sent"] == 3 and figures["frames_repeated"] == 1
    assert figures["frames_skipped"] == 2 and figures["queue_frames"] == 0


def test_ts_packets_read_back_with_exact_timestamps_and_continuity() -> None:
    encoder = H264Encoder(128, 64, MediaConfig(keyframe_interval_s=0.4))
    aac = AacEncoder(96)
    muxer = TsMuxer()
    out = bytearray()
    rng = np.random.default_rng(0)
    for n in range(50):
        frame = rng.integers(0, 255, (64, 128, 3), np.uint8)
        encoded = encoder.encode(frame, n)
        if encoded is not None:
            out += muxer.video(encoded.data, n * 3600, encoded.keyframe)
        sound = aac.encode((np.sin(np.arange(1920) / 9) * 9000).astype(np.int16), n * 1920)
        if sound is not None:
            out += muxer.audio(sound.data, sound.sample * 90000 // 48000)
    assert len(out) % TS_PACKET == 0
    packets = [out[i:i + TS_PACKET] for i in range(0, len(out), TS_PACKET)]
    assert all(p[0] == 0x47 for p in packets)
    for pid in (PID_VIDEO, PID_AUDIO):  # continuity counters step by one on payload packets
        ccs = [p[3] & 0x0F for p in packets
               if ((p[1] & 0x1F) << 8 | p[2]) == pid and p[3] & 0x10]
        assert all((b - a) % 16 == 1 for a, b in zip(ccs, ccs[1:], strict=False)), pid
    pat = packets[0][5:5 + 3 + 13]
    assert crc32_mpeg2(pat) == 0  # a section with its CRC appended checks to zero
    with av.open(io.BytesIO(bytes(out)), "r", format="mpegts") as c:
        video_pts, audio_samples, keys = [], 0, 0
        for packet in c.demux():
            if packet.stream.type == "video" and packet.pts is not None:
                video_pts.append(packet.pts)
                keys += packet.is_keyframe
            for frame in packet.decode():
                if isinstance(frame, av.AudioFrame):
                    audio_samples += frame.samples
    steps = np.diff(video_pts)
    assert len(video_pts) == 50 and (steps == 3600).all() and keys >= 5
    assert abs(audio_samples - 49 * 1920) <= 2 * 1024  # all but the encoder's tail


@pytest.mark.parametrize("text, needle", [
    ("[media]\nvariants = []\n", "media.variants is empty"),
    ("[media]\nvariants = [{size = '704*384', fps = 50.0}]\n", "media.variants[0].fps=50.0"),
    ("[media]\nvariants = [{size = '704*384', width = 10}]\n", "media.variants[0]: expected"),
    ("[media]\nvariants = [{size = 'big'}]\n", "media.variants[0].size='big'"),
    ("[media]\nvariants = [{size = '352*192', bitrate_kbps = 300}, {size = '704*384', "
     "bitrate_kbps = 900}]\n", "must not increase"),
    ("[media]\nts_max_lag_s = 0.1\n", "media.ts_max_lag_s=0.1 is out of range"),
])
def test_bad_ladders_are_named(tmp_path, text: str, needle: str) -> None:  # noqa: ANN001
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        StreamConfig.load(path)
    assert needle in str(err.value)


def test_a_ladder_from_toml() -> None:
    cfg = StreamConfig.parse({"media": {"variants": [{"size": "960*540", "bitrate_kbps": 2000},
                                                     {"size": "480*270", "fps": 12.5}]}})
    assert cfg.media.variants == (Rung("960*540", 25.0, 2000), Rung("480*270", 12.5, 1000))


async def test_feedback_counts_remb_only_as_a_real_limit_and_moves_with_hysteresis() -> None:
    """ViewerFeedback on hand-made RTCP: a REMB that follows an app-limited stream is no limit;
    one far under what the variant sends is, in nominal units; two bad reports move."""
    from aiortc.rtp import (
        RTCP_PSFB_APP,
        RTCP_PSFB_PLI,
        RtcpPsfbPacket,
        RtcpReceiverInfo,
        RtcpRrPacket,
        pack_remb_fci,
    )

    from stream.governor import OutputGovernor
    from stream.media.feedback import ViewerFeedback

    class Sender:
        _ssrc = 1234

        async def _handle_rtcp_packet(self, packet: object) -> None:
            pass

    class Variant:
        bitrate_kbps = 1500
        sent = 300.0  # an avatar's encoder, far under its nominal rate
        requested: list[str] = []

        def sent_kbps(self) -> float:
            return self.sent

        def request_keyframe(self, cause: str) -> None:
            self.requested.append(cause)

    class Track:
        def __init__(self) -> None:
            self.rung = 0
            self.consumer = MediaConsumer("v")
            self.consumer.variant = Variant()  # type: ignore[assignment]

        async def move_to(self, rung: int) -> None:
            self.rung = rung

    ladder = ladder_for(MediaConfig().variants, (704, 384))

    def viewer() -> tuple[Track, Sender, ViewerFeedback]:
        track, sender = Track(), Sender()
        tap = ViewerFeedback(track, sender, OutputGovernor(ladder), "v")  # type: ignore[arg-type]
        return track, sender, tap

    async def remb(sender: Sender, kbps: float) -> None:
        await sender._handle_rtcp_packet(RtcpPsfbPacket(
            fmt=RTCP_PSFB_APP, ssrc=9, media_ssrc=0, fci=pack_remb_fci(int(kbps * 1000), [1234])))

    async def report(sender: Sender, loss: float = 0.0) -> None:
        await sender._handle_rtcp_packet(RtcpRrPacket(ssrc=9, reports=[RtcpReceiverInfo(
            1234, round(loss * 256), 0, 0, 0, 0, 0)]))

    track, sender, feedback = viewer()
    await remb(sender, 460)  # 1.5x what it gets: nothing to say about the path
    assert feedback.estimate() is None
    for _ in range(3):
        await report(sender)
    assert track.rung == 0

    track, sender, feedback = viewer()
    await remb(sender, 120)  # well under half of the 300 kbit/s it is sent: a limit
    await remb(sender, 100)  # (the higher of the last 2 s counts)
    assert feedback.estimate() == pytest.approx(120 * 1500 / 300)  # in nominal units
    await report(sender)
    assert track.rung == 0  # one bad report is not enough
    await report(sender)
    assert track.rung == 2  # 600 nominal x 0.85 fits 352x192 at 350 kbit/s
    await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=9, media_ssrc=1234))
    assert Variant.requested == ["pli"] and feedback.keyframe_requests["pli"] == 1
