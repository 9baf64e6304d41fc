"""Every endpoint refuses unauthenticated, wrong-scope and expired requests.

The test walks the app's own route table: an endpoint added without a row in ACCESS fails it,
and every non-public endpoint must answer 401 without credentials, whatever its handler does.
"""

from __future__ import annotations

import time

import jwt
import pytest
from aiohttp import ClientSession

from stream.config import ServerConfig
from tests.stream.conftest import make_config, start_server

KEY = "k" * 24
SECRET = "s" * 40

# (method, route) -> who may call it: "public", "key" (an API key), "view" (a view or call
# token of the session, or a key), "call" (a call token of the session, or a key)
ACCESS = {
    ("GET", "/"): "public",
    ("GET", "/call"): "public",
    ("GET", "/obs/{sid}"): "public",
    ("GET", "/static/{filename}"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "key",
    ("GET", "/metrics"): "key",
    ("POST", "/v1/sessions"): "key",
    ("GET", "/v1/sessions/{sid}"): "view",
    ("DELETE", "/v1/sessions/{sid}"): "call",
    ("POST", "/v1/sessions/{sid}/keepalive"): "view",
    ("POST", "/v1/sessions/{sid}/offer"): "call",
    ("POST", "/v1/sessions/{sid}/whep"): "view",
    ("DELETE", "/v1/sessions/{sid}/whep/{pid}"): "view",
    ("DELETE", "/v1/sessions/{sid}/peers/{pid}"): "call",
    ("GET", "/v1/sessions/{sid}/stream.ts"): "view",
    ("GET", "/v1/sessions/{sid}/ws"): "call",
}


def routes(app) -> list[tuple[str, str]]:  # noqa: ANN001
    out = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info()
        path = info.get("formatter") or info.get("path") or (
            info.get("prefix", "").rstrip("/") + "/{filename}")  # the static files
        out.append((route.method, path))
    return out


def fill(path: str, sid: str) -> str:
    return path.replace("{sid}", sid).replace("{pid}", "nope").replace("{filename}", "common.js")


async def test_every_endpoint_needs_the_right_credentials() -> None:
    cfg = make_config(server=ServerConfig(port=0, api_keys=(KEY,), token_secret=SECRET))
    runner, base = await start_server(cfg)
    try:
        table = routes(runner.app)
        unknown = sorted(set(table) - set(ACCESS))
        assert not unknown, f"new endpoints without an auth rule in this test: {unknown}"
        async with ClientSession() as http:
            key = {"Authorization": f"Bearer {KEY}"}
            async with http.post(f"{base}/v1/sessions", json={"size": "256*128"},
                                 headers=key) as r:
                assert r.status == 201
                s = await r.json()
            sid = s["session_id"]
            view = {"Authorization": f"Bearer {s['viewer_token']}"}
            expired = jwt.encode({"sid": sid, "scope": "call", "exp": int(time.time()) - 5},
                                 SECRET, algorithm="HS256")
            other = jwt.encode({"sid": "another", "scope": "call",
                                "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
            for method, path in table:
                url = f"{base}{fill(path, sid)}"
                rule = ACCESS[(method, path)]
                async with http.request(method, url) as r:
                    if rule == "public":
                        assert r.status < 400, (method, path, r.status)
                        continue
                    assert r.status == 401, (method, path, r.status, await r.text())
                    assert r.headers.get("WWW-Authenticate") == "Bearer"
                if rule == "key":  # a session token is not a key
                    async with http.request(method, url, headers={
                            "Authorization": f"Bearer {s['token']}"}) as r:
                        assert r.status == 401, (method, path, r.status)
                    continue
                for creds, code in ((expired, "token_expired"), (other, "invalid_token"),
                                    ("garbage", "invalid_token")):
                    async with http.request(method, url, headers={
                            "Authorization": f"Bearer {creds}"}) as r:
                        body = await r.json()
                        assert r.status == 401 and body["error"]["code"] == code, (method, path)
                if rule == "call":
                    async with http.request(method, url, headers=view) as r:
                        assert r.status == 403, (method, path, r.status)
                        assert (await r.json())["error"]["code"] == "forbidden"
            # and the key itself opens the key endpoints (the walk above proved the rest)
            for path in ("/readyz", "/metrics"):
                async with http.get(f"{base}{path}", headers=key) as r:
                    assert r.status == 200
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("headers", [{"X-Forwarded-For": "203.0.113.9"},
                                     {"Forwarded": "for=203.0.113.9"}])
async def test_development_mode_answers_this_machine_only(headers: dict) -> None:
    """No API key configured: key endpoints answer local clients, not a client a reverse proxy
    forwards from elsewhere."""
    runner, base = await start_server(make_config())
    try:
        async with ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={"size": "256*128"}) as r:
                assert r.status == 201
            for method, path in (("POST", "/v1/sessions"), ("GET", "/readyz"),
                                 ("GET", "/metrics")):
                async with http.request(method, f"{base}{path}", headers=headers,
                                        json={} if method == "POST" else None) as r:
                    err = (await r.json())["error"]
                    assert r.status == 401 and err["code"] == "api_key_required"
                    assert "api_keys" in err["message"]
    finally:
        await runner.cleanup()
