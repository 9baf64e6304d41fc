"""The aiohttp application: every endpoint on one port (REST, WebRTC signalling, WHEP, the bot
WebSocket, MPEG-TS, pages, health and metrics). Handlers validate, then hand off to the SessionManager / Session.

Errors are JSON `{"error": {"code", "message", "retryable"}}` with a fitting HTTP status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.abc import AbstractAccessLogger

from engine.api import (
    DEFAULT_PROMPT,
    Engine,
    ProgressPrinter,
    SessionParams,
    create_engine,
    engine_health,
    start_runtime,
)
from stream.auth import Auth
from stream.config import StreamConfig
from stream.errors import ApiError, bad_request, not_found
from stream.media.decode import MediaError, read_image
from stream.media.encoder import make_executor
from stream.media.mpegts import TsMuxer
from stream.media.timeline import SAMPLES_PER_VIDEO_FRAME
from stream.metrics import Metrics
from stream.sessions import SessionManager
from stream.webrtc import check_offer_sdp, ice_servers_json, restrict_host_addresses
from stream.ws.handler import bot_socket

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "client" / "web"
STATE = web.AppKey("state", dict)


# 1. Application state -----------------------------------------------------------------------------


class Server:
    """Everything the handlers share; built at start-up, torn down at shutdown."""

    def __init__(self, cfg: StreamConfig, engine: Engine | None = None):
        self.cfg = cfg
        self.auth = Auth(cfg.server.api_keys, cfg.server.token_ttl_s)
        self.metrics = Metrics()
        self.executor = make_executor(cfg.media)
        self.engine = engine
        self.manager: SessionManager | None = None
        self.loading_error: str | None = None
        self.avatar_images: dict[str, np.ndarray] = {}
        self._load_task: asyncio.Task | None = None

    async def start(self, app: web.Application) -> None:
        restrict_host_addresses(self.cfg.webrtc.host_addresses)
        self.metrics.start_loop_probe()
        for name, path in self.cfg.avatars.items():
            if path:
                self.avatar_images[name] = read_image(path)  # fail fast on a bad avatar
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="engine-load")
        if self.engine is not None:
            await self._load_task

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.engine is None:
                # loading real weights takes minutes: off the loop, /readyz says "loading"
                self.engine = await loop.run_in_executor(
                    None, functools.partial(create_engine, self.cfg.engine, ProgressPrinter()))
            engine = self.engine
            runtime = start_runtime(engine, loop)
            self.manager = SessionManager(self.cfg, engine, runtime, self.auth, self.executor,
                                          self.metrics)
            self.manager.start()
            self.metrics.gauge("avatar_sessions_active", "Sessions running now.",
                               lambda: len(self.manager.sessions) if self.manager else 0)
            self.metrics.gauge("avatar_viewers_active", "Viewers (peers and MPEG-TS) now.",
                               lambda: sum(s.viewer_count for s in self.manager.sessions.values())
                               if self.manager else 0)
            self.metrics.gauge("avatar_ws_connections_active", "Bot WebSocket connections now.",
                               lambda: sum(len(s.sockets) for s in self.manager.sessions.values())
                               if self.manager else 0)
            self.metrics.gauge("avatar_engine_load", "Measured engine load (1 = real time).",
                               runtime.load)
            self.metrics.gauge("avatar_engine_skipped_blocks", "Blocks skipped to catch up.",
                               lambda: runtime.stats.skipped_blocks)
            if engine.name == "preview":
                log.warning("no [engine] checkpoint configured: serving the PREVIEW engine (no "
                            "model; the mouth follows the loudness). Set [engine] checkpoint "
                            "to the Wan2.2-S2V-14B folder for the real avatar.")
            if getattr(engine, "random_weights", False):
                log.warning("serving RANDOM WEIGHTS: the real engine at real shapes without a "
                            "checkpoint; the video is noise (for measuring speed and memory)")
            log.info("engine ready: %s", engine.description)
        except Exception as exc:
            self.loading_error = str(exc)
            log.exception("the engine failed to load")

    async def stop(self, app: web.Application) -> None:
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        stopped = True
        if self.manager is not None:
            await self.manager.aclose()
            await self.manager.runtime.aclose()
            stopped = not self.manager.runtime.alive
        if self.engine is not None and stopped:  # never under a block still being made
            self.engine.close()
        await self.metrics.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def ready_manager(self) -> SessionManager:
        if self.manager is None:
            if self.loading_error:
                raise ApiError(500, "engine_failed", f"the engine failed to load: "
                               f"{self.loading_error}")
            raise ApiError(503, "engine_loading", "the engine is still loading its weights",
                           retryable=True, headers={"Retry-After": "10"})
        return self.manager


class AccessLogger(AbstractAccessLogger):
    """Access log without query strings: session tokens travel in ?token= links."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.3fs", request.remote, request.method, request.path,
                         response.status, time)


