"""SessionManager: admission against the engine's measured capacity, lookup, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from engine.api import (
    BLOCK_SECONDS,
    CapacityExhausted,
    Engine,
    EngineError,
    FrameBlock,
    InputError,
    SessionParams,
)
from stream.auth import Auth
from stream.config import StreamConfig
from stream.errors import ApiError, not_found
from stream.media.timeline import MediaClock
from stream.metrics import Metrics
from stream.session import Session

if TYPE_CHECKING:
    from engine.runtime import EngineRuntime

log = logging.getLogger(__name__)

ENGINE_GRACE_S = 0.05  # the runtime's deadline grace


class SessionManager:
    def __init__(self, cfg: StreamConfig, engine: Engine, runtime: EngineRuntime, auth: Auth,
                 executor: Executor, metrics: Metrics):
        self.cfg = cfg
        self.engine = engine
        self.runtime = runtime
        self.auth = auth
        self.executor = executor
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(),
                                                                name="session-watchdog")

    def playout_delay(self) -> float:
        """Media time t is shown at t0 + delay + t: a block's span, the engine's look-ahead
        and compute time, and a margin for encoding and jitter."""
        measured = (self.runtime.stats.block_seconds_total / self.runtime.stats.blocks
                    if self.runtime.stats.blocks else getattr(self.engine,
                                                              "expected_block_seconds", 0.5))
        return (BLOCK_SECONDS + self.engine.lookahead_s + ENGINE_GRACE_S + measured
                + self.cfg.media.playout_margin_s)

    async def create(self, params: SessionParams) -> Session:
        try:
            self.runtime.admit()
        except CapacityExhausted as exc:
            self.metrics.inc("avatar_sessions_rejected_total", reason="capacity")
            raise ApiError(503, "capacity_exhausted", str(exc), retryable=True,
                           headers={"Retry-After": str(round(exc.retry_after))}) from None
        sid = secrets.token_urlsafe(9)
        holder: dict[str, Session] = {}

        def on_block(block: FrameBlock) -> None:  # engine callbacks run on the loop
            s = holder.get("s")
            if s is not None:
                s.on_block(block)
                self.metrics.inc("avatar_blocks_total")

        def on_error(exc: BaseException) -> None:
            s = holder.get("s")
            if s is not None:
                s.on_engine_error(exc)

        delay = self.playout_delay()
        try:
            opened = await self.runtime.open_session(sid, params, on_block, on_error)
        except InputError as exc:
            raise ApiError(422, "invalid_session_params", str(exc)) from None
        except EngineError as exc:
            raise ApiError(500, "engine_error", str(exc), retryable=exc.retryable) from None
        token, expires = self.auth.issue(sid, "call")
        viewer_token, _ = self.auth.issue(sid, "view")
        clock = MediaClock(opened.t0, delay)
        session = Session(sid, token, viewer_token, expires, opened.size, clock, self.cfg,
                          self.executor,
                          push_audio=lambda chunk: self.runtime.push_audio(sid, chunk),
                          close_engine=lambda: self.runtime.close_session(sid),
                          on_closed=self._forget, avatar=opened.info,
                          cut_audio=lambda start, end, on_cut: self.runtime.cut_audio(
                              sid, start, end, on_cut))
        holder["s"] = session
        self.sessions[sid] = session
        self.metrics.inc("avatar_sessions_created_total")
        log.info("session %s created: %dx%d, playout delay %.2f s, engine %s", sid,
                 opened.size[0], opened.size[1], delay, self.engine.name)
        if opened.info.get("note"):
            log.warning("session %s: %s", sid, opened.info["note"])
        return session

    def get(self, sid: str) -> Session:
        session = self.sessions.get(sid)
        if session is None or session.closed.is_set():
            raise not_found(f"session {sid!r}")
        return session

    async def delete(self, sid: str, reason: str = "deleted by the client") -> None:
        await self.get(sid).aclose(reason)

    async def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.metrics.inc("avatar_sessions_ended_total", reason=session.close_reason.split(":")[0])

    async def _watch(self) -> None:
        limits = self.cfg.sessions
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                try:
                    await session.drop_stalled()
                    if session.idle_for() > limits.idle_timeout_s:
                        await session.aclose("idle timeout")
                    elif now - session.created > limits.max_length_s:
                        await session.aclose("maximum length reached")
                except Exception:  # one broken teardown must not stop the watchdog
                    log.exception("ending session %s failed", session.id)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for session in list(self.sessions.values()):
            await session.aclose("server shutdown")
