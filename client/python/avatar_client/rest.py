"""The REST side: create and end sessions (POST/DELETE /v1/sessions) with aiohttp."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp


class ApiError(RuntimeError):
    """The server answered with an error: {"error": {code, message, retryable}}."""

    def __init__(self, status: int, code: str, message: str, retryable: bool = False):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class SessionInfo:
    """What POST /v1/sessions returned. `token` may call into the session (keep it on your
    backend or bot); `viewer_token` and the viewer links may only watch it."""

    session_id: str
    token: str
    viewer_token: str
    ws_url: str
    urls: dict[str, str]
    video: dict[str, int]
    engine: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _check(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except (aiohttp.ContentTypeError, ValueError):
        body = {}
    if response.status >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise ApiError(response.status, err.get("code", "http_error"),
                       err.get("message", response.reason or ""), bool(err.get("retryable")))
    return body if isinstance(body, dict) else {}


async def create_session(server: str, api_key: str | None = None,
                         **fields: Any) -> SessionInfo:
    """Create a session on `server` (e.g. "http://127.0.0.1:8080"). `fields`: avatar, image
    (base64), prompt, size, seed, as the server documents them."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.rstrip('/')}/v1/sessions", json=fields,
            headers=_headers(api_key)) as r:
        body = await _check(r)
    return SessionInfo(body["session_id"], body["token"], body["viewer_token"],
                       body["urls"]["ws"], body["urls"], body["video"], body["engine"], body)


async def delete_session(session: SessionInfo) -> None:
    """End the session (every viewer is disconnected)."""
    async with aiohttp.ClientSession() as http, http.delete(
            session.urls["session"], headers=_headers(session.token)) as r:
        if r.status != 404:  # already gone is fine
            await _check(r)
