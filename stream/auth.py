"""API keys (for backends) and short-lived session tokens (for browsers and viewers).

A token is `base64url(json {sid, exp}) . base64url(HMAC-SHA256)` under a secret made at start-up,
so tokens need no storage and die with the process, like the sessions they name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from aiohttp import web

from stream.errors import unauthorized


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Auth:
    def __init__(self, api_keys: tuple[str, ...], token_ttl_s: float):
        self.api_keys = tuple(api_keys)
        self.token_ttl_s = token_ttl_s
        self._secret = secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """No API keys configured: anyone may create sessions (development mode)."""
        return not self.api_keys

    def issue(self, sid: str) -> tuple[str, float]:
        """A token for session `sid` and its expiry (unix time)."""
        exp = time.time() + self.token_ttl_s
        payload = _b64(json.dumps({"sid": sid, "exp": round(exp, 3)}).encode())
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(mac)}", exp

    def check_token(self, token: str, sid: str) -> None:
        try:
            payload, mac = token.split(".")
            good = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(_unb64(mac), good):
                raise ValueError
            claims = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            raise unauthorized("invalid_token", "the session token is malformed or forged; "
                               "create a new session") from None
        if claims.get("sid") != sid:
            raise unauthorized("invalid_token", "this token belongs to another session")
        if float(claims.get("exp", 0)) < time.time():
            raise unauthorized("token_expired", "the session token has expired; ask the "
                               "backend for a new call or viewer link")

    @staticmethod
    def presented(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.query.get("token")

    def require_key(self, request: web.Request) -> None:
        """Creating sessions: an API key, unless the server runs without keys."""
        if self.open:
            return
        given = self.presented(request)
        if not given or not any(hmac.compare_digest(given, k) for k in self.api_keys):
            raise unauthorized("unauthorized", "creating a session needs an API key: "
                               "Authorization: Bearer <key>")

    def require_session(self, request: web.Request, sid: str) -> None:
        """Session endpoints: the session's token, or an API key."""
        given = self.presented(request)
        if given and any(hmac.compare_digest(given, k) for k in self.api_keys):
            return
        if not given:
            raise unauthorized("unauthorized", "this endpoint needs the session token "
                               "(Authorization: Bearer <token> or ?token=)")
        self.check_token(given, sid)
