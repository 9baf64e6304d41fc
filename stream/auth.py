"""API keys (for backends) and short-lived session tokens (for browsers and viewers).

A token is `base64url(json {sid, scope, exp}) . base64url(HMAC-SHA256)` under a secret made at
start-up, so tokens need no storage and die with the process, like the sessions they name.
Scopes: "call" (the speaker: send audio, end the session) includes "view" (watch and listen);
viewer links carry a view token only, so sharing one never hands over the call. API keys are
accepted only in the Authorization header (query strings end up in logs and browser history).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from aiohttp import web

from stream.errors import ApiError, unauthorized

SCOPES = ("call", "view")


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

    def issue(self, sid: str, scope: str = "call") -> tuple[str, float]:
        """A token for session `sid` with `scope` ("call" or "view") and its expiry (unix)."""
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r}: accepted {SCOPES}")
        exp = time.time() + self.token_ttl_s
        payload = _b64(json.dumps({"sid": sid, "scope": scope, "exp": round(exp, 3)}).encode())
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{_b64(mac)}", exp

    def check_token(self, token: str, sid: str, scope: str = "view") -> None:
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
        if scope == "call" and claims.get("scope") != "call":
            raise ApiError(403, "forbidden", "this is a viewer token: it can watch the session "
                           "but not call into it or end it")

    @staticmethod
    def _header(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def _is_key(self, given: str | None) -> bool:
        if not given:
            return False
        return any(hmac.compare_digest(given, k) for k in self.api_keys)

    def require_key(self, request: web.Request) -> None:
        """Creating sessions: an API key, unless the server runs without keys."""
        if self.open:
            return
        if not self._is_key(self._header(request)):
            raise unauthorized("unauthorized", "creating a session needs an API key: "
                               "Authorization: Bearer <key>")

    def require_session(self, request: web.Request, sid: str, scope: str = "view") -> None:
        """Session endpoints: a token of the session with `scope`, or an API key."""
        header = self._header(request)
        if self._is_key(header):
            return
        given = header or request.query.get("token")
        if not given:
            raise unauthorized("unauthorized", "this endpoint needs the session token "
                               "(Authorization: Bearer <token> or ?token=)")
        self.check_token(given, sid, scope)
