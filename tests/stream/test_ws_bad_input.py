"""Bad input on the bot WebSocket: each case gets an error event or a close with a code and a
reason, and the server and another session (the witness, watched over its own socket) keep
working throughout."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest
import websockets
from aiohttp import ClientSession

from stream.app import STATE
from stream.config import SessionsConfig, WebSocketConfig
from stream.ws.protocol import KIND_JPEG
from tests.stream.conftest import Running, make_config, start_server
from tests.stream.rtc_client import call, wait_for
from tests.stream.ws_client import WsClient, tone


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    cfg = make_config(websocket=WebSocketConfig(send_timeout_s=1.0, max_messages_per_s=200),
                      sessions=SessionsConfig(default_size="128*64"))
    runner, base = await start_server(cfg)
    async with ClientSession() as http:
        yield Running(runner.app, base, http)
    await runner.cleanup()


class Witness:
    """Another session whose JPEG frames must keep coming at 25 fps whatever happens."""

    def __init__(self, client: WsClient):
        self.client = client
        self.mark = 0

    @classmethod
    async def start(cls, running: Running) -> Witness:
        client = await WsClient.connect(await running.create())
        await client.send({"type": "session.update", "output": {"video": "jpeg"}})
        witness = cls(client)
        assert await wait_for(lambda: len(witness.frames()) > 10, 10)
        return witness

    def frames(self) -> list[tuple[int, float]]:
        return [(m.pts_ms, 0.0) for m in self.client.rec.media if m.kind == KIND_JPEG]

    def since_mark(self) -> int:
        count = len(self.frames()) - self.mark
        self.mark = len(self.frames())
        return count

    async def still_live(self, seconds: float = 1.0) -> None:
        before = len(self.frames())
        await asyncio.sleep(seconds)
        got = len(self.frames()) - before
        assert got >= 25 * seconds * 0.8, f"the witness got {got} frames in {seconds} s"


async def open_client(running: Running) -> tuple[dict, WsClient]:
    s = await running.create()
    client = await WsClient.connect(s)
    await client.wait("session.ready")
    return s, client


async def test_bad_messages_get_error_events_and_the_socket_goes_on(server: Running) -> None:
    witness = await Witness.start(server)
    s, client = await open_client(server)
    cases = [
        ("this is not json", "invalid_json", "valid JSON"),
        ("[1, 2, 3]", "invalid_json", "not a JSON list"),
        (json.dumps({"type": "speak.now"}), "unknown_type", "session.update"),
        (json.dumps({"type": "session.update", "audio_in": {"sample_rate": "16000"}}),
         "invalid_message", "audio_in.sample_rate"),
        (json.dumps({"type": "session.update", "audio_in": {"sample_rate": 44100}}),
         "invalid_message", "8000, 16000, 24000, 48000"),
        (json.dumps({"type": "session.update", "output": {"fps": "fast"}}),
         "invalid_message", "output.fps"),
        (json.dumps({"type": "session.update", "output": {"width": 4000}}),
         "invalid_message", "larger than the session's video"),
        (json.dumps({"type": "utterance.end", "text": "hi"}), "invalid_message", "text"),
        (json.dumps({"type": "session.keepalive", "event_id": 7}), "invalid_message",
         "event_id"),
    ]
    for text, code, needle in cases:
        after = len(client.rec.events)
        await client.ws.send(text)
        err = await client.wait("error", 5, after=after)
        assert err["code"] == code and needle in err["message"], (text, err)
        assert err["retryable"] is False
    after = len(client.rec.events)
    await client.send(b"\x01\x02\x03")  # 3 bytes: no whole 16-bit sample
    err = await client.wait("error", 5, after=after)
    assert err["code"] == "invalid_audio_frame" and "multiple of 2 bytes" in err["message"]
    await client.send({"type": "session.update", "audio_in": {"channels": 2}})
    await client.wait("session.updated")
    after = len(client.rec.events)
    await client.send(b"\x00" * 6)  # 3 samples: not whole stereo frames
    err = await client.wait("error", 5, after=after)
    assert err["code"] == "invalid_audio_frame" and "multiple of 4 bytes" in err["message"]
    # still working: valid audio is played
    await client.send({"type": "session.update", "event_id": "ok",
                       "audio_in": {"channels": 1}})
    await client.wait("session.updated", client_event_id="ok")
    await client.send(tone(0.5))
    await client.send({"type": "utterance.end"})
    await client.wait("utterance.ended", 10, played_ms=500)
    await witness.still_live()
    await client.close()
    async with server.http.get(f"{server.base}/metrics") as r:
        text = await r.text()
    assert 'avatar_ws_errors_total{code="invalid_json"} 2' in text
    assert 'avatar_ws_messages_total{type="audio"}' in text
    await witness.client.close()


async def test_a_huge_message_closes_with_1009_and_a_reason(server: Running) -> None:
    witness = await Witness.start(server)
    s, client = await open_client(server)
    with pytest.raises(websockets.ConnectionClosed):
        await client.send(b"\x00" * 10_000_000)
        await asyncio.sleep(5)
        await client.send(b"\x00\x00")
    await client.closed(5)
    assert client.rec.close_code == 1009
    assert "max_message_bytes (1048576 bytes)" in client.rec.close_reason
    await witness.still_live()
    session = server.manager.get(s["session_id"])
    assert await wait_for(lambda: not session.sockets, 5)
    # the session itself is fine: a new socket works
    again = await WsClient.connect(s)
    await again.wait("session.ready")
    await again.close()
    await witness.client.close()


async def test_a_flood_of_tiny_frames_is_slowed_down_not_served_at_any_cost(
        server: Running) -> None:
    witness = await Witness.start(server)
    s, client = await open_client(server)
    start = time.monotonic()
    for _ in range(600):  # 600 one-sample frames at once; the limit is 200 a second
        await client.send(b"\x10\x00")
    await client.send({"type": "session.keepalive"})
    err = await client.wait("error", 10)
    assert err["code"] == "rate_limited" and err["retryable"] is True
    assert "max_messages_per_s" in err["message"]
    witness.since_mark()
    session = server.manager.get(s["session_id"])
    assert await wait_for(lambda: session.speech.utterance_total == 1
                          and session.speech.queue.seconds == 0
                          and session.speech.released_s >= 600 / 16000 - 1e-9, 10)
    elapsed = time.monotonic() - start
    assert elapsed > 1.5  # read at ~200 messages a second after a burst of 200
    assert witness.since_mark() >= 25 * elapsed * 0.6, "the witness stalled during the flood"
    await client.close()
    await witness.client.close()


async def test_a_client_that_never_reads_is_closed_not_buffered_forever(
        server: Running) -> None:
    witness = await Witness.start(server)
    s = await server.create()
    port = int(server.base.rsplit(":", 1)[1])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
    url = f"{s['urls']['ws']}?token={s['token']}"
    lazy = await websockets.connect(url, sock=raw, max_queue=1, max_size=None)
    await lazy.send(json.dumps({"type": "session.update",
                                "output": {"video": "jpeg", "audio": True}}))
    session = server.manager.get(s["session_id"])
    assert session.sockets
    # it reads nothing: within the send timeout (1 s) plus the close grace, the server gives up
    assert await wait_for(lambda: not session.sockets, 15)
    async with server.http.get(f"{server.base}/metrics") as r:
        assert 'avatar_ws_errors_total{code="not_reading"} 1' in await r.text()
    await witness.still_live()
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:  # what it finds when it finally reads: the media, then the end
            await asyncio.wait_for(lazy.recv(), 5)
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1008
    await lazy.close()
    assert session.id in server.manager.sessions  # the session lives on
    await witness.client.close()


async def test_auth_and_a_busy_audio_source_are_refused_before_the_upgrade(
        server: Running) -> None:
    s = await server.create()
    url = s["urls"]["ws"]
    for suffix, status in (("", 401), ("?token=forged.token", 401),
                           (f"?token={s['viewer_token']}", 403)):
        with pytest.raises(websockets.InvalidStatus) as err:
            await websockets.connect(url + suffix)
        assert err.value.response.status_code == status
    ok = await websockets.connect(url, additional_headers={
        "Authorization": f"Bearer {s['token']}"})
    assert json.loads(await ok.recv())["type"] == "session.ready"
    await ok.close()
    caller_session = await server.create()
    caller = await call(server.http, caller_session)
    with pytest.raises(websockets.InvalidStatus) as err:
        await websockets.connect(f"{caller_session['urls']['ws']}?token="
                                 f"{caller_session['token']}")
    assert err.value.response.status_code == 409
    assert b"audio_source_busy" in err.value.response.body
    await caller.close()


async def test_a_newer_socket_takes_over_and_the_session_end_closes_it(server: Running) -> None:
    s, first = await open_client(server)
    second = await WsClient.connect(s)
    await second.wait("session.ready")
    await first.closed(5)
    assert first.rec.close_code == 4001 and "newer connection" in first.rec.close_reason
    async with server.http.delete(s["urls"]["session"],
                                  headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 204
    await second.closed(5)
    assert second.rec.close_code == 1001 and "session ended" in second.rec.close_reason
    assert server.app[STATE]["server"].manager.sessions.get(s["session_id"]) is None
