"""Property-based tests (hypothesis) of every parser: over 10,000 generated hostile messages.

In-process: WebSocket control messages, the media header, SDP offers, tokens and config files
each either parse or raise their typed error (naming what is wrong). Against a running server
(the real app on loopback, in a background thread whose loop the test drives): REST bodies,
SDP offers (mutations of a real browser-like offer), credentials and WebSocket messages get a
typed 4xx or an error event, never a 5xx, never an unhandled-exception log line, and leave no
task behind. Counts per parser are in EXAMPLES; the total is asserted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import string
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession, WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.api import ConfigError, EngineConfig
from engine.preview import PreviewEngine
from stream.app import STATE, build_app
from stream.auth import Auth
from stream.config import ServerConfig, SessionsConfig, StreamConfig
from stream.errors import ApiError
from stream.webrtc import check_offer_sdp
from stream.ws.protocol import CLIENT_MESSAGES, ProtocolError, parse_client, unpack_media
from tests.stream.conftest import make_config

EXAMPLES = {"ws_parse": 1500, "media_header": 800, "sdp_parse": 800, "tokens": 1200,
            "config": 1500, "rest": 1500, "sdp_live": 200, "credentials": 600, "ws_live": 2000}
SEEN: dict[str, int] = {}

FAST = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def fast(name: str) -> settings:
    """Deterministic, no example database, EXAMPLES[name] examples."""
    return settings(FAST, max_examples=EXAMPLES[name])


def counted(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Count the examples a test ran (the total is asserted at the end)."""
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> None:
            SEEN[name] = SEEN.get(name, 0) + 1
            fn(*args, **kwargs)
        return inner
    return wrap


# 1. Strategies ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats()
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12)
types = st.sampled_from([*CLIENT_MESSAGES, "session.ready", "", "x" * 300]) | st.text(max_size=20)
client_messages = st.one_of(
    st.fixed_dictionaries({"type": types}, optional={
        "event_id": json_values, "stats_interval_ms": json_values,
        "audio_in": json_values | st.fixed_dictionaries({}, optional={
            "sample_rate": st.integers(-10, 10**9) | json_values,
            "channels": st.integers(-3, 9) | json_values}),
        "output": json_values | st.fixed_dictionaries({}, optional={
            "video": st.sampled_from(["none", "h264", "jpeg", "vp9", ""]) | json_values,
            "audio": json_values, "width": st.integers(-5, 100_000) | json_values,
            "height": st.integers(-5, 100_000) | json_values,
            "fps": st.floats() | st.integers(-5, 1000) | json_values}),
        "extra": json_values}).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200))
header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ",
                      max_size=120)  # what an HTTP client lets through into a header


def offer_mutations(offer: str) -> st.SearchStrategy[str]:
    lines = offer.split("\r\n")

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        out = list(lines)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["drop", "dup", "garble", "insert", "digits"]))
            i = draw(st.integers(0, len(out) - 1))
            if op == "drop" and len(out) > 2:
                del out[i]
            elif op == "dup":
                out.insert(i, out[i])
            elif op == "garble":
                out[i] = out[i][: draw(st.integers(0, len(out[i])))] + draw(
                    st.text(max_size=20))
            elif op == "insert":
                out.insert(i, draw(st.sampled_from(["a=", "m=video 0 X 1", "c=IN IP4 x", "a=fingerprint:sha-256 00",
                                                    "a=ice-ufrag:", "a=rtpmap:96 H264/0"])))
            else:
                out[i] = "".join(draw(st.sampled_from("0123456789-")) if c.isdigit() else c
                                 for c in out[i])
        return "\r\n".join(out)

    return mutate()


# 2. In-process parsers -------------------------------------------------------------------------


@fast("ws_parse")
@given(client_messages)
@counted("ws_parse")
def test_client_messages_parse_or_say_why(text: str) -> None:
    try:
        message = parse_client(text)
    except ProtocolError as exc:
        assert exc.code in ("invalid_json", "unknown_type", "invalid_message") and str(exc)
    else:
        assert message.type in CLIENT_MESSAGES


@fast("media_header")
@given(st.binary(max_size=64))
@counted("media_header")
def test_media_headers_unpack_or_raise(data: bytes) -> None:
    try:
        kind, flags, duration, pts, payload = unpack_media(data)
    except ValueError:
        return
    assert len(payload) <= len(data) - 16 and pts >= 0 and duration >= 0


@fast("sdp_parse")
@given(st.one_of(json_values, st.text(max_size=400),
                 st.text(max_size=400).map(lambda t: "v=0\r\n" + t + "\r\nm=audio 9 X 0")))
@counted("sdp_parse")
def test_sdp_offers_are_checked(body: object) -> None:
    try:
        out = check_offer_sdp(body)
    except ApiError as exc:
        assert exc.status == 400 and exc.code == "malformed_sdp"
    else:
        assert isinstance(out, str) and out.startswith("v=0")


AUTH = Auth(("k" * 20,), 60.0, "s" * 40)


