"""End to end in real headless Chromium (Debian's, driven by Playwright): the call page with a
fake microphone playing a speech WAV, and the OBS page in a second browser context."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
from pathlib import Path

import pytest

from stream.media.decode import read_audio
from tests.media import write_wav
from tests.stream.conftest import Running
from tests.stream.rtc_client import wait_for

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required"]


def loopback_only() -> bool:
    """Only `lo` exists: Chromium cannot reach anything but 127.0.0.0/8 (.ci/test's namespace)."""
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


@pytest.fixture
def chromium_args(examples: dict, tmp_path: Path) -> list[str]:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run .ci/install")
    if not loopback_only():
        pytest.skip("needs a loopback-only network namespace: run the suite with .ci/test")
    # Chromium's fake capture reads 16-bit PCM WAV: the espeak-ng speech at 48 kHz
    speech = read_audio(examples["landscape"].audio, rate=48000)
    wav = write_wav(tmp_path / "mic.wav", speech, 48000)
    return [*FLAGS, f"--use-file-for-fake-audio-capture={wav}"]


async def test_call_and_obs_pages(running: Running, chromium_args: list[str]) -> None:
    from playwright.async_api import async_playwright

    before = {t for t in asyncio.all_tasks() if not t.done()}
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=chromium_args)
        try:
            caller_ctx = await browser.new_context()
            call_page = await caller_ctx.new_page()
            await call_page.goto(f"{running.base}/call?size=256*128")
            await call_page.click("#start")
            await call_page.wait_for_function("window.avatarStats.state === 'connected'",
                                              timeout=30_000)
            # the OBS page of the same session, in a second browser context
            viewer_url = await call_page.get_attribute("#viewer-link", "href")
            assert viewer_url and "/obs/" in viewer_url and "audio=1" in viewer_url
            obs_ctx = await browser.new_context()
            obs_page = await obs_ctx.new_page()
            await obs_page.goto(viewer_url)
            await call_page.wait_for_function("window.avatarStats.framesDecoded >= 100",
                                              timeout=60_000)
            await obs_page.wait_for_function("window.avatarStats.framesDecoded >= 50",
                                             timeout=60_000)
            call_stats = await call_page.evaluate("window.avatarStats")
            obs_stats = await obs_page.evaluate("window.avatarStats")
            assert call_stats["audioSamples"] > 0 and call_stats["audioPackets"] > 0
            assert obs_stats["audioPackets"] > 0
            assert (call_stats["width"], call_stats["height"]) == (256, 128)
            assert "H264" in call_stats["codec"]
            overlay = await call_page.text_content("#stats")
            assert "fps" in overlay and "256×128" in overlay and "A/V" in overlay
            assert await call_page.is_visible("#badge")  # the preview engine is labelled
            assert await call_page.text_content("#badge") == "PREVIEW ENGINE"
            assert await obs_page.text_content("#badge") == "PREVIEW ENGINE"

            session = next(iter(running.manager.sessions.values()))
            assert {p.kind for p in session.peers.values()} == {"caller", "whep"}
            assert session.audio_in.samples_in > 16000  # the fake mic reached the engine
            caller = next(p for p in session.peers.values() if p.kind == "caller")

            # the caller's browser goes away mid-stream; the viewer keeps watching
            await caller_ctx.close()
            assert await wait_for(lambda: caller.id not in session.peers, 40)
            assert caller.pc.connectionState == "closed"
            assert caller.video.readyState == "ended" and caller.audio.readyState == "ended"
            assert all(t.readyState == "ended" for t in caller.remote_tracks)
            assert not caller.tasks
            frames = (await obs_page.evaluate("window.avatarStats"))["framesDecoded"]
            await asyncio.sleep(2.0)
            assert (await obs_page.evaluate("window.avatarStats"))["framesDecoded"] > frames + 25
            await obs_ctx.close()
            assert await wait_for(lambda: not session.peers, 40)
        finally:
            await browser.close()
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert await wait_for(lambda: not {t for t in leftover if not t.done()}, 10), leftover


def token_claims(token: str) -> dict:
    """The claims of a JWT, unverified (what anyone holding the link can read)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def test_backend_link_never_leaks_the_call_token(running: Running,
                                                       chromium_args: list[str]) -> None:
    """A backend makes the session and hands the speaker a call link: the viewer link the page
    then shows carries a view-scope token, never the call token. The microphone keeps echo
    cancellation on, and the OBS page stops (and says why) once the session has ended."""
    from playwright.async_api import async_playwright

    s = await running.create(size="256*128")  # the "backend"
    call_link = s["urls"]["call"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=chromium_args)
        try:
            page = await (await browser.new_context()).new_page()
            await page.goto(call_link)
            await page.click("#start")
            await page.wait_for_function("window.avatarStats.state === 'connected'",
                                         timeout=30_000)
            stats = await page.evaluate("window.avatarStats")
            assert stats["echoCancellation"] is True
            viewer = stats["viewerLink"]
            assert viewer == await page.get_attribute("#viewer-link", "href")
            token = viewer.split("token=")[1].split("&")[0]
            assert s["token"] not in viewer and token_claims(token)["scope"] == "view"
            obs = await (await browser.new_context()).new_page()
            await obs.goto(viewer)
            await obs.wait_for_function("window.avatarStats.framesDecoded >= 10", timeout=60_000)
            async with running.http.delete(s["urls"]["session"], headers={
                    "Authorization": f"Bearer {s['token']}"}) as r:
                assert r.status == 204
            await obs.wait_for_function("window.avatarStats.state === 'ended'", timeout=30_000)
            assert "ended" in (await obs.text_content("#message"))
            requests = []
            obs.on("request", lambda req: requests.append(req.url))
            await asyncio.sleep(4.0)  # long past the first retry: it does not try again
            assert not [u for u in requests if "/whep" in u or "/v1/sessions" in u], requests
        finally:
            await browser.close()
