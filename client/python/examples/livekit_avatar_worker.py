"""A LiveKit avatar worker for avatar-stream: joins a room as an agent's avatar participant.

The agent side is one line (see client/python/README.md):

    avatar = AvatarSession(server="http://127.0.0.1:8080")   # worker in the agent's process
    await avatar.start(session, room=ctx.room)

This program runs the worker elsewhere instead, two ways:

    # one room: with a token for the avatar, or minting one (LIVEKIT_API_KEY/LIVEKIT_API_SECRET)
    python client/python/examples/livekit_avatar_worker.py join --url wss://my.livekit.cloud \
        --token <avatar token> --server http://127.0.0.1:8080
    python client/python/examples/livekit_avatar_worker.py join --url wss://my.livekit.cloud \
        --room my-room --agent <agent identity> --server http://127.0.0.1:8080

    # a dispatcher (the shape of LiveKit's avatar examples): POST /launch {"url", "token"}
    # starts a worker per room; GET /workers lists them
    python client/python/examples/livekit_avatar_worker.py dispatch --listen 127.0.0.1:8089 \
        --server http://127.0.0.1:8080

with the agent launching through it: `AvatarSession(launch=dispatcher("http://host:8089"))`
(`dispatcher` below). Needs `pip install 'avatar-stream[livekit]'` and a running
`avatar serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from avatar_client.integrations.livekit import run_worker
from livekit import api
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

log = logging.getLogger("avatar-worker")


def dispatcher(base: str) -> Callable[[str, str], Awaitable[None]]:
    """An `AvatarSession(launch=...)` that hands the room to a dispatcher at `base`."""

    async def launch(url: str, token: str) -> None:
        async with aiohttp.ClientSession() as http, http.post(
                f"{base.rstrip('/')}/launch", json={"url": url, "token": token}) as r:
            if r.status != 202:
                raise RuntimeError(f"the avatar dispatcher at {base} said {r.status}: "
                                   f"{await r.text()}")

    return launch


def mint(room: str, agent: str, identity: str) -> str:
    key, secret = os.getenv("LIVEKIT_API_KEY"), os.getenv("LIVEKIT_API_SECRET")
    if not (key and secret):
        sys.exit("--room needs LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or pass --token)")
    return (api.AccessToken(key, secret).with_kind("agent").with_identity(identity)
            .with_name("avatar").with_grants(api.VideoGrants(room_join=True, room=room))
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent}).to_jwt())


def dispatch_app(options: dict[str, Any], max_workers: int = 8) -> web.Application:
    """POST /launch {"url", "token"} -> 202 {"worker"}; GET /workers."""
    workers: dict[str, asyncio.Task[None]] = {}
    app = web.Application()

    async def launch(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k]
                                                 for k in ("url", "token")):
            return web.json_response({"error": {"code": "invalid_request", "message":
                                     'POST /launch takes {"url": "wss://<livekit>", "token": '
                                     '"<the avatar participant\'s token>"}'}}, status=400)
        if sum(not t.done() for t in workers.values()) >= max_workers:
            return web.json_response({"error": {"code": "busy", "message": f"{max_workers} "
                                     "workers run already (--max-workers)"}}, status=503)
        wid = f"w-{secrets.token_hex(4)}"
        task = asyncio.create_task(run_worker(body["url"], body["token"], **options),
                                   name=f"avatar-worker-{wid}")
        task.add_done_callback(lambda t: log.info("worker %s ended: %s", wid, "cancelled"
                               if t.cancelled() else t.exception() or "ok"))
        workers[wid] = task
        return web.json_response({"worker": wid}, status=202)

    async def listing(_: web.Request) -> web.Response:
        def state(t: asyncio.Task[None]) -> str:
            if not t.done():
                return "running"
            return "cancelled" if t.cancelled() else f"failed: {t.exception()}" \
                if t.exception() else "ended"
        return web.json_response({wid: state(t) for wid, t in workers.items()})

    async def stop(_: web.Application) -> None:
        for task in workers.values():
            task.cancel()
        await asyncio.gather(*workers.values(), return_exceptions=True)

    app.router.add_post("/launch", launch)
    app.router.add_get("/workers", listing)
    app.on_shutdown.append(stop)
    return app


async def run(args: argparse.Namespace) -> int:
    options = {"server": args.server, "api_key": args.api_key, "video": args.video}
    if args.command == "join":
        if not (args.token or (args.room and args.agent)):
            sys.exit("join needs --token, or --room and --agent to mint one")
        token = args.token or mint(args.room, args.agent, args.identity)
        await run_worker(args.url, token, sender_identity=args.agent, **options)
        return 0
    host, _, port = args.listen.rpartition(":")
    runner = web.AppRunner(dispatch_app(options, args.max_workers))
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    print(f"avatar dispatcher on http://{args.listen}/launch", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="avatar-stream")
    parser.add_argument("--api-key", default=None, help="if the server has [server] api_keys")
    parser.add_argument("--video", choices=("jpeg", "h264"), default="jpeg")
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="be the avatar in one room")
    join.add_argument("--url", required=True, help="the LiveKit server (wss://...)")
    join.add_argument("--token", help="a token for the avatar participant")
    join.add_argument("--room", help="mint a token for this room instead")
    join.add_argument("--agent", default=None, help="the agent's identity (default: the "
                      "first agent in the room)")
    join.add_argument("--identity", default="avatar-stream", help="the avatar's identity")
    dispatch = sub.add_parser("dispatch", help="start a worker per POST /launch")
    dispatch.add_argument("--listen", default="127.0.0.1:8089", help="host:port")
    dispatch.add_argument("--max-workers", type=int, default=8)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
