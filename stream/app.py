"""The aiohttp application: routing and middleware. Every endpoint is on one port; the handlers
live in stream/http/ (one module per concern) and hand off to the SessionManager / Session.

Errors are JSON `{"error": {"code", "message", "retryable"}}` with a fitting HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from engine.api import Engine
from stream.config import StreamConfig
from stream.errors import ApiError
from stream.http import mpegts, pages, sessions, signalling
from stream.http.state import STATE, Server, server_of

log = logging.getLogger(__name__)

__all__ = ["STATE", "AccessLogger", "build_app"]


class AccessLogger(AbstractAccessLogger):
    """Access log without query strings: session tokens travel in ?token= links."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.3fs", request.remote, request.method, request.path,
                         response.status, time)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    srv = server_of(request)
    try:
        return await handler(request)
    except ApiError as exc:
        srv.metrics.inc("avatar_http_errors_total", code=exc.code)
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        limit = srv.cfg.server.max_upload_bytes
        srv.metrics.inc("avatar_http_errors_total", code="payload_too_large")
        return ApiError(413, "payload_too_large", f"the request body is larger than {limit} "
                        "bytes (server.max_upload_bytes)").response()
    except web.HTTPException as exc:
        if exc.status < 400 or request.path.startswith("/static/"):
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        srv.metrics.inc("avatar_http_errors_total", code=code)
        return ApiError(exc.status, code, f"{request.method} {request.path}: {exc.reason}",
                        headers={k: v for k, v in exc.headers.items() if k == "Allow"}).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        srv.metrics.inc("avatar_http_errors_total", code="internal")
        return ApiError(500, "internal", "internal server error (see the server log)",
                        retryable=True).response()


def build_app(cfg: StreamConfig, engine: Engine | None = None) -> web.Application:
    """The aiohttp app. `engine` overrides [engine] (tests pass a ready engine)."""
    app = web.Application(middlewares=[json_errors], client_max_size=cfg.server.max_upload_bytes)
    server = Server(cfg, engine)
    app[STATE] = {"server": server}
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.stop)
    r = app.router
    r.add_get("/", pages.index)
    r.add_get("/call", pages.page)
    r.add_get("/obs/{sid}", pages.page)
    r.add_static("/static/", pages.WEB_DIR, show_index=False)
    r.add_get("/healthz", pages.healthz)
    r.add_get("/readyz", pages.readyz)
    r.add_get("/metrics", pages.metrics)
    r.add_post("/v1/sessions", sessions.create_session)
    r.add_get("/v1/sessions/{sid}", sessions.get_session)
    r.add_delete("/v1/sessions/{sid}", sessions.delete_session)
    r.add_post("/v1/sessions/{sid}/keepalive", sessions.keepalive)
    r.add_post("/v1/sessions/{sid}/offer", signalling.offer)
    r.add_post("/v1/sessions/{sid}/whep", signalling.whep)
    r.add_delete("/v1/sessions/{sid}/whep/{pid}", signalling.delete_peer)
    r.add_delete("/v1/sessions/{sid}/peers/{pid}", signalling.delete_peer)
    r.add_get("/v1/sessions/{sid}/stream.ts", mpegts.stream_ts)
    r.add_get("/v1/sessions/{sid}/ws", signalling.websocket)
    return app
