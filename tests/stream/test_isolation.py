"""Failure isolation: an exception inside one session's generation ends that session with a clear
error and leaves the others streaming; a stuck engine turns /readyz false (the watchdog)."""

from __future__ import annotations

import asyncio
import threading
import time

from aiohttp import ClientSession, web

from engine.api import FrameBlock, SessionParams
from engine.config import EngineConfig
from engine.preview import PreviewEngine, PreviewSession
from stream.app import STATE, build_app
from stream.config import SessionsConfig
from tests.stream.conftest import Running, make_config
from tests.stream.rtc_client import wait_for

POISON_SEED = 13  # a session opened with this seed fails at its third block


class FragileSession(PreviewSession):
    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        if self.seed == POISON_SEED and self.block == 2:
            raise RuntimeError("injected failure in block 2")
        return super().next_block(pad_silence)


class FragileEngine(PreviewEngine):
    """A preview engine whose poisoned sessions fail, and whose blocks can be made to hang."""

    def __init__(self) -> None:
        super().__init__(EngineConfig(max_sessions=4))
        self.hang = threading.Event()  # set: the next block waits until it is cleared

    def open_session(self, params: SessionParams) -> PreviewSession:
        session = FragileSession(params, None)
        session.seed = params.seed  # type: ignore[attr-defined]
        inner = session.next_block

        def block(pad_silence: bool = False) -> FrameBlock:
            while self.hang.is_set():
                time.sleep(0.02)
            return inner(pad_silence)

        session.next_block = block  # type: ignore[method-assign]
        return session


async def serve(engine: PreviewEngine, watchdog_s: float = 30.0) -> tuple[web.AppRunner, str]:
    cfg = make_config(sessions=SessionsConfig(default_size="256*128",
                                              engine_watchdog_s=watchdog_s))
    runner = web.AppRunner(build_app(cfg, engine), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_a_failing_session_ends_alone(caplog) -> None:  # noqa: ANN001
    runner, base = await serve(FragileEngine())
    manager = runner.app[STATE]["server"].manager
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={"seed": 0}) as r:
                healthy = manager.sessions[(await r.json())["session_id"]]
            async with http.post(f"{base}/v1/sessions", json={"seed": POISON_SEED}) as r:
                poisoned = manager.sessions[(await r.json())["session_id"]]
            assert await wait_for(lambda: poisoned.closed.is_set(), 10)
            assert "engine failure" in poisoned.close_reason
            assert "injected failure" in poisoned.close_reason
            blocks = healthy.stats.blocks
            await asyncio.sleep(1.5)  # the other session goes on making frames
            assert healthy.stats.blocks >= blocks + 2 and not healthy.closed.is_set()
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"]
            async with http.get(f"{base}/v1/sessions/{poisoned.id}", headers={
                    "Authorization": f"Bearer {poisoned.token}"}) as r:
                assert r.status == 404
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]


async def test_a_stuck_engine_turns_readyz_false() -> None:
    engine = FragileEngine()
    runner, base = await serve(engine, watchdog_s=1.0)
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 201
            await asyncio.sleep(0.7)
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            engine.hang.set()  # the engine thread now sits inside a block
            await asyncio.sleep(2.5)
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 503 and not body["ready"] and body["status"] == "stuck"
                assert "no block done" in body["error"] and "engine_watchdog_s" in body["error"]
                assert body["capacity"] == 0
            engine.hang.clear()
            await asyncio.sleep(1.0)
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"]
    finally:
        engine.hang.clear()
        await runner.cleanup()


async def test_an_encoder_that_keeps_failing_ends_its_session_alone(running: Running) -> None:
    """One session's video encoder breaks: that session ends with the reason (its bot socket
    closes with 1011) while another session's socket keeps receiving frames."""
    from stream.media.variant import VideoVariant
    from tests.stream.ws_client import WsClient

    a, b = await running.create(), await running.create()
    broken, healthy = await WsClient.connect(a), await WsClient.connect(b)
    try:
        for client in (broken, healthy):
            await client.send({"type": "session.update", "event_id": "u",
                               "output": {"video": "h264"}})
            await client.wait("session.updated")
        session = running.manager.sessions[a["session_id"]]
        assert await wait_for(lambda: bool(session.media.variants), 5)
        variant: VideoVariant = next(iter(session.media.variants.values()))

        def explode(*args: object) -> None:
            raise RuntimeError("the encoder broke")

        variant._encode = explode  # type: ignore[method-assign]
        await broken.closed(within=15)
        assert broken.rec.close_code == 1011 and "encoder failure" in broken.rec.close_reason
        assert session.closed.is_set() and "the encoder broke" in session.close_reason
        seen = len(healthy.rec.media)
        await asyncio.sleep(1.0)
        assert len(healthy.rec.media) >= seen + 15  # the other session streams on
        assert not running.manager.sessions[b["session_id"]].closed.is_set()
    finally:
        await broken.close()
        await healthy.close()