@fast("tokens")
@given(st.one_of(header_text, st.lists(st.text(alphabet=string.ascii_letters + "-_=", max_size=60),
                                       min_size=3, max_size=3).map(".".join),
                 st.builds(lambda claims: jwt.encode(claims, "s" * 40, algorithm="HS256"),
                           st.dictionaries(st.sampled_from(["sid", "scope", "exp", "iat", "sub",
                                                            "nbf", "x"]), json_values,
                                           max_size=6))))
@counted("tokens")
def test_tokens_verify_or_are_refused(token: str) -> None:
    try:
        claims = AUTH.check_token(token, "session-1", "view")
    except ApiError as exc:
        assert exc.status in (401, 403) and exc.code in ("invalid_token", "token_expired",
                                                          "forbidden")
    else:
        assert claims["sid"] == "session-1" and claims["scope"] in ("call", "view")


SECTIONS = ["server", "webrtc", "media", "sessions", "websocket", "avatars", "engine", "x"]
KEYS = ["port", "host", "api_keys", "token_ttl_s", "max_upload_bytes", "ice_servers",
        "video_codecs", "bitrate_kbps", "idle_timeout_s", "max_viewers", "default_size",
        "max_queued_audio_s", "checkpoint", "max_sessions", "sampling", "dtype", "device",
        "cors_origins", "tls_cert", "max_size", "steps", "shift", "nope"]


@fast("config")
@given(st.dictionaries(st.sampled_from(SECTIONS),
                       json_values | st.dictionaries(st.sampled_from(KEYS), json_values,
                                                     max_size=4), max_size=4))
@counted("config")
def test_config_files_load_or_name_the_key(raw: dict) -> None:
    try:
        StreamConfig.parse(raw)
    except ConfigError as exc:
        text = str(exc)
        assert text and (any(k in text for k in [*SECTIONS, *KEYS]) or "[" in text), text


# 3. Against a running server --------------------------------------------------------------------


class Background:
    """The real app on loopback, on an event loop in its own thread; the test submits
    coroutines to it (hypothesis drives synchronous tests)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tasks(self) -> set[str]:
        """Names of the loop's live tasks (but the one asking)."""
        async def names() -> set[str]:
            me = asyncio.current_task()
            return {f"{t.get_name()}:{t.get_coro().__qualname__}" for t in asyncio.all_tasks()
                    if t is not me}
        return self.run(names())


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def live() -> Iterator[dict]:
    bg = Background()
    cfg = make_config(server=ServerConfig(port=0, max_session_creations_per_minute=100_000),
                      sessions=SessionsConfig(default_size="256*128", max_viewers=4))
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)

    async def start() -> dict:
        app = build_app(cfg, PreviewEngine(EngineConfig(max_sessions=64)))
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await asyncio.sleep(0.1)
        me = asyncio.current_task()
        idle = {f"{t.get_name()}:{t.get_coro().__qualname__}" for t in asyncio.all_tasks()
                if t is not me}  # the server's own tasks, before any client
        http = ClientSession()
        async with http.post(f"{base}/v1/sessions", json={}) as r:
            s = await r.json()
        return {"runner": runner, "base": base, "http": http, "s": s, "idle": idle,
                "manager": app[STATE]["server"].manager}

    state = bg.run(start())
    state["bg"], state["errors"] = bg, errors
    yield state

    async def stop() -> None:
        if not state["http"].closed:
            await state["http"].close()
        await state["runner"].cleanup()

    bg.run(stop())
    bg.loop.call_soon_threadsafe(bg.loop.stop)
    bg.thread.join(5)
    logging.getLogger().removeHandler(errors)


def no_errors_logged(live: dict) -> None:
    bad = [r.getMessage() for r in live["errors"].records]
    assert not bad, bad[:5]


@fast("rest")
@given(st.one_of(
    json_values.map(lambda v: ("application/json", json.dumps(v).encode())),
    st.fixed_dictionaries({}, optional={
        "avatar": json_values, "prompt": json_values | st.text(max_size=3000),
        "size": st.sampled_from(["256*128", "64*64", "1*1", "99999*99999", "a*b", "256x"])
        | json_values, "seed": json_values, "image": json_values | st.text(max_size=50),
        "other": json_values}).map(lambda v: ("application/json", json.dumps(v).encode())),
    st.tuples(st.sampled_from(["multipart/form-data; boundary=B", "multipart/form-data",
                               "text/plain", "application/json", "image/png", ""]),
              st.binary(max_size=300))))
@counted("rest")
def test_rest_bodies_get_typed_answers(live: dict, request_body: tuple[str, bytes]) -> None:
    content_type, body = request_body

    async def go() -> None:
        http, base = live["http"], live["base"]
        headers = {"Content-Type": content_type} if content_type else {}
        async with http.post(f"{base}/v1/sessions", data=body, headers=headers) as r:
            assert r.status < 500, (r.status, await r.text())
            answer = await r.json()
            if r.status == 201:  # a valid request: end it again at once
                async with http.delete(answer["urls"]["session"], headers={
                        "Authorization": f"Bearer {answer['token']}"}) as d:
                    assert d.status == 204
            else:
                assert set(answer["error"]) == {"code", "message", "retryable"}

    live["bg"].run(go())


