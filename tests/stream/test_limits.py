"""Limits and hostile requests get typed errors: oversized sizes, malformed forms, images that are
not pictures, creation floods; CORS for configured origins only; HTTPS from config."""

from __future__ import annotations

import io
import ssl
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import ClientSession, web

from engine.api import ConfigError
from stream.config import ServerConfig, StreamConfig
from stream.server import ssl_context
from tests.stream.conftest import Running, make_config, start_server


async def error_of(response) -> dict:  # noqa: ANN001
    return (await response.json())["error"]


async def test_an_oversized_size_is_refused_naming_the_limit(running: Running) -> None:
    async with running.http.post(f"{running.base}/v1/sessions",
                                 json={"size": "7680*4320"}) as r:
        err = await error_of(r)
        assert r.status == 400 and err["code"] == "size_too_large"
        assert "7680*4320" in err["message"] and "704*384" in err["message"]
        assert "max_size" in err["message"]
    assert not running.manager.sessions


@pytest.mark.parametrize("body, content_type", [
    (b"garbage without boundary", "multipart/form-data; boundary=NEVER"),
    (b"x", "multipart/form-data"),
    (b"--B\r\nContent-Disposition: form-data; name=\"size\"\r\n\r\n256*128", "multipart/form-data; boundary=B"),
])
async def test_malformed_multipart_is_a_400(running: Running, body: bytes,
                                             content_type: str) -> None:
    async with running.http.post(f"{running.base}/v1/sessions", data=body,
                                 headers={"Content-Type": content_type}) as r:
        assert r.status == 400 and (await error_of(r))["code"] == "malformed_form"


def encode_video() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8), "rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def encode_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = width, height, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8),
                                                     "rgb24")):
            c.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("data, words", [
    (lambda: encode_video(), "not a still image"),
    (lambda: encode_png(640, 64), "too elongated"),
])
async def test_uploads_that_are_not_avatar_pictures_are_refused(running: Running, data,
                                                                words: str) -> None:
    from aiohttp import FormData

    form = FormData()
    form.add_field("image", data(), filename="x", content_type="application/octet-stream")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        err = await error_of(r)
        assert r.status == 415 and err["code"] == "unsupported_image", err
        assert words in err["message"]


async def test_session_creations_per_minute_are_limited() -> None:
    runner, base = await start_server(make_config(server=ServerConfig(
        port=0, max_session_creations_per_minute=3)))
    try:
        async with ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{base}/v1/sessions", json={"size": "256*128"}) as r:
                    assert r.status == 201
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                err = await error_of(r)
                assert r.status == 429 and err["code"] == "rate_limited" and err["retryable"]
                assert 1 <= int(r.headers["Retry-After"]) <= 60
    finally:
        await runner.cleanup()


async def test_cors_only_for_configured_origins() -> None:
    runner, base = await start_server(make_config(server=ServerConfig(
        port=0, cors_origins=("https://app.example.org",))))
    try:
        async with ClientSession() as http:
            preflight = {"Origin": "https://app.example.org",
                         "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization, content-type"}
            async with http.options(f"{base}/v1/sessions", headers=preflight) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
                assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
            async with http.post(f"{base}/v1/sessions", json={"size": "256*128"},
                                 headers={"Origin": "https://app.example.org"}) as r:
                assert r.status == 201
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
                assert "Location" in r.headers["Access-Control-Expose-Headers"]
            async with http.post(f"{base}/v1/sessions", json={},
                                 headers={"Origin": "https://evil.example"}) as r:
                assert "Access-Control-Allow-Origin" not in r.headers
    finally:
        await runner.cleanup()


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_https_from_config(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('[server]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n')
    cfg = StreamConfig.load(cfg_file)  # paths relative to the config file
    assert cfg.server.tls_cert == str(cert)
    from engine.preview import PreviewEngine
    from stream.app import build_app

    app = build_app(make_config(server=cfg.server), PreviewEngine())
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context(cfg.server))
    await site.start()
    port = runner.addresses[0][1]
    client_ssl = ssl.create_default_context(cafile=str(cert))
    try:
        async with ClientSession() as http:
            async with http.post(f"https://127.0.0.1:{port}/v1/sessions", ssl=client_ssl,
                                 json={"size": "256*128"}) as r:
                body = await r.json()
                assert r.status == 201
            assert body["urls"]["session"].startswith("https://127.0.0.1:")
            assert body["urls"]["ws"].startswith("wss://127.0.0.1:")
            with pytest.raises(Exception):  # noqa: B017  (a plain-HTTP client gets nowhere)
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status != 200
    finally:
        await runner.cleanup()


def test_tls_config_errors_name_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and server.tls_key go together"):
        ServerConfig(tls_cert="a.pem")
    with pytest.raises(ConfigError, match="does not exist"):
        ssl_context(ServerConfig(tls_cert=str(tmp_path / "a.pem"), tls_key=str(tmp_path / "b")))
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        ssl_context(ServerConfig(tls_cert=str(tmp_path / "bad.pem"),
                                 tls_key=str(tmp_path / "bad.pem")))
    with pytest.raises(ConfigError, match="cors_origins"):
        ServerConfig(cors_origins=("app.example.org",))
