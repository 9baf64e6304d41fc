"""What every handler shares: the `Server` (built at start-up, torn down at shutdown), and the
first steps of a request (find the session it may act on, check its content type, build links).

The engine loads off the event loop (minutes for real weights; /readyz says "loading" meanwhile),
then the `SessionManager` starts and the gauges and media metrics are registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from aiohttp import web

from engine.api import Engine, ProgressPrinter, create_engine, start_runtime
from stream.auth import Auth
from stream.config import StreamConfig
from stream.errors import ApiError, not_found
from stream.limits import CreationLimit
from stream.media.decode import read_image
from stream.media.encoder import make_executor
from stream.metrics import Labels, Metrics
from stream.session import Session
from stream.sessions import SessionManager
from stream.webrtc import ice_servers_json, restrict_host_addresses

log = logging.getLogger(__name__)

STATE = web.AppKey("state", dict)


def server_of(request: web.Request) -> Server:
    return request.app[STATE]["server"]


class Server:
    """Everything the handlers share; built at start-up, torn down at shutdown."""

    def __init__(self, cfg: StreamConfig, engine: Engine | None = None):
        self.cfg = cfg
        self.auth = Auth.from_config(cfg.server.api_keys, cfg.server.token_ttl_s,
                                     cfg.server.token_secret)
        self.creations = CreationLimit(cfg.server.max_session_creations_per_minute)
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
                # (with the governor's sizes to compile ahead: StreamConfig.engine_config)
                self.engine = await loop.run_in_executor(None, functools.partial(
                    create_engine, self.cfg.engine_config(), ProgressPrinter()))
            engine = self.engine
            runtime = start_runtime(engine, loop, self.cfg.latency.late_audio_s)
            self.manager = SessionManager(self.cfg, engine, runtime, self.auth, self.executor,
                                          self.metrics)
            self.manager.start()
            self._register_metrics()
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

    def _register_metrics(self) -> None:
        manager = self.manager
        assert manager is not None
        runtime = manager.runtime
        sessions = manager.sessions
        m = self.metrics
        m.gauge("avatar_sessions_active", "Sessions running now.", lambda: len(sessions))
        m.gauge("avatar_viewers_active", "Viewers (peers and MPEG-TS) now.",
                lambda: sum(s.viewer_count for s in sessions.values()))
        m.gauge("avatar_ws_connections_active", "Bot WebSocket connections now.",
                lambda: sum(len(s.sockets) for s in sessions.values()))
        m.gauge("avatar_engine_load", "Measured engine load (1 = real time).", runtime.load)
        m.gauge("avatar_engine_skipped_blocks", "Blocks skipped to catch up.",
                lambda: runtime.stats.skipped_blocks)

        def per_session(read: Callable[[Session], float]) -> Iterator[tuple[Labels, float]]:
            for sid, s in list(sessions.items()):
                yield {"session": sid}, read(s)

        for name, text, read in (
                ("avatar_session_playout_delay_seconds", "Each session's playout delay now "
                 "(it follows the measured pipeline, changed at pauses).",
                 lambda s: s.clock.delay),
                ("avatar_session_generation_rung", "Each session's rung of its generation "
                 "ladder (0: the tier it asked for).",
                 lambda s: s.latency.ladder.index(s.latency.tier)),
                ("avatar_session_skipped_blocks", "Blocks the engine skipped for each session "
                 "so as not to fall behind its presentation.",
                 lambda s: s.latency.skipped_blocks)):
            m.family(name, text, "gauge", functools.partial(per_session, read))

        def variants(field: str) -> Iterator[tuple[Labels, float]]:
            for sid, s in list(sessions.items()):
                for v in s.media.figures()["variants"]:
                    yield {"session": sid, "variant": v["variant"]}, v[field]

        def keyframes() -> Iterator[tuple[Labels, float]]:
            for sid, s in list(sessions.items()):
                for v in s.media.figures()["variants"]:
                    for cause, count in v["keyframes"].items():
                        yield {"session": sid, "variant": v["variant"], "cause": cause}, count

        def viewers(field: str) -> Iterator[tuple[Labels, float]]:
            for sid, s in list(sessions.items()):
                for c in s.media.figures()["consumers"]:
                    if c["variant"] is not None:  # video consumers
                        yield {"session": sid, "viewer": c["name"], "kind": c["kind"]}, c[field]

        for name, field, kind, text in (
                ("avatar_media_encode_seconds_total", "encode_seconds", "counter",
                 "Time spent encoding, per session and output variant."),
                ("avatar_media_frames_encoded_total", "frames_encoded", "counter",
                 "Frames encoded, per session and output variant."),
                ("avatar_media_frames_skipped_busy_total", "frames_skipped_busy", "counter",
                 "Frames not encoded because the variant's encoder fell behind (stale)."),
                ("avatar_media_consumers", "consumers", "gauge",
                 "Consumers of each output variant (WebRTC viewers, the TS feed, sockets).")):
            m.family(name, text, kind, functools.partial(variants, field))
        m.family("avatar_media_keyframes_total", "Keyframes per output variant, by cause "
                 "(start, periodic, join, resync, pli, fir).", "counter", keyframes)
        def ts_readers(field: str) -> Iterator[tuple[Labels, float]]:
            for sid, s in list(sessions.items()):
                for r in s.ts.figures() if s.ts is not None else ():
                    yield {"session": sid, "reader": r["reader"]}, r[field]

        m.family("avatar_ts_reader_bytes_total", "Bytes sent to each stream.ts reader.",
                 "counter", functools.partial(ts_readers, "bytes_sent"))
        m.family("avatar_ts_reader_lag_seconds", "Media time waiting for each stream.ts reader "
                 "(cut beyond media.ts_max_lag_s).", "gauge",
                 functools.partial(ts_readers, "lag_s"))
        for name, field, kind, text in (
                ("avatar_viewer_frames_sent_total", "frames_sent", "counter",
                 "Video frames handed to each viewer."),
                ("avatar_viewer_frames_repeated_total", "frames_repeated", "counter",
                 "Frames sent to each viewer that repeat an older picture (engine late)."),
                ("avatar_viewer_frames_skipped_total", "frames_skipped", "counter",
                 "Frame times of its variant each viewer got no frame for."),
                ("avatar_viewer_send_queue_frames", "queue_frames", "gauge",
                 "Video frames waiting in each viewer's send queue.")):
            m.family(name, text, kind, functools.partial(viewers, field))

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


# Requests ---------------------------------------------------------------------------------------


def require_content_type(request: web.Request, *accepted: str) -> None:
    if request.content_type not in accepted:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {request.content_type!r} "
                       f"is not accepted here; send {' or '.join(accepted)}")


def base_url(request: web.Request) -> str:
    public = server_of(request).cfg.server.public_url
    return public.rstrip("/") if public else f"{request.scheme}://{request.host}"


def session_of(request: web.Request, scope: str = "view") -> Session:
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


def session_info(srv: Server, session: Session) -> dict[str, Any]:
    """What a client needs to know of a session, beyond its tokens and links."""
    engine = srv.ready_manager().engine
    return {
        **session.describe(),
        "engine": {"name": engine.name, "preview": engine.name == "preview",
                   "random_weights": bool(getattr(engine, "random_weights", False)),
                   "description": engine.description},
        "ice_servers": ice_servers_json(srv.cfg.webrtc),
        "audio_out": {"sample_rate": 48000},
    }


def links(request: web.Request, session: Session, call_token: str | None) -> dict[str, str]:
    """The session's URLs. Viewer links carry the view token only; the call link is made only
    for whoever was just given the call token (the creator), never handed out again."""
    base, sid, view = base_url(request), session.id, session.viewer_token
    api = f"{base}/v1/sessions/{sid}"
    out = {
        "session": api, "offer": f"{api}/offer", "whep": f"{api}/whep",
        "stream_ts": f"{api}/stream.ts?token={view}",
        "ws": f"{base.replace('http', 'ws', 1)}/v1/sessions/{sid}/ws",
        "obs": f"{base}/obs/{sid}?token={view}",
        "viewer": f"{base}/obs/{sid}?token={view}&audio=1",
    }
    if call_token:
        out["call"] = f"{base}/call?session={sid}&token={call_token}"
    return out


def check_viewer_room(srv: Server, session: Session) -> None:
    if session.viewer_count >= srv.cfg.sessions.max_viewers:
        raise ApiError(429, "too_many_viewers", f"session {session.id} already has "
                       f"{srv.cfg.sessions.max_viewers} viewers (sessions.max_viewers)",
                       retryable=True, headers={"Retry-After": "10"})
