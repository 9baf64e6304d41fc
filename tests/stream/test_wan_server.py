"""The server driving the real (Wan) engine path, on the tiny checkpoint on the CPU."""

from __future__ import annotations

from aiohttp import ClientSession, web

from engine.config import EngineConfig
from engine.wan_engine import WanEngine
from stream.app import STATE, build_app
from stream.config import SessionsConfig
from tests.stream.conftest import make_config
from tests.stream.rtc_client import bursts, call, wait_for, whep


async def test_a_call_through_the_wan_engine(tiny_models, tiny_ckpt_master) -> None:
    engine = WanEngine(tiny_models, EngineConfig(checkpoint=str(tiny_ckpt_master)))
    cfg = make_config(sessions=SessionsConfig(default_size="64*64"))
    runner = web.AppRunner(build_app(cfg, engine), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with ClientSession() as http:
            async with http.get(f"{base}/readyz") as r:
                ready = await r.json()
                assert ready["engine"] == "wan" and ready["preview"] is False
            async with http.post(f"{base}/v1/sessions", json={"seed": 5}) as r:
                s = await r.json()
                assert r.status == 201 and s["engine"]["name"] == "wan"
                assert s["video"] == {"width": 64, "height": 64, "fps": 25}
            caller = await call(http, s, bursts(10.0))
            viewer = await whep(http, s)
            assert await wait_for(lambda: len(viewer.recording.video) >= 50, 30)
            manager = runner.app[STATE]["server"].manager
            session = manager.get(s["session_id"])
            assert session.stats.blocks >= 4 and session.audio_in.samples_in > 0
            assert manager.runtime.stats.failed_sessions == 0
            await caller.close()
            await viewer.close()
    finally:
        await runner.cleanup()
