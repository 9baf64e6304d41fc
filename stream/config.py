"""config.toml for the server: read once by the entry point; each package parses its own section.

`stream` owns [server], [webrtc], [media], [sessions], [websocket], [latency] and [avatars];
`engine` owns [engine].
Frozen dataclasses; every validation error names the dotted key and the accepted range.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.api import ConfigError, EngineConfig, InputError, parse_area
from stream.governor import DEFAULT_GENERATION_LADDER, GenerationTier


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (pass --config PATH)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def _parse(cls: type, section: str, raw: Any) -> Any:
    """Fill dataclass `cls` from table `raw`, checking names and types of every key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; accepted: {sorted(known)}")
    values = {}
    defaults = cls()
    for name, value in raw.items():
        want = type(getattr(defaults, name))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is tuple and isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{section}.{name}={value!r}: expected {want.__name__}")
        values[name] = value
    return cls(**values)


def _range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value!r} is out of range: accepted {lo}..{hi}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # API keys (or AVATAR_API_KEYS, comma-separated); empty: development mode, in which only
    # clients on this machine may create sessions or read /readyz and /metrics
    api_keys: tuple = ()
    # signs the call/viewer tokens (JWT HS256; or AVATAR_TOKEN_SECRET): a backend holding it
    # mints links itself, and servers sharing it accept each other's; empty: one per process
    token_secret: str = ""
    # lifetime of the session tokens in call and viewer links; as long as the longest session by
    # default, so an OBS source can still reconnect late in a long stream
    token_ttl_s: float = 4 * 3600.0
    max_upload_bytes: int = 10_000_000
    max_session_creations_per_minute: int = 60  # per API key (development mode: per address)
    public_url: str = ""  # base of returned links; empty: taken from each request's Host
    # browser origins (e.g. "https://app.example.org", or "*") allowed to call the API from
    # their own pages (CORS); empty: only the server's own pages
    cors_origins: tuple = ()
    # HTTPS and WSS on the server's port: a PEM certificate (chain) and its private key (paths
    # relative to the config file). Browsers give the microphone only to https or localhost.
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        _range("server.port", self.port, 0, 65535)
        _range("server.token_ttl_s", self.token_ttl_s, 1.0, 7 * 86400.0)
        _range("server.max_upload_bytes", self.max_upload_bytes, 1024, 200_000_000)
        _range("server.max_session_creations_per_minute", self.max_session_creations_per_minute,
               1, 100_000)
        if not all(isinstance(k, str) and len(k) >= 16 for k in self.api_keys):
            raise ConfigError("server.api_keys: every key must be a string of >= 16 characters")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together: set both (PEM "
                              "files) for HTTPS, or neither")
        if not all(isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://")))
                   for o in self.cors_origins):
            raise ConfigError(f"server.cors_origins={list(self.cors_origins)}: each entry is an "
                              "origin such as \"https://app.example.org\", or \"*\"")
        if self.token_secret and len(self.token_secret) < 32:
            raise ConfigError("server.token_secret: at least 32 characters (e.g. the output of "
                              "`python -c \"import secrets; print(secrets.token_urlsafe(48))\"`)"
                              ", or empty for a secret made per process")


@dataclass(frozen=True)
class WebRTCConfig:
    # [{urls = ["turn:turn.example.org:3478"], username = "u", credential = "p"}, ...];
    # none by default: the server never contacts a public STUN server unless told to
    ice_servers: tuple = ()
    # restrict ICE host candidates to these local addresses (empty: every interface)
    host_addresses: tuple = ()
    video_codecs: tuple = ("H264", "VP8")  # preference order

    def __post_init__(self) -> None:
        for i, server in enumerate(self.ice_servers):
            if not isinstance(server, dict) or "urls" not in server:
                raise ConfigError(f"webrtc.ice_servers[{i}]: expected a table with 'urls'")
            extra = set(server) - {"urls", "username", "credential"}
            if extra:
                raise ConfigError(f"webrtc.ice_servers[{i}]: unknown key(s) {sorted(extra)}")
        bad = [c for c in self.video_codecs if c not in ("H264", "VP8")]
        if bad or not self.video_codecs:
            raise ConfigError(f"webrtc.video_codecs={list(self.video_codecs)}: accepted H264, VP8")


@dataclass(frozen=True)
class Rung:
    """One rung of the output ladder: a pixel-area budget "W*H" (the picture keeps the
    session's aspect, and is never larger than the session's frames), a frame rate (25 or an
    even decimation of it) and a bitrate."""

    size: str
    fps: float = 25.0
    bitrate_kbps: int = 1000

    @property
    def area(self) -> int:
        w, h = (int(p) for p in self.size.lower().replace("x", "*").split("*"))
        return w * h


