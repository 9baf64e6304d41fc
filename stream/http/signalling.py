"""How clients attach to a session: the caller's WebRTC offer/answer (JSON), WHEP viewers
(application/sdp -> 201 + Location, DELETE to leave), and the upgrade to the bot WebSocket
(stream/ws/)."""

from __future__ import annotations

import json

from aiohttp import web

from stream.errors import bad_request, not_found
from stream.http.state import require_content_type, server_of, session_of
from stream.webrtc import check_offer_sdp
from stream.ws.handler import bot_socket


async def offer(request: web.Request) -> web.Response:
    session = session_of(request, "call")
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
    session = session_of(request)
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
    session = session_of(request, "view" if whep_only else "call")
    pid = request.match_info["pid"]
    peer = session.peers.get(pid)
    if peer is None or (whep_only and peer.kind != "whep"):
        raise not_found(f"peer {pid!r}")
    await session.remove_peer(pid)
    return web.Response(status=204)


async def websocket(request: web.Request) -> web.StreamResponse:
    session = session_of(request, "call")
    srv = server_of(request)
    manager = srv.ready_manager()
    engine = manager.engine
    return await bot_socket(request, session, srv.cfg.websocket, srv.metrics,
                            {"name": engine.name, "preview": engine.name == "preview"},
                            manager.runtime.load)
