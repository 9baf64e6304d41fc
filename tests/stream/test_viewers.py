"""Viewers of one session: the caller, WHEP players and MPEG-TS readers, joining and leaving."""

from __future__ import annotations

import asyncio

import av
import numpy as np
from aiortc import RTCSessionDescription

from stream.app import STATE
from tests.stream.conftest import Running
from tests.stream.rtc_client import Client, bursts, call, wait_for, whep


def live_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task()}


async def test_whep_viewer_receives_video_and_audio_and_delete_ends_it(running: Running) -> None:
    s = await running.create()
    caller = await call(running.http, s)
    viewer = await whep(running.http, s)
    assert await wait_for(lambda: len(viewer.recording.video) >= 50
                          and len(viewer.recording.audio) >= 50, 20)
    assert viewer.recording.video_size == (256, 128)
    session = running.manager.get(s["session_id"])
    assert {p.kind for p in session.peers.values()} == {"caller", "whep"}
    whep_peer = next(p for p in session.peers.values() if p.kind == "whep")
    assert whep_peer.codec == "H264"
    async with running.http.delete(f"{running.base}{viewer.location}",
                                   headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 204
    assert {p.kind for p in session.peers.values()} == {"caller"}
    assert whep_peer.video.readyState == "ended" and whep_peer.pc.connectionState == "closed"
    async with running.http.delete(f"{running.base}{viewer.location}",
                                   headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 404
    await viewer.close()
    await caller.close()


async def test_mpegts_stream_is_readable_by_pyav(running: Running) -> None:
    s = await running.create()
    caller = await call(running.http, s)

    def read_frames() -> tuple[int, int, str, str]:
        with av.open(s["urls"]["stream_ts"], "r", timeout=20) as c:
            names = (c.streams.video[0].codec_context.name, c.streams.audio[0].codec_context.name)
            frames = 0
            for packet in c.demux(video=0):
                for _ in packet.decode():
                    frames += 1
                if frames >= 50:
                    break
            return frames, c.streams.video[0].width, *names

    frames, width, vcodec, acodec = await asyncio.wait_for(asyncio.to_thread(read_frames), 60)
    assert frames >= 50 and width == 256 and (vcodec, acodec) == ("h264", "aac")
    session = running.manager.get(s["session_id"])
    assert await wait_for(lambda: not session.ts_readers, 10)  # the reader left: cleaned up
    await caller.close()


async def test_more_viewers_do_not_disturb_the_first(running: Running) -> None:
    s = await running.create()
    first = await call(running.http, s, bursts(20.0))
    assert await wait_for(lambda: len(first.recording.video) >= 25, 20)
    base = len(first.recording.video)
    others = [await whep(running.http, s), await whep(running.http, s)]
    await asyncio.sleep(4.0)
    assert all(len(o.recording.video) >= 50 for o in others)
    arrivals = np.array([v[1] for v in first.recording.video[base:]])
    gaps = np.diff(arrivals)
    # the first viewer kept its frame rate and never stalled while the others joined
    assert len(arrivals) >= 90 and gaps.max() < 0.25, (len(arrivals), gaps.max())
    pts = np.array([v[0] for v in first.recording.video[base:]])
    assert (np.diff(pts) == 3600).mean() > 0.97  # consecutive frames, no skips
    for client in (*others, first):
        await client.close()


async def test_disconnect_leaves_no_task_peer_or_track(running: Running) -> None:
    s = await running.create()
    session = running.manager.get(s["session_id"])
    before = live_tasks()
    client = await call(running.http, s)
    assert await wait_for(lambda: len(client.recording.video) >= 25, 20)
    peer = next(iter(session.peers.values()))
    assert any(t.get_name().startswith("mic-") for t in live_tasks())
    await client.close()  # the far end goes away mid-stream
    assert await wait_for(lambda: not session.peers, 15)
    assert peer.pc.connectionState == "closed"
    assert peer.video.readyState == "ended" and peer.audio.readyState == "ended"
    assert all(t.readyState == "ended" for t in peer.remote_tracks)
    assert not peer.tasks
    assert await wait_for(lambda: not (live_tasks() - before), 10), live_tasks() - before
    assert s["session_id"] in running.manager.sessions  # the session itself lives on


async def test_deleting_a_session_tears_down_all_its_viewers(running: Running) -> None:
    s = await running.create()
    before = live_tasks()
    clients = [await call(running.http, s), await whep(running.http, s)]
    session = running.manager.get(s["session_id"])
    assert await wait_for(lambda: all(len(c.recording.video) > 10 for c in clients), 20)
    peers = list(session.peers.values())
    async with running.http.delete(s["urls"]["session"],
                                   headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 204
    assert all(p.pc.connectionState == "closed" for p in peers)
    for c in clients:
        await c.close()
    assert await wait_for(lambda: not (live_tasks() - before), 10), live_tasks() - before
    assert await wait_for(lambda: running.manager.runtime.active == 0, 5)  # engine side too


async def test_vp8_fallback_for_a_viewer_without_h264(running: Running) -> None:
    from aiortc import RTCRtpSender

    s = await running.create()
    client = Client()
    video = client.pc.addTransceiver("video", direction="recvonly")
    video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                               if c.mimeType == "video/VP8"])
    client.pc.addTransceiver("audio", direction="recvonly")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with running.http.post(s["urls"]["whep"], data=client.pc.localDescription.sdp,
                                 headers={"Authorization": f"Bearer {s['token']}",
                                          "Content-Type": "application/sdp"}) as r:
        answer = await r.text()
        assert r.status == 201
    await client.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    assert await wait_for(lambda: len(client.recording.video) >= 25, 20)
    peer = next(iter(running.manager.get(s["session_id"]).peers.values()))
    assert peer.codec == "VP8"
    await client.close()


async def test_maximum_length_ends_the_session() -> None:
    from aiohttp import ClientSession

    from stream.config import SessionsConfig
    from tests.stream.conftest import make_config, start_server

    runner, base = await start_server(make_config(
        sessions=SessionsConfig(max_length_s=1.0, default_size="128*64")))
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                s = await r.json()
            client = await call(http, s)
            manager = runner.app[STATE]["server"].manager
            session = manager.get(s["session_id"])
            # `closed` is set when the teardown starts; the session is forgotten at its end
            assert await wait_for(lambda: session.id not in manager.sessions, 10)
            assert session.close_reason == "maximum length reached" and not session.peers
            await client.close()
    finally:
        await runner.cleanup()


async def test_every_kind_of_viewer_shares_one_pacer_and_one_encoder(running: Running) -> None:
    """A WHEP player, a stream.ts reader and a bot's socket asking for H.264 at full size: one
    pacer, one H.264 encoder, each audio encoded once."""
    from tests.stream.ws_client import WsClient

    s = await running.create()
    session = running.manager.get(s["session_id"])
    viewer = await whep(running.http, s)
    got = [0]

    async def read_ts() -> None:
        async with running.http.get(s["urls"]["stream_ts"]) as r:
            async for chunk in r.content.iter_any():
                got[0] += len(chunk)

    reader = asyncio.create_task(read_ts())
    bot = await WsClient.connect(s)
    await bot.send({"type": "session.update", "output": {"video": "h264", "audio": True}})
    try:
        assert await wait_for(lambda: len(viewer.recording.video) >= 25 and got[0] > 0
                              and len(bot.rec.media) > 25, 20)
        pacers = [t for t in asyncio.all_tasks() if t.get_name() == f"pacer-{session.id}"]
        assert len(pacers) == 1
        (variant,) = session.media.variants.values()
        assert variant.key == session.media.rung("h264", 0)
        assert {c.kind for c in variant.consumers} == {"webrtc", "mpegts", "websocket"}
        assert sorted(session.media.audio) == ["aac", "opus"]
        encoded = variant.encoded
        await asyncio.sleep(1.0)
        assert 20 <= variant.encoded - encoded <= 30  # 25 a second for all three of them
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await bot.close()
        await viewer.close()