DEFAULT_LADDER = (Rung("704*384", 25.0, 1500), Rung("528*288", 25.0, 800),
                  Rung("352*192", 25.0, 350), Rung("352*192", 12.5, 200))


def _rungs(raw: tuple) -> tuple[Rung, ...]:
    """media.variants as TOML tables (or Rung values) -> validated Rungs."""
    out = []
    for i, item in enumerate(raw):
        key = f"media.variants[{i}]"
        if isinstance(item, dict):
            extra = sorted(set(item) - {"size", "fps", "bitrate_kbps"})
            if extra or "size" not in item:
                raise ConfigError(f"{key}: expected a table {{size = \"704*384\", fps = 25.0, "
                                  f"bitrate_kbps = 1500}}; got {item!r}")
            try:
                item = Rung(str(item["size"]), float(item.get("fps", 25.0)),
                            int(item.get("bitrate_kbps", 1000)))
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={item!r}: size is \"W*H\", fps a number, "
                                  "bitrate_kbps an integer") from None
        if not isinstance(item, Rung):
            raise ConfigError(f"{key}={item!r}: expected a table with size, fps, bitrate_kbps")
        try:
            area = item.area
        except ValueError:
            raise ConfigError(f"{key}.size={item.size!r}: expected \"W*H\", e.g. "
                              "\"704*384\"") from None
        _range(f"{key}.size (area)", area, 16 * 16, 4096 * 4096)
        _range(f"{key}.fps", item.fps, 1.0, 25.0)
        _range(f"{key}.bitrate_kbps", item.bitrate_kbps, 50, 50_000)
        out.append(item)
    if not out:
        raise ConfigError("media.variants is empty: give at least one rung, e.g. "
                          "[{size = \"704*384\", fps = 25.0, bitrate_kbps = 1500}]")
    rates = [r.bitrate_kbps for r in out]
    if rates != sorted(rates, reverse=True):
        raise ConfigError(f"media.variants: bitrates {rates} must not increase down the ladder "
                          "(the first rung is the best, each next one cheaper)")
    return tuple(out)


@dataclass(frozen=True)
class MediaConfig:
    encoder: str = "libx264"  # PyAV encoder for H.264 (pre-encoded packets to aiortc)
    preset: str = "ultrafast"
    tune: str = "zerolatency"
    # H.264 bitrate of WebSocket video at the session's full size (smaller sizes get it scaled
    # by their area); WebRTC and MPEG-TS viewers use the `variants` ladder
    bitrate_kbps: int = 1500
    # the output ladder, best first (pixel-area budgets in the session's aspect): each WebRTC
    # viewer gets the best rung its path carries (REMB, loss, send queue); MPEG-TS the first
    variants: tuple = DEFAULT_LADDER
    adapt_variants: bool = True  # move WebRTC viewers along the ladder (False: always the first)
    keyframe_interval_s: float = 1.0
    # keyframes on a viewer's PLI/FIR (or a consumer resynchronising) per variant: a burst of
    # 2, then at most this many a second (the rest wait, then share one); joins have their own
    keyframe_requests_per_s: float = 1.0
    opus_bitrate_kbps: int = 64  # WebRTC audio (Opus, 40 ms packets, encoded once per session)
    aac_bitrate_kbps: int = 96  # MPEG-TS audio (AAC-LC, encoded once per session)
    ts_max_lag_s: float = 5.0  # an MPEG-TS reader this far behind the stream is disconnected
    encoder_threads: int = 2  # the dedicated encoding executor
    playout_margin_s: float = 0.15  # added to the engine's latency for the playout delay
    jpeg_qscale: int = 3  # JPEG frames on the WebSocket: 2 (best) .. 31 (smallest)

    def __post_init__(self) -> None:
        _range("media.bitrate_kbps", self.bitrate_kbps, 100, 50_000)
        _range("media.jpeg_qscale", self.jpeg_qscale, 2, 31)
        _range("media.keyframe_interval_s", self.keyframe_interval_s, 0.2, 10.0)
        _range("media.keyframe_requests_per_s", self.keyframe_requests_per_s, 0.1, 25.0)
        _range("media.opus_bitrate_kbps", self.opus_bitrate_kbps, 6, 510)
        _range("media.aac_bitrate_kbps", self.aac_bitrate_kbps, 32, 320)
        _range("media.ts_max_lag_s", self.ts_max_lag_s, 0.5, 60.0)
        _range("media.encoder_threads", self.encoder_threads, 1, 32)
        _range("media.playout_margin_s", self.playout_margin_s, 0.0, 5.0)
        object.__setattr__(self, "variants", _rungs(self.variants))


