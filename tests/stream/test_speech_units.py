"""Units under the bot WebSocket: the playout ring's overwrite guard, the audio queue, exact
audio positions through the resamplers, the protocol's parsing and framing."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from engine.api import AudioChunk
from stream.media.audio_in import AudioInput
from stream.media.audio_queue import AudioQueue, PcmChunk
from stream.media.fanout import MediaPacket
from stream.media.timeline import MediaClock, PlayoutAudio, PlayoutOverflow
from stream.ws.handler import RateLimiter
from stream.ws.protocol import (
    SERVER_EVENTS,
    AudioFormat,
    EventStamper,
    ProtocolError,
    check_pcm,
    error_event,
    pack_media,
    parse_client,
    schema,
    server_problem,
    unpack_media,
)


def test_playout_refuses_to_overwrite_what_has_not_been_played() -> None:
    clock = MediaClock(time.monotonic(), delay=0.5)  # nothing played yet
    ring = PlayoutAudio(seconds=2.0, clock=clock, keep_played_s=0.0)
    ring.write(0, np.ones(48000, np.int16))  # 1 s: fits
    ring.write(48000, np.ones(48000, np.int16))  # 2 s: the ring is full, nothing lost
    with pytest.raises(PlayoutOverflow, match="not yet played"):
        ring.write(96000, np.ones(10, np.int16))
    assert ring.read(0, 5).tolist() == [1] * 5  # the unplayed audio is intact
    clock.t0 -= 1.6  # 1.1 s of media has been presented: its slots are free again
    ring.write(96000, np.ones(48000, np.int16))
    ring.silence(96000 + 100, 96000 + 200)
    assert ring.read(96000 + 90, 120).tolist() == [1] * 10 + [0] * 100 + [1] * 10


def test_audio_queue_is_bounded_in_seconds_and_never_overwritten() -> None:
    queue = AudioQueue(capacity_s=1.0)
    assert queue.has_room(5.0)  # an empty queue takes any one message
    queue.put(PcmChunk("a", np.ones(16000, np.int16), 16000, 1))
    assert not queue.has_room(0.01) and queue.seconds == pytest.approx(1.0)
    piece = queue.pop(4000)
    assert piece.frames == 4000 and queue.seconds == pytest.approx(0.75)
    assert queue.has_room(0.25) and not queue.has_room(0.3)
    stereo = PcmChunk("b", np.ones(960, np.int16), 48000, 2)  # 480 frames = 10 ms
    assert stereo.frames == 480 and stereo.seconds == pytest.approx(0.01)
    dropped = queue.clear()
    assert [c.owner for c in dropped] == ["a"] and queue.seconds == 0 and len(queue) == 0


async def test_a_waiting_producer_gets_in_once_there_is_room() -> None:
    queue = AudioQueue(capacity_s=0.5)
    queue.put(PcmChunk("a", np.ones(8000, np.int16), 16000, 1))
    waiter = asyncio.create_task(queue.wait_for_room(0.25))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    queue.pop(4000)
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_audio_positions_are_exact_whatever_the_resampler_holds_back(rate: int) -> None:
    clock = MediaClock(time.monotonic() - 10.0, 0.5)
    engine: list[AudioChunk] = []
    ring = PlayoutAudio(seconds=20.0)
    audio_in = AudioInput(clock, engine.append, ring)
    audio_in.continue_at_present()
    start = audio_in.playout_end
    t = np.arange(rate) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    for i in range(0, rate, rate // 25):  # 1 s in 40 ms pieces
        audio_in.push_pcm(pcm[i:i + rate // 25].tobytes(), rate)
    assert audio_in.playout_end - start == 48000  # known before the tail is out
    audio_in.flush()
    assert audio_in.playout_end - start == 48000
    # the tone fills exactly [start, start + 48000) of the ring: its tail too, nothing beyond
    played = np.flatnonzero(ring.read(start - 480, 48000 + 960)) - 480
    assert 0 <= played[0] < 8 and 48000 - 8 <= played[-1] < 48000, (played[0], played[-1])
    assert sum(len(c.samples) for c in engine) == 16000
    assert engine[0].start * 3 == start


def test_48k_input_reaches_the_playout_bit_for_bit() -> None:
    clock = MediaClock(time.monotonic() - 5.0, 0.5)
    ring = PlayoutAudio(seconds=10.0)
    audio_in = AudioInput(clock, lambda c: None, ring)
    audio_in.continue_at_present()
    start = audio_in.playout_end
    pcm = np.random.default_rng(0).integers(-32768, 32767, 4800).astype("<i2")
    audio_in.push_pcm(pcm.tobytes(), 48000)
    audio_in.flush()
    np.testing.assert_array_equal(ring.read(start, 4800), pcm)


def test_client_messages_are_validated_with_errors_that_teach() -> None:
    ok = parse_client(json.dumps({"type": "session.update", "event_id": "e1",
                                  "audio_in": {"sample_rate": 24000}}))
    assert ok.type == "session.update" and ok.event_id == "e1"
    cases = [
        ("{", "invalid_json", "valid JSON"),
        ('"hello"', "invalid_json", "JSON str"),
        ('{"type": 3}', "unknown_type", "accepted: session.update"),
        ('{"type": "utterance.end", "extra": 1}', "invalid_message", "accepted fields"),
        ('{"type": "session.update", "audio_in": {"sample_rate": 22050}}', "invalid_message",
         "audio_in.sample_rate=22050 is not accepted; accepted: 8000, 16000, 24000, 48000"),
        ('{"type": "session.update", "audio_in": {"channels": 6}}', "invalid_message",
         "audio_in.channels=6"),
        ('{"type": "session.update", "output": {"video": "vp9"}}', "invalid_message",
         '"h264", "jpeg"'),
        ('{"type": "session.update", "stats_interval_ms": -5}', "invalid_message",
         "stats_interval_ms"),
        ("[" * 100000 + "]" * 100000, "invalid_json", "valid JSON"),
    ]
    for text, code, needle in cases:
        with pytest.raises(ProtocolError) as err:
            parse_client(text)
        assert err.value.code == code and needle in err.value.message, (text, err.value)
    with pytest.raises(ProtocolError, match="multiple of 4 bytes"):
        check_pcm(b"\0" * 6, AudioFormat(48000, 2))
    check_pcm(b"\0" * 8, AudioFormat(48000, 2))


def test_every_server_event_has_a_schema_and_stamps_validate() -> None:
    assert set(schema()["server"]) == set(SERVER_EVENTS)
    stamper = EventStamper()
    event = stamper.stamp("error", 12, error_event("buffer_full", "full"))
    assert server_problem(event) is None and event["seq"] == 1 and event["retryable"] is True
    assert stamper.stamp("stats", 0, {})["seq"] == 2
    assert "queued_ms" in (server_problem(stamper.stamp("buffer.level", 0, {})) or "")
    with pytest.raises(ValueError):
        stamper.stamp("not.an.event", 0, {})


def test_media_header_round_trip() -> None:
    packet = MediaPacket("video", 123_456_789_000, 40, b"\x00\x00\x00\x01\x67", "h264",
                         keyframe=True, discontinuity=True)
    data = pack_media(packet)
    assert len(data) == 16 + 5
    assert unpack_media(data) == (1, 3, 40, 123_456_789_000, b"\x00\x00\x00\x01\x67")
    audio = pack_media(MediaPacket("audio", 80, 40, b"\x01\x00" * 1920))
    kind, flags, duration, pts, payload = unpack_media(audio)
    assert (kind, flags, duration, pts, len(payload)) == (3, 1, 40, 80, 3840)


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(100)
    waits = [limiter.take() for _ in range(150)]
    assert all(w == 0 for w in waits[:99]) and waits[-1] == pytest.approx(0.5, abs=0.05)
