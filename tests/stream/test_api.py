"""The HTTP API of `avatar serve`: sessions, health, metrics, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import av
import numpy as np
import pytest
from aiohttp import ClientSession, FormData

from stream.app import STATE
from stream.config import ServerConfig, SessionsConfig
from tests.stream.conftest import Running, make_config, start_server

GOOD_OFFER = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"


def png_bytes(w: int = 96, h: int = 64, img: np.ndarray | None = None) -> bytes:
    """A PNG of `img` (uint8 RGB), or of a flat green w x h picture."""
    if img is None:
        img = np.zeros((h, w, 3), np.uint8)
        img[:, :, 1] = 200
    h, w = img.shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = w, h, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode(None))
    return buf.getvalue()


async def error_of(response) -> dict:  # noqa: ANN001
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "retryable"}
    return body["error"]


async def test_health_ready_and_metrics(running: Running) -> None:
    async with running.http.get(f"{running.base}/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with running.http.get(f"{running.base}/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["ready"] and body["engine"] == "preview"
        assert body["preview"] is True and "preview" in body["description"]
    await running.create()
    await asyncio.sleep(1.2)  # a block or two
    async with running.http.get(f"{running.base}/metrics") as r:
        text = await r.text()
        assert r.status == 200 and r.content_type == "text/plain"
    # prometheus_client's own parser reads it: the exposition format, not look-alike text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["avatar_sessions_active"].samples[0].value == 1
    assert families["avatar_sessions_created"].samples[0].value == 1
    assert families["avatar_block_seconds"].type == "histogram"
    assert any(s.name == "avatar_block_seconds_count" and s.value >= 1
               for s in families["avatar_block_seconds"].samples)
    for name in ("process_resident_memory_bytes", "process_open_fds", "avatar_threads",
                 "avatar_event_loop_tasks", "avatar_event_loop_lag_seconds",
                 "avatar_block_ready_lag_seconds"):
        assert name in families, name


async def test_create_session_returns_everything_a_client_needs(running: Running) -> None:
    body = await running.create(prompt="a dwarf talking", seed=3)
    assert body["engine"]["preview"] is True
    assert body["video"] == {"width": 256, "height": 128, "fps": 25}
    assert body["audio_out"] == {"sample_rate": 48000}
    assert body["ice_servers"] == []  # none unless configured
    sid, token = body["session_id"], body["token"]
    assert body["urls"]["call"].endswith(f"/call?session={sid}&token={token}")
    view = body["viewer_token"]
    assert body["urls"]["stream_ts"].endswith(f"/v1/sessions/{sid}/stream.ts?token={view}")
    assert body["expires_at"] > time.time()
    async with running.http.get(body["urls"]["session"],
                                headers={"Authorization": f"Bearer {token}"}) as r:
        got = await r.json()
        assert r.status == 200 and got["session_id"] == sid and got["engine"]["name"] == "preview"


async def test_image_upload_multipart_and_base64(running: Running) -> None:
    form = FormData()
    form.add_field("image", png_bytes(), filename="face.png", content_type="image/png")
    form.add_field("size", "128*128")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        body = await r.json()
        assert r.status == 201, body
        assert (body["video"]["width"], body["video"]["height"]) == (128, 64)  # its 3:2 aspect
    data = base64.b64encode(png_bytes(200, 100)).decode()
    async with running.http.post(f"{running.base}/v1/sessions",
                                 json={"image": data, "size": "256*128"}) as r:
        body = await r.json()
        assert r.status == 201 and body["video"]["width"] == 256 and body["video"]["height"] == 128


async def test_session_info_says_which_face_the_preview_animates(running: Running) -> None:
    from engine.synthetic_face import landscape, portrait_photo

    photo, face = portrait_photo(704, 384, 0.3, 0.4, 0.15)
    infos = []
    for img in (photo, landscape(704, 384)):
        form = FormData()
        form.add_field("image", png_bytes(img=img), filename="avatar.png",
                       content_type="image/png")
        form.add_field("size", "704*384")  # the picture's own size: boxes in its pixels
        async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
            created = await r.json()
            assert r.status == 201, created
        async with running.http.get(created["urls"]["session"], headers={
                "Authorization": f"Bearer {created['token']}"}) as r:
            infos.append((created["avatar"], (await r.json())["avatar"]))
    (found, again), (none, _) = infos
    assert found == again and found["source"] == "image"
    assert found["face"]["found"] is True and found["face"]["view"] == "frontal"
    x, y, w, h = found["face"]["box"]
    assert x < face.mouth[0] < x + w and y < face.mouth[1] < y + h
    assert "jaw" in found["animation"]
    assert none["face"] == {"found": False} and none["animation"] == []
    assert "no face" in none["note"]
    drawn = (await running.create())["avatar"]  # no picture: the drawn face
    assert drawn["source"] == "drawn" and drawn["face"]["found"] is True


async def test_delete_and_keepalive(running: Running) -> None:
    body = await running.create()
    auth = {"Authorization": f"Bearer {body['token']}"}
    async with running.http.post(f"{body['urls']['session']}/keepalive", headers=auth) as r:
        assert r.status == 204
    async with running.http.delete(body["urls"]["session"], headers=auth) as r:
        assert r.status == 204
    async with running.http.get(body["urls"]["session"], headers=auth) as r:
        assert r.status == 404 and (await error_of(r))["code"] == "not_found"
    assert running.manager.sessions == {}


@pytest.mark.parametrize("body, code", [
    ({"sdp": "hello", "type": "offer"}, "malformed_sdp"),
    ({"sdp": "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\n", "type": "offer"}, "malformed_sdp"),
    ({"sdp": GOOD_OFFER, "type": "offer"}, "malformed_sdp"),  # no ICE/DTLS: aiortc rejects it
    ({"sdp": GOOD_OFFER, "type": "answer"}, "malformed_sdp"),
])
async def test_malformed_sdp(running: Running, body: dict, code: str) -> None:
    s = await running.create()
    async with running.http.post(s["urls"]["offer"], json=body,
                                 headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 400
        err = await error_of(r)
        assert err["code"] == code and err["retryable"] is False
    async with running.http.post(s["urls"]["whep"], data=body["sdp"],
                                 headers={"Authorization": f"Bearer {s['token']}",
                                          "Content-Type": "application/sdp"}) as r:
        assert r.status == 400 and (await error_of(r))["code"] == "malformed_sdp"
    # the session is unharmed
    assert running.manager.get(s["session_id"]).peers == {}


async def test_unknown_session_and_peer(running: Running) -> None:
    # without a credential for it, a session id is not even looked up (ids are not probeable)
    async with running.http.post(f"{running.base}/v1/sessions/nope/offer",
                                 json={"sdp": GOOD_OFFER, "type": "offer"}) as r:
        assert r.status == 401
    ended = await running.create()
    auth = {"Authorization": f"Bearer {ended['token']}"}
    async with running.http.delete(ended["urls"]["session"], headers=auth) as r:
        assert r.status == 204
    async with running.http.post(ended["urls"]["offer"], headers=auth,
                                 json={"sdp": GOOD_OFFER, "type": "offer"}) as r:
        err = await error_of(r)
        assert r.status == 404 and ended["session_id"] in err["message"]
    s = await running.create()
    async with running.http.delete(f"{s['urls']['whep']}/nobody",
                                   headers={"Authorization": f"Bearer {s['token']}"}) as r:
        assert r.status == 404
    async with running.http.get(f"{running.base}/v1/nothing/here") as r:
        assert r.status == 404 and (await error_of(r))["code"] == "not_found"


async def test_tokens(running: Running) -> None:
    a, b = await running.create(), await running.create()
    cases = [({}, "unauthorized"), ({"Authorization": "Bearer garbage"}, "invalid_token"),
             ({"Authorization": f"Bearer {b['token']}"}, "invalid_token")]
    for headers, code in cases:
        async with running.http.get(a["urls"]["session"], headers=headers) as r:
            assert r.status == 401 and (await error_of(r))["code"] == code
            assert r.headers["WWW-Authenticate"] == "Bearer"
    async with running.http.get(f"{a['urls']['session']}?token={a['token']}") as r:
        assert r.status == 200


async def test_expired_token() -> None:
    runner, base = await start_server(make_config(server=ServerConfig(port=0, token_ttl_s=1.0)))
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                s = await r.json()
            await asyncio.sleep(1.3)
            async with http.post(s["urls"]["offer"], json={"sdp": GOOD_OFFER, "type": "offer"},
                                 headers={"Authorization": f"Bearer {s['token']}"}) as r:
                assert r.status == 401
                err = await error_of(r)
                assert err["code"] == "token_expired" and "expired" in err["message"]
    finally:
        await runner.cleanup()


async def test_api_keys_guard_session_creation() -> None:
    key = "k" * 24
    runner, base = await start_server(make_config(server=ServerConfig(port=0, api_keys=(key,))))
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 401 and (await error_of(r))["code"] == "unauthorized"
            async with http.post(f"{base}/v1/sessions?token={key}", json={}) as r:
                assert r.status == 401  # only in the header: a key in a URL ends up in logs
            async with http.post(f"{base}/v1/sessions", json={},
                                 headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 201
    finally:
        await runner.cleanup()


async def test_wrong_content_types(running: Running) -> None:
    s = await running.create()
    auth = {"Authorization": f"Bearer {s['token']}"}
    async with running.http.post(s["urls"]["offer"], data="v=0",
                                 headers={**auth, "Content-Type": "application/sdp"}) as r:
        assert r.status == 415 and (await error_of(r))["code"] == "unsupported_media_type"
    async with running.http.post(s["urls"]["whep"], json={"sdp": GOOD_OFFER}, headers=auth) as r:
        assert r.status == 415
    async with running.http.post(f"{running.base}/v1/sessions", data="size=1",
                                 headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
    async with running.http.post(f"{running.base}/v1/sessions", data="{not json",
                                 headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await error_of(r))["code"] == "malformed_json"


async def test_oversized_upload(running: Running) -> None:
    limit = running.server.cfg.server.max_upload_bytes
    form = FormData()
    form.add_field("image", b"\0" * (limit + 1), filename="huge.png", content_type="image/png")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        assert r.status == 413
        err = await error_of(r)
        assert err["code"] == "payload_too_large" and str(limit) in err["message"]
    async with running.http.get(f"{running.base}/healthz") as r:
        assert r.status == 200  # nothing else broke


@pytest.mark.parametrize("payload", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
async def test_unsupported_image(running: Running, payload: bytes) -> None:
    form = FormData()
    form.add_field("image", payload, filename="x.png", content_type="image/png")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        assert r.status == 415
        err = await error_of(r)
        assert err["code"] == "unsupported_image" and "JPEG" in err["message"]
    async with running.http.post(f"{running.base}/v1/sessions",
                                 json={"image": "%%% not base64"}) as r:
        assert r.status == 400 and (await error_of(r))["code"] == "invalid_image"


async def test_bad_fields(running: Running) -> None:
    for body, code in [({"avatar": "ghost"}, "unknown_avatar"), ({"colour": "red"},
                       "unknown_field"), ({"seed": "x"}, "invalid_seed"),
                       ({"size": "huge"}, "invalid_session_params")]:
        async with running.http.post(f"{running.base}/v1/sessions", json=body) as r:
            assert r.status in (400, 422), body
            assert (await error_of(r))["code"] == code


async def test_capacity_is_a_typed_503_with_retry_after() -> None:
    runner, base = await start_server(make_config(), max_sessions=1)
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 201
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) > 0
                err = await error_of(r)
                assert err["code"] == "capacity_exhausted" and err["retryable"] is True
    finally:
        await runner.cleanup()


async def test_idle_timeout_ends_the_session() -> None:
    cfg = make_config(sessions=SessionsConfig(idle_timeout_s=1.0, default_size="128*64"))
    runner, base = await start_server(cfg)
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                sid = (await r.json())["session_id"]
            await asyncio.sleep(3.0)
            assert sid not in runner.app[STATE]["server"].manager.sessions
    finally:
        await runner.cleanup()


async def test_viewer_tokens_watch_but_cannot_call_or_end(running: Running) -> None:
    s = await running.create()
    view = {"Authorization": f"Bearer {s['viewer_token']}"}
    assert s["viewer_token"] in s["urls"]["viewer"] and s["token"] not in s["urls"]["viewer"]
    assert s["viewer_token"] in s["urls"]["stream_ts"]
    async with running.http.get(s["urls"]["session"], headers=view) as r:
        assert r.status == 200
    async with running.http.post(s["urls"]["offer"], json={"sdp": GOOD_OFFER, "type": "offer"},
                                 headers=view) as r:
        assert r.status == 403 and (await error_of(r))["code"] == "forbidden"
    async with running.http.delete(s["urls"]["session"], headers=view) as r:
        assert r.status == 403
    assert s["session_id"] in running.manager.sessions


def test_access_log_leaves_out_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from unittest import mock

    from stream.app import AccessLogger

    logger = logging.getLogger("test.access")
    request = mock.Mock(remote="127.0.0.1", method="GET", path="/v1/sessions/x/stream.ts",
                        query_string="token=secret")
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLogger(logger, "").log(request, mock.Mock(status=200), 0.01)
    assert "stream.ts" in caplog.text and "secret" not in caplog.text


async def test_huge_images_are_refused_before_decoding_and_big_ones_scaled(
        running: Running) -> None:
    form = FormData()
    form.add_field("image", png_bytes(9000, 16), filename="wide.png", content_type="image/png")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        assert r.status == 415 and "too large" in (await error_of(r))["message"]
    form = FormData()
    form.add_field("image", png_bytes(3000, 1500), filename="big.png", content_type="image/png")
    form.add_field("size", "256*128")
    async with running.http.post(f"{running.base}/v1/sessions", data=form) as r:
        body = await r.json()
        assert r.status == 201 and body["video"] == {"width": 256, "height": 128, "fps": 25}


async def test_wrongly_typed_fields(running: Running) -> None:
    async with running.http.post(f"{running.base}/v1/sessions", json={"avatar": ["x"]}) as r:
        assert r.status == 400 and (await error_of(r))["code"] == "invalid_avatar"


async def test_tokens_are_jwts_a_backend_can_mint_and_servers_share() -> None:
    """A backend holding the token secret mints a call token with PyJWT itself; a second
    server with the same secret accepts the first server's tokens, one with another does not."""
    import jwt

    secret = "s" * 40
    cfg = make_config(server=ServerConfig(port=0, token_secret=secret))
    runner_a, base_a = await start_server(cfg)
    runner_b, base_b = await start_server(cfg)
    runner_c, base_c = await start_server(make_config(server=ServerConfig(
        port=0, token_secret="t" * 40)))
    try:
        async with ClientSession() as http:
            async with http.post(f"{base_a}/v1/sessions", json={}) as r:
                s = await r.json()
            sid = s["session_id"]
            claims = jwt.decode(s["viewer_token"], secret, algorithms=["HS256"])
            assert claims["sid"] == sid and claims["scope"] == "view" and claims["exp"] > time.time()
            minted = jwt.encode({"sid": sid, "scope": "call", "exp": int(time.time()) + 60,
                                 "sub": "backend-user-42"}, secret, algorithm="HS256")
            auth = {"Authorization": f"Bearer {minted}"}
            async with http.get(f"{base_a}/v1/sessions/{sid}", headers=auth) as r:
                assert r.status == 200
                info = await r.json()
            # a call token gets the viewer link, never a call link or the call token again
            assert jwt.decode(info["viewer_token"], secret, algorithms=["HS256"])["scope"] == "view"
            assert "call" not in info["urls"] and minted not in json.dumps(info)
            for base, status in ((base_b, 404), (base_c, 401)):  # b: valid token, no such session
                async with http.get(f"{base}/v1/sessions/{sid}", headers=auth) as r:
                    assert r.status == status, await r.text()
            forged = jwt.encode({"sid": sid, "scope": "call", "exp": int(time.time()) + 60},
                                "x" * 40, algorithm="HS256")
            none_alg = jwt.encode({"sid": sid, "scope": "call", "exp": int(time.time()) + 60},
                                  None, algorithm="none")
            for bad in (forged, none_alg, minted[:-3] + "AAA"):
                async with http.get(f"{base_a}/v1/sessions/{sid}", headers={
                        "Authorization": f"Bearer {bad}"}) as r:
                    assert r.status == 401 and (await error_of(r))["code"] == "invalid_token"
    finally:
        for runner in (runner_a, runner_b, runner_c):
            await runner.cleanup()
