"""The server on a pipeline of ranks (`[engine] layout = "4+vae"`, the tiny checkpoint, 5 rank
processes on the CPU): the browser call in real headless Chromium end to end; then a rank is
killed mid-stream: the session ends with the rank's error, /readyz says not ready while the
group restarts, the server stays up, and /readyz is ready again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from aiohttp import ClientSession, web

from stream.app import STATE, build_app
from stream.config import SessionsConfig
from tests.engine.parallel.conftest import tiny_config
from tests.stream.conftest import make_config
from tests.stream.rtc_client import wait_for
from tests.stream.test_browser import CHROMIUM, chromium_args  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser


async def readyz(http: ClientSession, base: str) -> tuple[int, dict]:
    async with http.get(f"{base}/readyz") as r:
        return r.status, await r.json()


async def test_a_browser_call_through_a_4_plus_vae_pipeline(tiny_ckpt_master,
                                                            chromium_args) -> None:  # noqa: ANN001, F811
    from playwright.async_api import async_playwright

    cfg = make_config(sessions=SessionsConfig(default_size="64*64"),
                      engine=tiny_config(tiny_ckpt_master, layout="4+vae"))
    runner = web.AppRunner(build_app(cfg), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    server = runner.app[STATE]["server"]
    try:
        async with ClientSession() as http:
            # the engine loads in the background: /readyz says so, then it is ready
            status, body = await readyz(http, base)
            assert status == 503 and body["status"] == "loading"
            assert await wait_for(lambda: server.manager is not None, 120), server.loading_error
            status, body = await readyz(http, base)
            assert status == 200 and body["ready"] and "layout 4+vae" in body["description"]
            engine = server.manager.engine
            assert engine.layout.world == 5 and len(engine.processes) == 5

            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                  args=chromium_args)
                try:
                    page = await (await browser.new_context()).new_page()
                    await page.goto(f"{base}/call?size=64*64")
                    await page.click("#start")
                    await page.wait_for_function(
                        "window.avatarStats.state === 'connected'", timeout=60_000)
                    await page.wait_for_function("window.avatarStats.framesDecoded >= 75",
                                                 timeout=120_000)
                    stats = await page.evaluate("window.avatarStats")
                    assert (stats["width"], stats["height"]) == (64, 64)
                    assert stats["audioPackets"] > 0
                    session = next(iter(server.manager.sessions.values()))
                    assert session.audio_in.samples_in > 16000  # the fake mic reached rank 0
                    assert session.stats.blocks >= 6
                    assert server.manager.runtime.stats.failed_sessions == 0

                    # a DiT rank dies mid-call
                    killed = time.monotonic()
                    os.kill(engine.processes[2].pid, signal.SIGKILL)
                    assert await wait_for(lambda: session.closed.is_set(), 5.0)
                    assert time.monotonic() - killed < 5.0
                    assert "rank 2" in session.close_reason and "died" in session.close_reason
                    status, body = await readyz(http, base)
                    assert status == 503 and body["status"] == "restarting"
                    assert "rank 2" in body["error"]
                    async with http.post(f"{base}/v1/sessions", json={}) as r:
                        assert r.status == 503 and (await r.json())["error"]["retryable"]
                    async with http.get(f"{base}/healthz") as r:
                        assert r.status == 200  # the server itself is up
                finally:
                    await browser.close()
            ok = False
            end = time.monotonic() + 120
            while time.monotonic() < end and not ok:
                status, body = await readyz(http, base)
                ok = status == 200
                await asyncio.sleep(0.5)
            assert ok, body
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 201  # on the new group
    finally:
        procs = list(server.manager.engine.processes.values()) if server.manager else []
        await runner.cleanup()
    assert await wait_for(lambda: not any(p.is_alive() for p in procs), 10)
