"""The bot WebSocket end to end against the real server with the preview engine: utterances,
time to first frame, interruption, every message of the spec, and viewers of a bot session."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np

from stream.ws.protocol import CLIENT_MESSAGES, SERVER_EVENTS, schema
from tests.stream.conftest import Running
from tests.stream.rtc_client import wait_for, whep
from tests.stream.ws_client import WsClient, loud_span, send_pcm, tone

FRAME_MS = 40
BLOCK_MS = 480
IDLE_MOUTH = 0.12  # the preview's closed mouth covers ~5% of its box, an open one 30-60%


async def test_utterance_round_trip_reports_first_frame_and_plays_all(running: Running) -> None:
    s = await running.create()
    client = await WsClient.connect(s)
    ready = await client.wait("session.ready")
    assert ready["session_id"] == s["session_id"] and ready["audio_in"]["sample_rate"] == 16000
    await client.send({"type": "session.update", "output": {"video": "jpeg", "audio": True}})
    await client.wait("session.updated")
    sent_at = time.monotonic()
    await send_pcm(client, tone(2.0))  # 2 s in 40 ms chunks, as fast as the socket takes it
    await client.send({"type": "utterance.end"})
    started = await client.wait("utterance.started", 10)
    seen_at = time.monotonic()
    ended = await client.wait("utterance.ended", 10)
    await asyncio.sleep(0.3)
    await client.close()

    session = running.manager.get(s["session_id"])
    delay_ms = session.clock.delay * 1000
    # the first audio enters at the present, so the frame that carries it shows one playout
    # delay later (that frame starts up to one frame before the audio's first sample)
    assert delay_ms - FRAME_MS - 5 <= started["t_first_frame_ms"] <= delay_ms + 60, started
    assert abs((seen_at - sent_at) * 1000 - started["t_first_frame_ms"]) < 150
    assert ended["utterance_id"] == started["utterance_id"] == "utt_1"
    assert ended["played_ms"] == 2000 and ended["interrupted"] is False
    assert ended["pts"] - started["pts"] == 2000
    # what a viewer of the socket heard: exactly the 2 s, where the events say
    first_pts, audio = client.rec.audio()
    lo, hi = loud_span(audio)
    assert abs((hi - lo) / 48 - 2000) <= 4, (lo, hi)
    assert abs(first_pts + lo / 48 - started["pts"]) <= 4
    # and saw: the mouth moves while the tone plays and is closed before and after
    mouths = client.rec.mouths()
    speaking = [m for pts, m in mouths if started["pts"] + 80 <= pts < ended["pts"] - 80]
    idle = [m for pts, m in mouths if pts < started["pts"] - 80 or pts > ended["pts"] + 80]
    assert speaking and min(speaking) > 0.2 and idle and max(idle) < IDLE_MOUTH


async def test_interrupt_reports_what_was_played_and_the_avatar_goes_idle(
        running: Running) -> None:
    s = await running.create()
    client = await WsClient.connect(s)
    await client.send({"type": "session.update",
                       "output": {"video": "jpeg", "audio": True, "fps": 25}})
    await client.wait("session.updated")
    await send_pcm(client, tone(8.0), chunk_bytes=3200)  # 8 s queued, far ahead of real time
    started = await client.wait("utterance.started", 10)
    await asyncio.sleep(1.3)
    await client.send({"type": "utterance.interrupt", "event_id": "stop-1"})
    cleared = await client.wait("input_audio.cleared", 3)
    ended = await client.wait("utterance.ended", 5)
    await asyncio.sleep(1.5)  # watch what follows the cut
    await client.close()

    assert cleared["client_event_id"] == "stop-1" and cleared["utterance_id"] == "utt_1"
    assert ended["interrupted"] is True and ended["played_ms"] == cleared["played_ms"]
    assert 1000 < cleared["played_ms"] < 4000, cleared
    assert abs(cleared["dropped_ms"] + cleared["played_ms"] - 8000) <= 2
    # the truth, from the audio the socket's viewer received
    first_pts, audio = client.rec.audio()
    lo, hi = loud_span(audio)
    truth_ms = (hi - lo) / 48
    assert abs(truth_ms - cleared["played_ms"]) <= FRAME_MS, (truth_ms, cleared)
    cut_pts = first_pts + hi / 48
    assert abs(cut_pts - cleared["pts"]) <= FRAME_MS
    assert abs(cleared["pts"] - started["pts"] - cleared["played_ms"]) <= 1  # ms rounding
    # no speech after the cut: the mouth is closed from one block after it to the end
    after = [(pts, m) for pts, m in client.rec.mouths() if pts >= cleared["pts"] + BLOCK_MS]
    assert len(after) > 20 and max(m for _, m in after) < IDLE_MOUTH, after[:5]
    before = [m for pts, m in client.rec.mouths() if started["pts"] + 80 <= pts
              < cleared["pts"] - 80]
    assert before and min(before) > 0.2


async def test_every_message_of_the_spec_is_exercised(running: Running) -> None:
    assert set(schema()["server"]) == set(SERVER_EVENTS)
    assert set(schema()["client"]) == set(CLIENT_MESSAGES)
    s = await running.create()
    session = running.manager.get(s["session_id"])
    client = await WsClient.connect(s)
    await client.wait("session.ready")
    await client.send({"type": "session.update", "event_id": "u1",
                       "audio_in": {"sample_rate": 24000, "channels": 2},
                       "output": {"video": "h264", "audio": False, "width": 128, "fps": 12.5},
                       "stats_interval_ms": 200})
    updated = await client.wait("session.updated", client_event_id="u1")
    assert updated["output"] == {"video": "h264", "audio": False, "width": 128, "height": 64,
                                 "fps": 12.5}
    tier = await client.wait("tier.changed")
    assert tier["reason"] == "client" and tier["previous"]["video"] == "none"
    before = session.last_activity
    await asyncio.sleep(0.05)
    await client.send({"type": "session.keepalive"})
    assert await wait_for(lambda: session.last_activity > before, 2)
    stereo = np.repeat(np.frombuffer(tone(2.5, 24000), "<i2"), 2).tobytes()
    await send_pcm(client, stereo, 4800)  # more than release_ahead_s: some of it queues
    await client.send({"type": "utterance.end"})
    await client.wait("utterance.started")
    await client.wait("utterance.ended", played_ms=2500)
    await client.send({"type": "utterance.interrupt"})  # nothing left: an idempotent ack
    cleared = await client.wait("input_audio.cleared")
    assert cleared["utterance_id"] is None and cleared["played_ms"] == 0
    await client.send({"type": "no.such.thing"})
    await client.wait("error", code="unknown_type")
    await client.wait("buffer.level")
    await asyncio.sleep(0.3)
    stats = client.rec.of("stats")[-1]
    assert stats["socket"]["video_frames"] > 0 and stats["utterances"] == 1
    assert stats["viewers"]["websocket"] == 1 and stats["released_ms"] == 2500
    await client.close()
    # the H.264 frames: a decoder plays them from the first (a keyframe), at 12.5 fps
    video = [m for m in client.rec.media if m.kind == 1]
    assert video[0].flags & 1 and all(b.pts_ms - a.pts_ms == 80 for a, b in
                                      zip(video, video[1:], strict=False))
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for m in video for f in decoder.decode(av.Packet(m.payload))]
    assert len(frames) >= len(video) - 1 and (frames[0].width, frames[0].height) == (128, 64)
    seen = {e["type"] for e in client.rec.events}
    assert seen == set(SERVER_EVENTS), set(SERVER_EVENTS) - seen


async def test_viewers_watch_and_hear_a_bot_session(running: Running) -> None:
    s = await running.create()
    client = await WsClient.connect(s)
    await client.wait("session.ready")
    viewer = await whep(running.http, s)
    assert await wait_for(lambda: len(viewer.recording.video) >= 10, 20)

    def read_ts() -> int:
        with av.open(s["urls"]["stream_ts"], "r", timeout=20) as c:
            frames = 0
            for packet in c.demux(video=0):
                frames += len(packet.decode())
                if frames >= 25:
                    return frames
        return frames

    ts_reader = asyncio.create_task(asyncio.to_thread(read_ts))
    await send_pcm(client, tone(3.0, 48000), 9600)
    await client.send({"type": "utterance.end"})
    await client.wait("utterance.ended", 15)
    assert await asyncio.wait_for(ts_reader, 30) >= 25
    await asyncio.sleep(0.3)
    rec = viewer.recording
    loud = np.concatenate([rms for _, _, rms in rec.audio])
    assert (loud > 0.1).sum() * 0.005 > 2.0  # the viewer heard the bot's ~3 s of tone
    assert max(m for _, _, m in rec.video) > 0.2  # and saw the mouth move
    session = running.manager.get(s["session_id"])
    assert session.describe()["viewers"] == {"caller": 0, "whep": 1, "mpegts": 0,
                                             "websocket": 1}
    await viewer.close()
    await client.close()
