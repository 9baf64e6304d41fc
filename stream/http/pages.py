"""The pages (call page, OBS page, static files) and the operational endpoints: liveness,
readiness (the engine loaded and warm, capacity left) and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from engine.api import SessionParams, engine_block_cost, engine_health
from stream.http.state import server_of
from stream.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from stream.sessions import capacity as capacity_of

WEB_DIR = Path(__file__).resolve().parents[2] / "client" / "web"


async def page(request: web.Request) -> web.FileResponse:
    name = "call.html" if request.path.startswith("/call") else "obs.html"
    return web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-store"})


async def index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/call")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    srv = server_of(request)
    srv.auth.require_key(request, "reading /readyz")
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
    load = runtime.load()
    cost = engine_block_cost(engine)
    # the tiers a session of the default size may run at, and how many more fit at each
    fits = capacity_of(cost, srv.manager.rungs(SessionParams(size=srv.cfg.sessions.default_size)),
                       load, runtime.max_load, max(0, runtime.max_sessions - runtime.active))
    stalled = runtime.stalled_for()
    alive = runtime.alive and stalled <= srv.cfg.sessions.engine_watchdog_s
    # an engine too slow for one real-time session even at the cheapest tier cannot serve
    too_slow = bool(fits["tiers"]) and fits["tiers"][-1]["load"] > runtime.max_load
    ready = alive and not too_slow
    body: dict[str, Any] = {
        "ready": ready, "status": "stuck" if not alive else "too_slow" if too_slow else "ready",
        "engine": engine.name, "preview": engine.name == "preview",
        "random_weights": bool(getattr(engine, "random_weights", False)),
        "description": engine.description,
        "sessions": runtime.active, "capacity": fits["sessions"] if ready else 0,
        "load": round(load, 3), "block_cost": fits["measured"], "tiers": fits["tiers"],
    }
    if not alive:  # the watchdog: sessions are running but no block has come out
        limit = srv.cfg.sessions.engine_watchdog_s
        body["error"] = ("the engine thread has stopped" if not runtime.alive else
                         f"no block done for {stalled:.1f} s while {runtime.active} sessions "
                         f"run (sessions.engine_watchdog_s = {limit})")
    elif too_slow:
        cheapest = fits["tiers"][-1]
        body["error"] = (f"a block takes {cheapest['block_ms']} ms even at the cheapest tier "
                         f"({cheapest['tier']}), {cheapest['load']:.0%} of real time: no "
                         "session can run in real time (use a faster GPU, more GPUs through "
                         "[engine] layout, or a cheaper [latency] generation_ladder)")
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    server_of(request).auth.require_key(request, "reading /metrics")
    return web.Response(body=server_of(request).metrics.render().encode(),
                        headers={"Content-Type": METRICS_CONTENT_TYPE,
                                 "X-Content-Type-Options": "nosniff"})
