"""`--random-weights`: the real engine without a checkpoint, labelled as such everywhere."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import av
import pytest
from aiohttp import ClientSession, web

from engine.config import EngineConfig
from engine.errors import ConfigError
from stream.app import build_app
from stream.cli import main
from stream.config import SessionsConfig
from stream.server import with_random_weights
from tests.stream.conftest import make_config


async def test_readyz_and_session_info_say_random_weights() -> None:
    cfg = make_config(sessions=SessionsConfig(default_size="64*64"))
    cfg = dataclasses.replace(cfg, engine=EngineConfig(random_weights=True, device="cpu"))
    runner = web.AppRunner(build_app(cfg), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:  # the random models are built off the loop; /readyz says loading
                async with http.get(f"{base}/readyz") as r:
                    info = await r.json()
                if r.status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert info["engine"] == "wan" and info["random_weights"] is True
            assert info["preview"] is False and "RANDOM WEIGHTS" in info["description"]
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 201
                session = await r.json()
            assert session["engine"]["random_weights"] is True
            assert "RANDOM WEIGHTS" in session["engine"]["description"]
    finally:
        await runner.cleanup()


def test_render_with_random_weights(examples: dict, tmp_path: Path) -> None:
    example = examples["landscape"]
    out = tmp_path / "noise.mp4"
    short = tmp_path / "short.wav"
    from stream.media.decode import read_audio
    from tests.media import write_wav

    write_wav(short, read_audio(example.audio)[:16000], 16000)  # 1 s is enough
    assert main(["render", "--random-weights", "--image", str(example.image), "--audio",
                 str(short), "--out", str(out), "--size", "64*64"]) == 0
    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 25


def test_random_weights_replaces_a_configured_checkpoint() -> None:
    cfg = with_random_weights(EngineConfig(checkpoint="/ckpt/Wan2.2-S2V-14B"))
    assert cfg.random_weights and cfg.checkpoint == ""
    with pytest.raises(ConfigError, match="exclude each other"):
        EngineConfig.parse({"random_weights": True, "checkpoint": "/x"})