@fast("credentials")
@given(header_text, st.sampled_from(["GET", "POST", "DELETE"]),
       st.sampled_from(["", "/keepalive", "/whep", "/offer", "/stream.ts", "/peers/x", "/ws"]))
@counted("credentials")
def test_credentials_are_refused_typed(live: dict, credential: str, method: str,
                                       path: str) -> None:
    async def go() -> None:
        url = f"{live['base']}/v1/sessions/{live['s']['session_id']}{path}"
        async with live["http"].request(method, url, headers={
                "Authorization": f"Bearer {credential}"}) as r:
            assert r.status in (401, 403, 404, 405), (r.status, await r.text())

    live["bg"].run(go())


@pytest.fixture(scope="module")
def real_offer(live: dict) -> str:
    from aiortc import RTCPeerConnection

    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return live["bg"].run(make())


@fast("sdp_live")
@given(data=st.data())
@counted("sdp_live")
def test_sdp_offers_get_typed_answers(live: dict, real_offer: str, data: st.DataObject) -> None:
    offer = data.draw(offer_mutations(real_offer))

    async def go() -> None:
        s = live["s"]
        async with live["http"].post(s["urls"]["whep"], data=offer.encode(), headers={
                "Content-Type": "application/sdp",
                "Authorization": f"Bearer {s['viewer_token']}"}) as r:
            assert r.status < 500, (r.status, await r.text())
            if r.status == 201:  # it answered: leave again, so viewers do not pile up
                async with live["http"].delete(f"{live['base']}{r.headers['Location']}", headers={
                        "Authorization": f"Bearer {s['viewer_token']}"}) as d:
                    assert d.status in (204, 404)

    live["bg"].run(go())


class Socket:
    """One bot socket of the live session; reopened when the server closes it."""

    def __init__(self, live: dict) -> None:
        self.live = live
        self.ws = None
        self.probes = 0

    async def ensure(self) -> Any:
        if self.ws is None or self.ws.closed:
            s = self.live["s"]
            self.ws = await self.live["http"].ws_connect(
                f"{s['urls']['ws']}?token={s['token']}", max_msg_size=0)
            await self.until(lambda e: e.get("type") == "session.ready")
        return self.ws

    async def until(self, done: Any) -> list[dict]:
        events = []
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 10)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                return events  # closed with a code: the next example reconnects
            if msg.type == WSMsgType.TEXT:
                event = json.loads(msg.data)
                events.append(event)
                if done(event):
                    return events

    async def send(self, message: str | bytes) -> list[dict]:
        ws = await self.ensure()
        if isinstance(message, bytes):
            await ws.send_bytes(message)
        else:
            await ws.send_str(message)
        self.probes += 1
        probe = f"probe-{self.probes}"  # events for the message come before the probe's answer
        await ws.send_str(json.dumps({"type": "session.update", "event_id": probe,
                                      "output": {"video": "none", "audio": False}}))
        return await self.until(lambda e: e.get("client_event_id") == probe)


@pytest.fixture(scope="module")
def socket(live: dict) -> Socket:
    return Socket(live)


@fast("ws_live")
@given(st.one_of(client_messages, st.binary(max_size=2000)))
@counted("ws_live")
def test_websocket_messages_get_error_events_or_work(live: dict, socket: Socket,
                                                     message: str | bytes) -> None:
    events = live["bg"].run(socket.send(message))
    for e in events:
        assert e.get("type") != "error" or e["code"] != "internal", e


def test_after_the_fuzz_nothing_crashed_leaked_or_logged(live: dict, socket: Socket) -> None:
    assert sum(SEEN.values()) >= 10_000, SEEN
    no_errors_logged(live)

    async def health() -> tuple[int, int]:
        async with live["http"].get(f"{live['base']}/readyz") as r:
            ready = r.status
        if socket.ws is not None:
            await socket.ws.close()
        return ready, len(live["manager"].sessions)

    ready, sessions = live["bg"].run(health())
    assert ready == 200 and sessions == 1  # only the fuzz session: every other one ended

    async def leave() -> None:  # the last client goes: its session and connections end
        s = live["s"]
        async with live["http"].delete(s["urls"]["session"], headers={
                "Authorization": f"Bearer {s['token']}"}) as r:
            assert r.status == 204
        await live["http"].close()

    live["bg"].run(leave())
    idle = live["idle"]
    for _ in range(50):
        if live["bg"].tasks() <= idle:
            break
        live["bg"].run(asyncio.sleep(0.2))
    assert live["bg"].tasks() <= idle, live["bg"].tasks() - idle


def test_the_guarded_connect_task_still_exists_in_aiortc() -> None:
    """stream.webrtc.PeerConnection overrides aiortc's private connect task; if aiortc renamed
    it, the override would silently do nothing."""
    from aiortc import RTCPeerConnection

    from stream.webrtc import PeerConnection

    assert callable(getattr(RTCPeerConnection, "_RTCPeerConnection__connect", None))
    assert "_RTCPeerConnection__connect" in PeerConnection.__dict__
    pc = RTCPeerConnection()
    assert hasattr(pc, "_RTCPeerConnection__isClosed")  # the future a failed close leaves
