"""GET /v1/sessions/{id}/stream.ts: the session as MPEG-TS (H.264 + AAC) over plain HTTP, for
OBS's Media Source, ffmpeg and VLC.

Every reader gets the bytes of the session's one TS feed (stream/media/ts_feed.py: encoded and
muxed once), from a keyframe on, at 25 fps with continuous audio. A reader that falls more than
`media.ts_max_lag_s` behind is disconnected (logged) instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket

from aiohttp import web

from stream.http.state import check_viewer_room, server_of, session_of
from stream.media.ts_feed import TsReader

# the kernel's send buffer for one reader: what it holds counts as sent, so it must stay small
# next to media.ts_max_lag_s for a reader that stopped reading to be noticed (128 kB, which
# Linux doubles: about 1.4 s at the top rung's 1.5 Mbit/s)
SEND_BUFFER_BYTES = 128 * 1024


async def stream_ts(request: web.Request) -> web.StreamResponse:
    session = session_of(request)
    srv = server_of(request)
    check_viewer_room(srv, session)
    response = web.StreamResponse(headers={"Content-Type": "video/mp2t",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    rid = f"ts-{secrets.token_urlsafe(6)}"
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    # a reader cut for lagging may be blocked in a write it will never finish: drop the line
    reader = TsReader(rid, srv.cfg.media.ts_max_lag_s,
                      on_cut=transport.abort if transport is not None else None)
    feed = session.ts_feed()
    session.ts_readers[rid] = task
    try:
        await feed.add(reader)
        while (data := await reader.next()) is not None:
            await response.write(data)
            session.touch()
    except ConnectionError:
        pass  # the reader went away (or was cut)
    finally:
        session.ts_readers.pop(rid, None)
        await feed.remove(reader)
    return response
