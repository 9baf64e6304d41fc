"""SessionManager: admission against the engine's measured capacity, lookup, timeouts, shutdown.

Capacity. The engine times a block when it starts (`engine.api.engine_block_cost`: the
preview's cost model, or a warm-up session of the Wan engine at max_size on a GPU). Any other
tier's cost is predicted from it with the governor's cost model (steps x area,
stream/governor.py). A session costs, as a share of real time, its tier's block time / 0.48 s;
with the generation governor on, a session may go down to its ladder's cheapest rung, so that is
what admission counts (the governor then finds the best rung that fits the load). A new session
is admitted if the engine's load with it stays under the runtime's `max_load`, the first one
included: it is refused when even its cheapest rung does not fit. It starts at its requested
tier, with a playout delay covering the predicted pipeline, and its latency controller
(stream/latency.py) moves both from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from engine.api import (
    BLOCK_SECONDS,
    FPS,
    BlockCost,
    CapacityExhausted,
    Engine,
    EngineError,
    FrameBlock,
    InputError,
    SessionParams,
    engine_block_cost,
)
from stream.auth import Auth
from stream.config import StreamConfig
from stream.errors import ApiError, not_found
from stream.governor import GenerationConfig, GenerationTier, ladder_from
from stream.media.timeline import MediaClock
from stream.metrics import Metrics
from stream.session import Session

if TYPE_CHECKING:
    from engine.runtime import EngineRuntime

log = logging.getLogger(__name__)

DEFAULT_BLOCK_S = 0.5  # a block's time when nothing has been measured yet
FIT_LOAD = GenerationConfig().fit_load  # a tier fits a session's share below this load


# 1. Capacity ------------------------------------------------------------------------------------


def predicted_seconds(cost: BlockCost, tier: GenerationTier) -> float:
    """Seconds a block takes at `tier`, from the measured `cost`."""
    return cost.seconds * tier.work() / GenerationTier(cost.size, cost.steps).work()


def session_ladder(ladder: tuple[GenerationTier, ...], size: str, steps: int,
                   governed: bool) -> tuple[GenerationTier, ...]:
    """The rungs a session asking for `size` at `steps` may run at."""
    rungs = ladder_from(ladder, size, steps)
    return rungs if governed else rungs[:1]


def session_load(cost: BlockCost, rungs: tuple[GenerationTier, ...]) -> float:
    """The share of real time a session costs at the cheapest of its rungs."""
    return predicted_seconds(cost, rungs[-1]) / BLOCK_SECONDS


def capacity(cost: BlockCost | None, rungs: tuple[GenerationTier, ...], load: float,
             max_load: float, free_slots: int) -> dict[str, Any]:
    """/readyz's account: per rung, its predicted block time and how many more sessions at that
    rung fit beside the load running now; `sessions`: how many more can be admitted (at the
    cheapest rung), None when the engine measured nothing (then only the slots count)."""
    if cost is None:
        return {"sessions": free_slots, "measured": None, "tiers": []}
    tiers = []
    for tier in rungs:
        seconds = predicted_seconds(cost, tier)
        fit = int(max(0.0, max_load - load) // (seconds / BLOCK_SECONDS)) if seconds > 0 \
            else free_slots
        tiers.append({"tier": str(tier), "block_ms": round(seconds * 1000),
                      "load": round(seconds / BLOCK_SECONDS, 3), "sessions": min(fit, free_slots)})
    return {"sessions": tiers[-1]["sessions"] if tiers else free_slots,
            "measured": {"tier": str(GenerationTier(cost.size, cost.steps)),
                         "block_ms": round(cost.seconds * 1000), "source": cost.source},
            "tiers": tiers}


# 2. Sessions ------------------------------------------------------------------------------------


class _EngineControl:
    """The runtime as one session's latency controller sees it (`stream.latency.EngineControl`)."""

    def __init__(self, runtime: EngineRuntime, sid: str):
        self.runtime = runtime
        self.sid = sid

    def set_tier(self, size: str | None, steps: int | None,
                 on_done: Callable[[BaseException | None], None]) -> None:
        self.runtime.set_tier(self.sid, size, steps, on_done)

    def set_playout_delay(self, seconds: float) -> None:
        self.runtime.set_playout_delay(self.sid, seconds)

    def sharing(self) -> int:
        return max(1, self.runtime.active)


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

    def steps_of(self, params: SessionParams) -> int:
        return params.steps or self.cfg.engine.sampling.steps

    def rungs(self, params: SessionParams) -> tuple[GenerationTier, ...]:
        """The generation tiers a session asking for `params` may run at, best first."""
        lat = self.cfg.latency
        return session_ladder(lat.generation_ladder, params.size, self.steps_of(params),
                              lat.governor)

    def playout_delay(self, params: SessionParams) -> float:
        """Media time t is shown at t0 + delay + t: a block's span, the engine's look-ahead,
        how long late audio is waited for, the block's time (predicted from the engine's
        measurement at the best of the session's tiers that fits its share of the engine,
        where the governor takes it within a block or two; else the average so far), and a
        margin for encoding and jitter; from [latency] delay_min_s up to its ceiling
        (`LatencyConfig.longest_delay_s`: the latency target, with the governor on)."""
        cost = engine_block_cost(self.engine)
        stats = self.runtime.stats
        if cost is not None:
            rungs = self.rungs(params)
            share = FIT_LOAD * BLOCK_SECONDS / (self.runtime.active + 1)
            fits = [t for t in rungs if predicted_seconds(cost, t) <= share]
            block = predicted_seconds(cost, fits[0] if fits else rungs[-1])
        else:
            block = stats.block_seconds_total / stats.blocks if stats.blocks else DEFAULT_BLOCK_S
        lat = self.cfg.latency
        delay = (BLOCK_SECONDS + self.engine.lookahead_s + lat.late_audio_s + block
                 + self.cfg.media.playout_margin_s)
        return min(lat.longest_delay_s(self.cfg.media.playout_margin_s),
                   max(lat.delay_min_s, delay))

    def expected_load(self, params: SessionParams) -> float | None:
        """What a session asking for `params` will cost (None: the engine measured nothing)."""
        cost = engine_block_cost(self.engine)
        return None if cost is None else session_load(cost, self.rungs(params))

    async def create(self, params: SessionParams) -> Session:
        try:
            self.runtime.admit(self.expected_load(params))
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
                self.metrics.observe("avatar_block_seconds", block.timings.total)
                media_end = (block.first_frame + len(block.frames)) / FPS
                self.metrics.observe("avatar_block_ready_lag_seconds",
                                     max(0.0, time.monotonic() - s.clock.t0 - media_end))

        def on_error(exc: BaseException) -> None:
            s = holder.get("s")
            if s is not None:
                s.on_engine_error(exc)

        delay = self.playout_delay(params)
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
                              sid, start, end, on_cut),
                          engine=_EngineControl(self.runtime, sid), metrics=self.metrics,
                          tier=GenerationTier(params.size, self.steps_of(params)))
        holder["s"] = session
        self.sessions[sid] = session
        self.metrics.inc("avatar_sessions_created_total")
        log.info("session %s created: %dx%d, playout delay %.2f s, engine %s, tiers %s", sid,
                 opened.size[0], opened.size[1], delay, self.engine.name,
                 " > ".join(str(t) for t in session.latency.ladder))
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