@dataclass(frozen=True)
class SessionsConfig:
    idle_timeout_s: float = 120.0  # no viewer, no audio and no keep-alive for this long: end
    max_length_s: float = 4 * 3600.0
    max_viewers: int = 16
    default_size: str = "704*384"
    max_image_side: int = 8192  # uploaded avatar pictures: larger sides are refused (415)
    # sessions running and no block done for this long: the engine is stuck (/readyz says so)
    engine_watchdog_s: float = 30.0

    def __post_init__(self) -> None:
        _range("sessions.idle_timeout_s", self.idle_timeout_s, 1.0, 86400.0)
        _range("sessions.max_length_s", self.max_length_s, 1.0, 30 * 86400.0)
        _range("sessions.max_viewers", self.max_viewers, 1, 1000)
        _range("sessions.max_image_side", self.max_image_side, 64, 16384)
        _range("sessions.engine_watchdog_s", self.engine_watchdog_s, 1.0, 3600.0)


@dataclass(frozen=True)
class WebSocketConfig:
    """The chatbot WebSocket API (stream/ws/). Audio is never dropped: a full queue stops the
    server reading the socket (TCP back-pressure) until the session has played enough of it."""

    max_queued_audio_s: float = 30.0  # audio a bot may send ahead of what entered the session
    release_ahead_s: float = 0.5  # audio enters the session at most this far ahead of real time
    max_message_bytes: int = 1_048_576  # a larger message closes the socket with 1009
    max_messages_per_s: int = 500  # above this rate the server reads slower (`rate_limited`)
    send_timeout_s: float = 10.0  # a client that takes no message for this long is closed (1008)
    heartbeat_s: float = 15.0  # ping period; no pong within half of it closes the socket
    stats_interval_s: float = 1.0  # default period of `stats` events (0: off)
    max_pending_events: int = 256  # events waiting to be sent; beyond it the socket is closed

    def __post_init__(self) -> None:
        _range("websocket.max_queued_audio_s", self.max_queued_audio_s, 1.0, 600.0)
        # the playout ring holds the playout delay + 10 s: a source may be at most 5 s ahead
        _range("websocket.release_ahead_s", self.release_ahead_s, 0.1, 5.0)
        _range("websocket.max_message_bytes", self.max_message_bytes, 1024, 64 * 1024 * 1024)
        _range("websocket.max_messages_per_s", self.max_messages_per_s, 10, 100_000)
        _range("websocket.send_timeout_s", self.send_timeout_s, 0.5, 600.0)
        _range("websocket.heartbeat_s", self.heartbeat_s, 1.0, 600.0)
        _range("websocket.stats_interval_s", self.stats_interval_s, 0.0, 3600.0)
        _range("websocket.max_pending_events", self.max_pending_events, 16, 100_000)


def _generation_rungs(raw: tuple) -> tuple[GenerationTier, ...]:
    """latency.generation_ladder as TOML tables (or GenerationTier values) -> validated."""
    out = []
    for i, item in enumerate(raw):
        key = f"latency.generation_ladder[{i}]"
        if isinstance(item, dict):
            if sorted(item) != ["size", "steps"] or not isinstance(item["size"], str) or \
                    not isinstance(item["steps"], int) or isinstance(item["steps"], bool):
                raise ConfigError(f"{key}: expected a table {{size = \"448*256\", steps = 3}}; "
                                  f"got {item!r}")
            item = GenerationTier(item["size"], item["steps"])
        if not isinstance(item, GenerationTier):
            raise ConfigError(f"{key}={item!r}: expected a table with size and steps")
        try:
            parse_area(item.size)
        except InputError as exc:
            raise ConfigError(f"{key}.size: {exc}") from None
        _range(f"{key}.steps", item.steps, 1, 50)
        out.append(item)
    if not out:
        raise ConfigError("latency.generation_ladder is empty: give at least one rung, e.g. "
                          "[{size = \"704*384\", steps = 4}]")
    work = [t.work() for t in out]
    if work != sorted(work, reverse=True) or len(set(work)) != len(work):
        raise ConfigError(f"latency.generation_ladder: {[str(t) for t in out]}: each rung must "
                          "cost less than the one before (a smaller area, or fewer steps)")
    return tuple(out)


