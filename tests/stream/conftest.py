"""In-process servers for the stream tests: the real app on a real loopback port."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web

from engine.config import EngineConfig
from engine.preview import PreviewEngine
from stream.app import STATE, build_app
from stream.config import ServerConfig, SessionsConfig, StreamConfig, WebRTCConfig


@dataclasses.dataclass
class Running:
    app: web.Application
    base: str
    http: ClientSession

    @property
    def server(self):
        return self.app[STATE]["server"]

    @property
    def manager(self):
        return self.server.manager

    async def create(self, **fields) -> dict:
        async with self.http.post(f"{self.base}/v1/sessions", json=fields) as r:
            body = await r.json()
            assert r.status == 201, body
            return body


def make_config(**overrides) -> StreamConfig:
    sections = {
        "server": ServerConfig(port=0),
        "webrtc": WebRTCConfig(host_addresses=("127.0.0.1",)),  # loopback only
        "sessions": SessionsConfig(default_size="256*128"),
    }
    sections.update(overrides)
    return StreamConfig(**sections)


async def start_server(cfg: StreamConfig, max_sessions: int = 8) -> tuple[web.AppRunner, str]:
    app = build_app(cfg, PreviewEngine(EngineConfig(max_sessions=max_sessions)))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    runner, base = await start_server(make_config())
    async with ClientSession() as http:
        yield Running(runner.app, base, http)
    await runner.cleanup()
