"""The sessions REST API: create (JSON or a multipart form with an uploaded picture), look up,
end, keep alive. Errors are the JSON `{"error": {...}}` of stream/errors.py."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from engine.api import DEFAULT_PROMPT, SessionParams
from stream.errors import ApiError, bad_request
from stream.http.state import (
    base_url,
    require_content_type,
    server_of,
    session_info,
    session_of,
)
from stream.media.decode import MediaError, read_image


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
        **session_info(srv, session),
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


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(session_info(server_of(request), session_of(request)))


async def delete_session(request: web.Request) -> web.Response:
    session = session_of(request, "call")
    await session.aclose("deleted by the client")
    return web.Response(status=204)


async def keepalive(request: web.Request) -> web.Response:
    session_of(request).touch()
    return web.Response(status=204)