@dataclass(frozen=True)
class LatencyConfig:
    """[latency]: the generation governor, the playout delay and late audio (docs/latency.md)."""

    # a generation tier per session from its measured block time, lateness and latency (false:
    # every session stays at its requested size and steps)
    governor: bool = True
    # the playout delay follows the measured pipeline, changed at pauses (false: fixed when the
    # session starts)
    adaptive_delay: bool = True
    target_s: float = 1.5  # audio in -> frame out the governor keeps latency under
    # best first; a session starts at its requested size and may go down to the rungs below it
    generation_ladder: tuple = DEFAULT_GENERATION_LADDER
    down_blocks: int = 2  # bad blocks in a row before a step down (one, if far over budget)
    up_blocks: int = 20  # good blocks in a row before a step up is tried
    delay_min_s: float = 0.3
    delay_max_s: float = 3.0
    delay_window_s: float = 6.0  # the delay covers the slowest block of this much history
    delay_shrink_s: float = 0.12  # at most this much shorter per block, at pauses only
    # one setting: a block waits this long past its real-time deadline for late audio before
    # the missing audio is silence, and input audio later than this is re-anchored
    late_audio_s: float = 0.3
    pause_dbfs: float = -40.0  # playout audio under this is a pause (where the delay changes)

    def longest_delay_s(self, margin_s: float) -> float:
        """The playout delay's ceiling. With the governor on it is the latency target less the
        margin (encoding and sending): the delay never carries latency past the target; a
        block that would need more is shown late or skipped while the governor steps down."""
        if not self.governor:
            return self.delay_max_s
        return max(self.delay_min_s, min(self.delay_max_s, self.target_s - margin_s))

    def __post_init__(self) -> None:
        _range("latency.target_s", self.target_s, 0.2, 30.0)
        _range("latency.down_blocks", self.down_blocks, 1, 100)
        _range("latency.up_blocks", self.up_blocks, 1, 10_000)
        _range("latency.delay_min_s", self.delay_min_s, 0.0, 10.0)
        _range("latency.delay_max_s", self.delay_max_s, self.delay_min_s, 30.0)
        _range("latency.delay_window_s", self.delay_window_s, 0.48, 120.0)
        _range("latency.delay_shrink_s", self.delay_shrink_s, 0.0, 0.48)
        _range("latency.late_audio_s", self.late_audio_s, 0.02, 2.0)
        _range("latency.pause_dbfs", self.pause_dbfs, -90.0, -10.0)
        object.__setattr__(self, "generation_ladder", _generation_rungs(self.generation_ladder))


@dataclass(frozen=True)
class StreamConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    webrtc: WebRTCConfig = field(default_factory=WebRTCConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    avatars: dict[str, str] = field(default_factory=dict)  # name -> image path
    engine: EngineConfig = field(default_factory=EngineConfig)

    @classmethod
    def parse(cls, raw: dict[str, Any], base_dir: Path | None = None) -> StreamConfig:
        known = {"server", "webrtc", "media", "sessions", "websocket", "latency", "avatars",
                 "engine"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config has unknown section(s) {unknown}; accepted: {sorted(known)}")
        avatars = raw.get("avatars", {})
        if not isinstance(avatars, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in avatars.items()):
            raise ConfigError("[avatars] maps names to image paths: name = \"path/to/image.jpg\"")
        base = base_dir or Path.cwd()
        avatars = {k: str((base / v).resolve()) if v else "" for k, v in avatars.items()}
        server_raw = raw.get("server")
        if isinstance(server_raw, dict):  # TLS files are relative to the config file
            server_raw = {k: str((base / v).resolve()) if k in ("tls_cert", "tls_key") and v
                          and isinstance(v, str) else v for k, v in server_raw.items()}
        engine_raw = raw.get("engine", {})
        if not isinstance(engine_raw, dict):
            raise ConfigError(f"[engine] must be a table, got {engine_raw!r}")
        engine_raw = dict(engine_raw)
        if engine_raw.get("checkpoint") and isinstance(engine_raw["checkpoint"], str):
            engine_raw["checkpoint"] = str((base / engine_raw["checkpoint"]).resolve())
        return cls(
            server=_parse(ServerConfig, "server", server_raw),
            webrtc=_parse(WebRTCConfig, "webrtc", raw.get("webrtc")),
            media=_parse(MediaConfig, "media", raw.get("media")),
            sessions=_parse(SessionsConfig, "sessions", raw.get("sessions")),
            websocket=_parse(WebSocketConfig, "websocket", raw.get("websocket")),
            latency=_parse(LatencyConfig, "latency", raw.get("latency")),
            avatars=avatars,
            engine=EngineConfig.parse(engine_raw),
        )

    def engine_config(self) -> EngineConfig:
        """[engine] as the server starts it: with the latency governor on, its ladder's sizes
        (those within max_size) added to `warm_up_sizes`, so that a compiling engine compiles
        them before it reports ready and a step down never waits for a compile."""
        if not self.latency.governor:
            return self.engine
        top = parse_area(self.engine.max_size)
        sizes = [s.strip() for s in self.engine.warm_up_sizes.split(",") if s.strip()]
        for tier in self.latency.generation_ladder:
            if parse_area(tier.size) <= top and tier.size not in sizes:
                sizes.append(tier.size)
        return replace(self.engine, warm_up_sizes=",".join(sizes))

    @classmethod
    def load(cls, path: str | Path | None) -> StreamConfig:
        if path is None:
            return cls()
        return cls.parse(load_toml(path), Path(path).resolve().parent)
