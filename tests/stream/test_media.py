"""Media plumbing units: audio input resampling and stamping, the frame and playout stores."""

from __future__ import annotations

import re
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from engine.api import AudioChunk, FrameBlock
from stream.errors import ApiError
from stream.media.audio_in import AudioInput
from stream.media.timeline import FrameStore, MediaClock, PlayoutAudio
from stream.webrtc import check_offer_sdp, negotiated_video_codec


def frame(samples: np.ndarray, rate: int, layout: str) -> av.AudioFrame:
    f = av.AudioFrame.from_ndarray(samples, format="s16p" if samples.ndim == 2 and
                                   samples.shape[0] > 1 else "s16", layout=layout)
    f.sample_rate = rate
    f.time_base = Fraction(1, rate)
    return f


@pytest.mark.parametrize("rate, layout", [(48000, "stereo"), (44100, "mono"), (8000, "mono"),
                                          (24000, "stereo")])
def test_any_rate_and_layout_becomes_16k_mono(rate: int, layout: str) -> None:
    chunks: list[AudioChunk] = []
    playout = PlayoutAudio(seconds=5)
    audio_in = AudioInput(MediaClock.start(0.5), chunks.append, playout)  # a 1 s burst
    channels = 2 if layout == "stereo" else 1
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    data = np.repeat(tone[None], channels, axis=0) if channels > 1 else tone[None]
    for i in range(0, rate, rate // 50):
        audio_in.push_frame(frame(np.ascontiguousarray(data[:, i:i + rate // 50]), rate, layout))
    got = np.concatenate([c.samples for c in chunks])
    assert abs(len(got) - 16000) < 200 and got.dtype == np.float32
    starts = [c.start for c in chunks]
    assert all(b - a == len(c.samples) for a, b, c in zip(starts, starts[1:], chunks, strict=False))
    assert 0.3 < np.abs(got[2000:14000]).max() <= 0.51


def test_first_audio_is_stamped_at_its_arrival_then_contiguous() -> None:
    clock = MediaClock(time.monotonic() - 2.0, 0.5)  # the session started 2 s ago
    chunks: list[AudioChunk] = []
    audio_in = AudioInput(clock, chunks.append, PlayoutAudio(seconds=5))
    pcm = np.zeros(1600, "<i2").tobytes()
    audio_in.push_pcm(pcm, 16000)
    assert abs(chunks[0].start - 32000) < 800
    for _ in range(20):  # a 2 s burst (after a stall): kept contiguous, nothing dropped
        audio_in.push_pcm(pcm, 16000)
    starts = [c.start for c in chunks]
    assert audio_in.resyncs == 0
    assert all(b - a == len(c.samples) for a, b, c in zip(starts, starts[1:], chunks, strict=False))


def test_a_source_that_falls_behind_is_reanchored() -> None:
    clock = MediaClock(time.monotonic(), 0.5)
    chunks: list[AudioChunk] = []
    audio_in = AudioInput(clock, chunks.append, PlayoutAudio(seconds=5))
    pcm = np.zeros(160, "<i2").tobytes()
    audio_in.push_pcm(pcm, 16000)
    clock.t0 -= 1.0  # a 1 s pause: the next chunk belongs to the present, after a silent gap
    audio_in.push_pcm(pcm, 16000)
    assert audio_in.resyncs == 1 and chunks[-1].start - chunks[0].start > 15000


def test_frame_store_keeps_the_newest_frames() -> None:
    store = FrameStore(capacity=20)
    for b in range(4):
        store.put(FrameBlock(b, 12 * b, np.full((12, 4, 8, 3), b, np.uint8)))
    assert store.get(47) is not None and store.get(27) is None and len(store) == 20
    assert store.at_or_before(1000)[0] == 47
    assert store.size == (8, 4)


def test_playout_audio_reads_silence_where_nothing_was_written() -> None:
    p = PlayoutAudio(seconds=1)
    p.write(100, np.full(50, 7, np.int16))
    np.testing.assert_array_equal(p.read(90, 70), [0] * 10 + [7] * 50 + [0] * 10)
    p.write(200_000, np.full(10, 3, np.int16))  # far ahead: the old samples expire
    assert p.read(100, 50).sum() == 0 and p.read(200_000, 10).sum() == 30


def test_sdp_checks() -> None:
    with pytest.raises(Exception, match="v=0"):
        check_offer_sdp("hello")
    offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    for good in ("1 1 udp 2130706431 127.0.0.1 50000 typ host",
                 "2 1 UDP 1694498815 2001:db8::1 3478 typ srflx raddr :: rport 0",
                 "3 1 udp 2113937151 8a0f4a2e-1c5e-4f2f-9d6e-0123456789ab.local 54400 typ host",
                 "4 1 tcp 1518280447 192.168.1.2 9 typ host tcptype active"):
        check_offer_sdp(f"{offer}a=candidate:{good}\r\n")
    # what aioice would only find out inside sendto (asyncio: a fatal transport error)
    for bad, why in (("1 1 udp 1 127.0.0.1 70000 typ host", "port 70000 is out of 0..65535"),
                     ("1 1 udp 1 no..such...name 5000 typ host", "neither an IP address"),
                     ("1 1 udp 1 127.0.0.1 5000 typ nat", "candidate type 'nat'"),
                     ("1 1 sctp 1 127.0.0.1 5000 typ host", "not udp or tcp"),
                     ("1 1 udp 127.0.0.1 5000 typ host", "needs 'foundation")):
        with pytest.raises(ApiError, match=re.escape(why)):
            check_offer_sdp(f"{offer}a=candidate:{bad}\r\n")
    answer = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
              "m=video 9 UDP/TLS/RTP/SAVPF 102 96\r\na=rtpmap:96 VP8/90000\r\n"
              "a=rtpmap:102 H264/90000\r\n")
    assert negotiated_video_codec(answer) == "H264"
