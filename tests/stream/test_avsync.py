"""A/V sync end to end: the preview's mouth (decoded video) vs the loudness of the decoded avatar
audio, both on the sender's clock from RTCP sender reports, like a browser's lip sync."""

from __future__ import annotations

import asyncio

import pytest

from tests.stream.avsync import av_offset, signals
from tests.stream.conftest import Running
from tests.stream.rtc_client import bursts, call, wait_for

FRAME = 0.040


@pytest.mark.slow
async def test_lips_match_sound_at_the_start_and_after_five_minutes(running: Running) -> None:
    s = await running.create()
    client = await call(running.http, s, bursts(60.0, seed=3))
    try:
        assert await wait_for(lambda: len(client.recording.video) > 25 * 20, 40)
        start = av_offset(client, 2.0, 18.0)
        await asyncio.sleep(5 * 60 - 15)
        vt, _, _, _ = signals(client)
        duration = float(vt.max() - vt.min())
        assert duration >= 5 * 60, duration
        end = av_offset(client, duration - 16.0, duration - 1.0)
        session = running.manager.get(s["session_id"])
        assert session.audio_in.resyncs == 0  # the input stayed on the clock by itself
    finally:
        await client.close()
    assert abs(start) <= FRAME, f"A/V offset at the start: {start * 1000:.0f} ms"
    assert abs(end) <= FRAME, f"A/V offset after {duration:.0f} s: {end * 1000:.0f} ms"


async def test_offset_detector_sees_a_deliberate_shift(running: Running, monkeypatch) -> None:
    """The measurement itself: delay the played audio by 120 ms and it must report it."""
    from stream.media import timeline

    original = timeline.PlayoutAudio.read

    def late(self, start, count):  # noqa: ANN001, ANN202
        return original(self, start - int(0.120 * 48000), count)

    monkeypatch.setattr(timeline.PlayoutAudio, "read", late)
    s = await running.create()
    client = await call(running.http, s, bursts(20.0, seed=4))
    try:
        assert await wait_for(lambda: len(client.recording.video) > 25 * 12, 30)
        shift = av_offset(client, 2.0, 11.0)
    finally:
        await client.close()
    assert abs(shift + 0.120) <= 0.015, shift
