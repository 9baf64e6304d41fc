"""Flow control: a minute of audio sent at 10x real time through a 5 s queue is played in full,
in order, bit for bit (48 kHz in, 48 kHz out), with the back-pressure of a full queue."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from aiohttp import ClientSession

from stream.config import SessionsConfig, WebSocketConfig
from tests.stream.conftest import make_config, start_server
from tests.stream.ws_client import WsClient

SECONDS = 60.0
SPEED = 10.0
RATE = 48000


def signal(seconds: float, seed: int = 7) -> np.ndarray:
    """Noise that is never zero, so the played span is exact to the sample."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    return (rng.integers(500, 8000, n) * rng.choice([-1, 1], n)).astype("<i2")


@pytest.mark.slow
async def test_a_minute_at_ten_times_real_time_is_played_in_full_and_in_order() -> None:
    cfg = make_config(websocket=WebSocketConfig(max_queued_audio_s=5.0),
                      sessions=SessionsConfig(default_size="128*64"))
    runner, base = await start_server(cfg)
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                s = await r.json()
            # while the server holds the socket back, a client's pings wait behind its audio:
            # a client that floods the socket turns them off (the SDK paces itself instead)
            # and a small send buffer, so the hold-back reaches the sender within seconds
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            raw.setblocking(False)
            port = int(base.rsplit(":", 1)[1])
            await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
            client = await WsClient.connect(s, ping_interval=None, sock=raw)
            await client.send({"type": "session.update", "audio_in": {"sample_rate": RATE},
                               "output": {"audio": True}, "stats_interval_ms": 0})
            await client.wait("session.updated")
            pcm = signal(SECONDS)
            rng = np.random.default_rng(1)
            start, sent = time.monotonic(), 0
            while sent < len(pcm):  # 20-100 ms chunks, paced at 10x real time
                n = int(rng.uniform(0.02, 0.1) * RATE)
                await client.send(pcm[sent:sent + n].tobytes())
                sent += n
                ahead = start + sent / RATE / SPEED - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            send_s = time.monotonic() - start
            await client.send({"type": "utterance.end"})
            started = await client.wait("utterance.started", 10)
            ended = await client.wait("utterance.ended", SECONDS + 15)
            await asyncio.sleep(0.2)
            await client.close()
    finally:
        await runner.cleanup()

    # back-pressure was hit, said so, and slowed the sender to the pace of playback
    full = client.rec.of("error")
    assert [e["code"] for e in full] == ["buffer_full"] and full[0]["retryable"] is True
    level = next(e for e in client.rec.events if e["type"] == "buffer.level"
                 and e["seq"] == full[0]["seq"] - 1)
    assert level["queued_ms"] > 4500 and level["max_queued_ms"] == 5000
    # not 6 s: the socket was held back (less the queue and what the socket buffers hold)
    assert send_s > SECONDS * 0.7, send_s
    assert max(e["queued_ms"] for e in client.rec.of("buffer.level")) <= 5000 + 100
    assert ended["played_ms"] == 60000 and ended["interrupted"] is False
    # every sample came back, once, in order: the played audio IS the input
    first_pts, audio = client.rec.audio()
    offset = started["pts"] * 48 - first_pts * 48
    lead = np.flatnonzero(audio[max(0, offset - 96):offset + 96])
    begin = max(0, offset - 96) + int(lead[0])
    played = audio[begin:begin + len(pcm)]
    assert len(played) == len(pcm)
    np.testing.assert_array_equal(played, pcm)
    assert not audio[begin + len(pcm):].any()  # and nothing after it