def server_of(request: web.Request) -> Server:
    return request.app[STATE]["server"]


# 2. Middleware: JSON errors ----------------------------------------------------------------------


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


def require_content_type(request: web.Request, *accepted: str) -> None:
    if request.content_type not in accepted:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {request.content_type!r} "
                       f"is not accepted here; send {' or '.join(accepted)}")


# 3. Sessions -----------------------------------------------------------------------------------


def base_url(request: web.Request) -> str:
    public = server_of(request).cfg.server.public_url
    return public.rstrip("/") if public else f"{request.scheme}://{request.host}"


async def _session_params(request: web.Request) -> SessionParams:
    srv = server_of(request)
    fields: dict[str, Any] = {}
    image: np.ndarray | None = None
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        parts = 0
        while (part := await reader.next()) is not None:
            parts += 1
            if not isinstance(part, BodyPartReader) or parts > 8:
                raise bad_request("malformed_form", "expected a flat form of at most 8 fields")
            if part.name == "image":
                image = await _decode_image(request, bytes(await part.read()))
            elif part.name:
                text = await part.read(decode=True)
                if len(text) > 4096:
                    raise bad_request("field_too_long", f"form field {part.name!r} is longer "
                                      "than 4096 bytes")
                try:
                    fields[part.name] = text.decode().strip()
                except UnicodeDecodeError:
                    raise bad_request("malformed_form", f"form field {part.name!r} is not "
                                      "UTF-8 text") from None
    elif request.can_read_body:
        require_content_type(request, "application/json", "multipart/form-data")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("malformed_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("malformed_json", "the body must be a JSON object")
        fields = dict(body)
        if fields.get("image") is not None:
            try:
                raw = base64.b64decode(str(fields.pop("image")), validate=True)
            except (binascii.Error, ValueError):
                raise bad_request("invalid_image", "'image' must be base64-encoded image "
                                  "bytes (or upload it as multipart/form-data)") from None
            image = await _decode_image(request, raw)
    unknown = sorted(set(fields) - {"avatar", "prompt", "size", "seed", "image"})
    if unknown:
        raise bad_request("unknown_field", f"unknown field(s) {unknown}; accepted: avatar, "
                          "image, prompt, size, seed")
    for key in ("avatar", "prompt", "size"):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            raise bad_request(f"invalid_{key}", f"'{key}' must be a string, got "
                              f"{type(fields[key]).__name__}")
    avatar = fields.get("avatar")
    if avatar and image is None:
        if avatar not in srv.avatar_images:
            raise bad_request("unknown_avatar", f"avatar {avatar!r} is not configured; known: "
                              f"{sorted(srv.avatar_images)}")
        image = srv.avatar_images[avatar]
    if image is None:
        image = srv.avatar_images.get("default")
    try:
        seed = int(fields.get("seed", srv.cfg.engine.sampling.seed))
    except (TypeError, ValueError):
        raise bad_request("invalid_seed", "'seed' must be an integer") from None
    prompt = str(fields.get("prompt") or DEFAULT_PROMPT)
    if len(prompt) > 2000:
        raise bad_request("invalid_prompt", "the prompt is longer than 2000 characters")
    return SessionParams(image=image, prompt=prompt,
                         size=str(fields.get("size") or srv.cfg.sessions.default_size), seed=seed)


async def _decode_image(request: web.Request, data: bytes) -> np.ndarray:
    """Decode an upload on the encoder pool (a big picture takes a while)."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(server_of(request).executor, read_image, data)
    except MediaError as exc:
        raise ApiError(415, "unsupported_image", f"{exc}") from None


async def create_session(request: web.Request) -> web.Response:
    srv = server_of(request)
    srv.auth.require_key(request)
    manager = srv.ready_manager()
    params = await _session_params(request)
    try:  # the manager turns capacity and input errors into ApiErrors already
        session = await manager.create(params)
    except ValueError as exc:
        raise ApiError(422, "invalid_session_params", str(exc)) from None
    base, sid, tok, view = base_url(request), session.id, session.token, session.viewer_token
    api = f"{base}/v1/sessions/{sid}"
    body = {
        **_session_info(srv, session),
        "token": tok,
        "viewer_token": view,
        "expires_at": round(session.expires_at, 3),
        "audio_out": {"sample_rate": 48000},
        "urls": {
            "session": api, "offer": f"{api}/offer", "whep": f"{api}/whep",
            "stream_ts": f"{api}/stream.ts?token={view}",
            "ws": f"{base.replace('http', 'ws', 1)}/v1/sessions/{sid}/ws",
            "call": f"{base}/call?session={sid}&token={tok}",
            "obs": f"{base}/obs/{sid}?token={view}",
            "viewer": f"{base}/obs/{sid}?token={view}&audio=1",
        },
    }
    return web.json_response(body, status=201, headers={"Location": api})


def _session(request: web.Request, scope: str = "view") -> Any:
    """The session named in the path, once the request proves it may act on it (`scope`
    "view" to watch, "call" to send audio or end it). Auth first: ids are not probeable."""
    srv = server_of(request)
    sid = request.match_info["sid"]
    manager = srv.ready_manager()
    srv.auth.require_session(request, sid, scope)
    session = manager.sessions.get(sid)
    if session is None or session.closed.is_set():
        raise not_found(f"session {sid!r}")
    return session


def _session_info(srv: Server, session: Any) -> dict[str, Any]:
    """What a client needs to know of a session, beyond its tokens and links."""
    engine = srv.ready_manager().engine
    return {
        **session.describe(),
        "engine": {"name": engine.name, "preview": engine.name == "preview",
                   "random_weights": bool(getattr(engine, "random_weights", False)),
                   "description": engine.description},
        "ice_servers": ice_servers_json(srv.cfg.webrtc),
    }


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_session_info(server_of(request), _session(request)))


async def delete_session(request: web.Request) -> web.Response:
    session = _session(request, "call")
    await session.aclose("deleted by the client")
    return web.Response(status=204)


async def keepalive(request: web.Request) -> web.Response:
    _session(request).touch()
    return web.Response(status=204)


# 4. WebRTC: the call (JSON offer) and WHEP viewers -------------------------------------------


async def offer(request: web.Request) -> web.Response:
    session = _session(request, "call")
    require_content_type(request, "application/json")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_request("malformed_json", "the body is not valid JSON") from None
    if not isinstance(body, dict) or body.get("type") != "offer":
        raise bad_request("malformed_sdp", 'expected {"sdp": "...", "type": "offer"}')
    peer, answer = await session.add_peer("caller", check_offer_sdp(body.get("sdp")))
    server_of(request).metrics.inc("avatar_peers_total", kind="caller")
    return web.json_response({"sdp": answer, "type": "answer", "peer_id": peer.id,
                              "peer_url": f"/v1/sessions/{session.id}/peers/{peer.id}"})


async def whep(request: web.Request) -> web.Response:
    session = _session(request)
    require_content_type(request, "application/sdp")
    try:
        text = await request.text()
    except UnicodeDecodeError:
        raise bad_request("malformed_sdp", "the SDP offer is not UTF-8 text") from None
    peer, answer = await session.add_peer("whep", check_offer_sdp(text))
    server_of(request).metrics.inc("avatar_peers_total", kind="whep")
    location = f"/v1/sessions/{session.id}/whep/{peer.id}"
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": location})


async def delete_peer(request: web.Request) -> web.Response:
    """DELETE /peers/{pid} (any peer; a call token) or /whep/{pid} (a WHEP viewer leaving)."""
    whep_only = "/whep/" in request.path
    session = _session(request, "view" if whep_only else "call")
    pid = request.match_info["pid"]
    peer = session.peers.get(pid)
    if peer is None or (whep_only and peer.kind != "whep"):
        raise not_found(f"peer {pid!r}")
    await session.remove_peer(pid)
    return web.Response(status=204)


# 5. The chatbot WebSocket (stream/ws/) -------------------------------------------------------------


async def websocket(request: web.Request) -> web.StreamResponse:
    session = _session(request, "call")
    srv = server_of(request)
    engine = srv.ready_manager().engine
    return await bot_socket(request, session, srv.cfg.websocket, srv.metrics,
                            {"name": engine.name, "preview": engine.name == "preview"},
                            srv.ready_manager().runtime.load)


# 6. MPEG-TS over HTTP -----------------------------------------------------------------------------


async def stream_ts(request: web.Request) -> web.StreamResponse:
    """H.264 + AAC in MPEG-TS, latest frame wins, paced by the session clock."""
    session = _session(request)
    srv = server_of(request)
    if session.viewer_count >= srv.cfg.sessions.max_viewers:
        raise ApiError(429, "too_many_viewers", "this session has its maximum of viewers",
                       retryable=True, headers={"Retry-After": "10"})
    response = web.StreamResponse(headers={"Content-Type": "video/mp2t",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    reader_id = f"ts-{id(task):x}"
    session.ts_readers[reader_id] = task
    loop = asyncio.get_running_loop()
    muxer: TsMuxer | None = None
    clock = session.clock
    try:
        n = clock.frame_playing_now()
        while not session.closed.is_set():
            delay = clock.wall_for(n / 25) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            n = max(n, clock.frame_playing_now())  # latest frame wins
            found = session.frames.at_or_before(n)
            if found is None:
                n += 1
                continue
            rgb = found[1]
            if muxer is None or muxer.size != (rgb.shape[1], rgb.shape[0]):
                if muxer is not None:
                    await loop.run_in_executor(srv.executor, muxer.close)
                muxer = TsMuxer(rgb.shape[1], rgb.shape[0], srv.cfg.media)
            audio = session.playout.read(n * SAMPLES_PER_VIDEO_FRAME, SAMPLES_PER_VIDEO_FRAME)
            data = await loop.run_in_executor(srv.executor, muxer.add, rgb, n, audio,
                                              n * SAMPLES_PER_VIDEO_FRAME)
            if data:
                await response.write(data)
            session.touch()
            n += 1
    except ConnectionResetError:
        pass  # the reader went away
    finally:
        session.ts_readers.pop(reader_id, None)
        if muxer is not None:  # on an encoder thread: it waits for an add still running there
            with contextlib.suppress(RuntimeError):  # the executor is gone at shutdown
                await loop.run_in_executor(srv.executor, muxer.close)
    return response


# 7. Pages, health, metrics -----------------------------------------------------------------------


async def page(request: web.Request) -> web.FileResponse:
    name = "call.html" if request.path.startswith("/call") else "obs.html"
    return web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-store"})


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/call")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    srv = server_of(request)
    if srv.manager is None:
        status = "failed" if srv.loading_error else "loading"
        return web.json_response({"ready": False, "status": status, "error": srv.loading_error},
                                 status=503)
    engine = srv.manager.engine
    runtime = srv.manager.runtime
    health = engine_health(engine)
    if not health.ready:  # e.g. a GPU group replacing a failed rank
        return web.json_response({"ready": False, "status": health.status,
                                  "error": health.detail, "engine": engine.name,
                                  "sessions": runtime.active}, status=503)
    capacity = max(0, runtime.max_sessions - runtime.active)
    return web.json_response({
        "ready": True, "status": "ready", "engine": engine.name,
        "preview": engine.name == "preview",
        "random_weights": bool(getattr(engine, "random_weights", False)),
        "description": engine.description,
        "sessions": runtime.active, "capacity": capacity, "load": round(runtime.load(), 3),
    })


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=server_of(request).metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# 8. The app ------------------------------------------------------------------------------------


def build_app(cfg: StreamConfig, engine: Engine | None = None) -> web.Application:
    """The aiohttp app. `engine` overrides [engine] (tests pass a ready engine)."""
    app = web.Application(middlewares=[json_errors], client_max_size=cfg.server.max_upload_bytes)
    server = Server(cfg, engine)
    app[STATE] = {"server": server}
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.stop)
    r = app.router
    r.add_get("/", index)
    r.add_get("/call", page)
    r.add_get("/obs/{sid}", page)
    r.add_static("/static/", WEB_DIR, show_index=False)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/sessions", create_session)
    r.add_get("/v1/sessions/{sid}", get_session)
    r.add_delete("/v1/sessions/{sid}", delete_session)
    r.add_post("/v1/sessions/{sid}/keepalive", keepalive)
    r.add_post("/v1/sessions/{sid}/offer", offer)
    r.add_post("/v1/sessions/{sid}/whep", whep)
    r.add_delete("/v1/sessions/{sid}/whep/{pid}", delete_peer)
    r.add_delete("/v1/sessions/{sid}/peers/{pid}", delete_peer)
    r.add_get("/v1/sessions/{sid}/stream.ts", stream_ts)
    r.add_get("/v1/sessions/{sid}/ws", websocket)
    return app

