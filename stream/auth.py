"""API keys (for backends and operators) and session tokens (JWTs, for browsers and viewers).

Session tokens are JWTs (HS256) signed with the server's token secret, so a backend that holds the
secret mints call and viewer links itself, and every server sharing the secret accepts them (as
LiveKit's access tokens work). Claims (docs/auth.md): `sid` (the session), `scope` ("call" or
"view"), `exp`, `iat`, and an optional `sub` (who the link is for; logged, never trusted for
access). "call" (the speaker or bot: send audio, end the session) includes "view" (watch and
listen); viewer links carry a view token only, so sharing one never hands over the call.

API keys are compared in constant time and accepted only in the Authorization header (query
strings end up in logs and browser history). They create sessions, read /readyz and /metrics, and
act on any session. A server with no API key configured is in development mode: those endpoints
answer only clients on this machine (a loopback peer with no proxy headers), so nothing reachable
from the network can create sessions without a key.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from aiohttp import web

from engine.api import ConfigError
from stream.errors import ApiError, unauthorized

log = logging.getLogger(__name__)

SCOPES = ("call", "view")
ALGORITHM = "HS256"
MIN_SECRET = 32  # characters of a configured token secret
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_local(request: web.BaseRequest) -> bool:
    """A client on this machine: a loopback peer that is not a reverse proxy forwarding someone."""
    return _loopback(request.remote) and not any(h in request.headers for h in PROXY_HEADERS)


class Auth:
    def __init__(self, api_keys: Sequence[str], token_ttl_s: float, secret: str | None = None):
        self.api_keys = tuple(api_keys)
        self.token_ttl_s = token_ttl_s
        self.generated_secret = not secret
        self._secret = secret or secrets.token_urlsafe(48)

    @classmethod
    def from_config(cls, api_keys: Sequence[str], token_ttl_s: float, token_secret: str,
                    environ: Mapping[str, str] | None = None) -> Auth:
        """Keys and secret from config, or else from AVATAR_API_KEYS (comma-separated) and
        AVATAR_TOKEN_SECRET; with neither secret, one is generated for this process."""
        env = os.environ if environ is None else environ
        keys = list(api_keys) + [k.strip() for k in env.get("AVATAR_API_KEYS", "").split(",")
                                 if k.strip()]
        if any(len(k) < 16 for k in keys):
            raise ConfigError("AVATAR_API_KEYS: every key must be at least 16 characters")
        secret = token_secret or env.get("AVATAR_TOKEN_SECRET", "")
        if secret and len(secret) < MIN_SECRET:
            raise ConfigError(f"AVATAR_TOKEN_SECRET must be at least {MIN_SECRET} characters "
                              "(or set [server] token_secret)")
        auth = cls(keys, token_ttl_s, secret or None)
        if auth.generated_secret:
            log.info("no token secret configured ([server] token_secret or AVATAR_TOKEN_SECRET): "
                     "generated one for this process; its call and viewer links stop working "
                     "when it restarts, and other servers do not accept them")
        if auth.open:
            log.warning("no API key configured ([server] api_keys or AVATAR_API_KEYS): only "
                        "clients on this machine may create sessions or read /readyz and /metrics")
        return auth

    @property
    def open(self) -> bool:
        """No API key configured: development mode (key endpoints answer local clients only)."""
        return not self.api_keys

    # 1. tokens ------------------------------------------------------------------------------

    def issue(self, sid: str, scope: str = "call", ttl_s: float | None = None,
              subject: str | None = None) -> tuple[str, float]:
        """A token for session `sid` with `scope` and its expiry (unix seconds)."""
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r}: accepted {SCOPES}")
        now = time.time()
        exp = now + (self.token_ttl_s if ttl_s is None else ttl_s)
        claims: dict[str, Any] = {"sid": sid, "scope": scope, "iat": int(now), "exp": int(exp)}
        if subject:
            claims["sub"] = subject
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), float(int(exp))

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`, or a 401 that says what is wrong with it."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM],
                                options={"require": ["exp", "sid", "scope"]})
        except jwt.ExpiredSignatureError:
            raise unauthorized("token_expired", "the session token has expired; ask the "
                               "backend for a new call or viewer link") from None
        except jwt.InvalidTokenError:
            raise unauthorized("invalid_token", "the session token is malformed, forged or "
                               "signed with another secret; create a new session") from None
        if claims.get("scope") not in SCOPES or not isinstance(claims.get("sid"), str):
            raise unauthorized("invalid_token", f"the token's scope must be one of {SCOPES} "
                               "and its sid a session id")
        return claims

    def check_token(self, token: str, sid: str, scope: str = "view") -> dict[str, Any]:
        claims = self.claims(token)
        if claims["sid"] != sid:
            raise unauthorized("invalid_token", "this token belongs to another session")
        if scope == "call" and claims["scope"] != "call":
            raise ApiError(403, "forbidden", "this is a viewer token: it can watch the session "
                           "but not call into it or end it")
        return claims

    # 2. requests ----------------------------------------------------------------------------

    @staticmethod
    def bearer(request: web.BaseRequest) -> str | None:
        """The credential of an `Authorization: Bearer` header, if any."""
        header = request.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def _is_key(self, given: str | None) -> bool:
        if not given:
            return False
        found = False
        for key in self.api_keys:  # every key compared: the time does not say which matched
            found |= hmac.compare_digest(given.encode(), key.encode())
        return found

    def require_key(self, request: web.BaseRequest, what: str = "creating a session") -> None:
        """Key endpoints (sessions, /readyz, /metrics): an API key, or a local client in
        development mode."""
        if self._is_key(self.bearer(request)):
            return
        if self.open:
            if is_local(request):
                return
            raise unauthorized("api_key_required", f"{what} needs an API key, and this server "
                               "has none configured, so it answers clients on its own machine "
                               "only; set [server] api_keys (or AVATAR_API_KEYS) and send "
                               "Authorization: Bearer <key>")
        raise unauthorized("unauthorized", f"{what} needs an API key: "
                           "Authorization: Bearer <key>")

    def require_session(self, request: web.BaseRequest, sid: str,
                        scope: str = "view") -> dict[str, Any] | None:
        """Session endpoints: a token of the session with `scope`, or an API key. Returns the
        token's claims (None for a key)."""
        header = self.bearer(request)
        if self._is_key(header):
            return None
        given = header or request.query.get("token")
        if not given:
            raise unauthorized("unauthorized", "this endpoint needs the session token "
                               "(Authorization: Bearer <token> or ?token=)")
        return self.check_token(given, sid, scope)
