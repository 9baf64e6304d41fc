"""`avatar serve`: load config.toml, build the app, serve until interrupted."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import ssl
import sys
from pathlib import Path

from aiohttp import web

from engine.api import ConfigError, EngineConfig
from engine.parallel.layout import Layout
from stream.app import AccessLogger, build_app
from stream.config import ServerConfig, StreamConfig

log = logging.getLogger(__name__)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the avatar server (preview engine if no checkpoint)")
    p.add_argument("--config", default=None,
                   help="config.toml (default: ./config.toml if present, else built-in defaults)")
    p.add_argument("--host", default=None, help="override [server] host")
    p.add_argument("--port", type=int, default=None, help="override [server] port")
    p.add_argument("--random-weights", action="store_true",
                   help="the real engine at real shapes with random weights and no checkpoint "
                        "(to run and measure the server on a GPU without the weights)")
    add_layout_argument(p)
    p.set_defaults(func=run_command)


def add_layout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default=None,
                   help="override [engine] layout: \"1\" (one process), \"k\" (k GPUs, one "
                        "share of the denoising steps each, the last also decoding) or "
                        "\"k+vae\" (and one more GPU that only decodes), e.g. 4+vae")


def with_layout(engine: EngineConfig, layout: str | None) -> EngineConfig:
    """`--layout`: the same [engine] settings on another pipeline layout (validated)."""
    if layout is None:
        return engine
    out = dataclasses.replace(engine, layout=layout)
    out.validate()
    return out


def run_command(args: argparse.Namespace) -> int:
    path = args.config or ("config.toml" if Path("config.toml").exists() else None)
    try:
        cfg = StreamConfig.load(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.random_weights:
            cfg = dataclasses.replace(cfg, engine=with_random_weights(cfg.engine))
        cfg = dataclasses.replace(cfg, engine=with_layout(cfg.engine, args.layout))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    if cfg.engine.random_weights:
        engine = "RANDOM WEIGHTS (the real engine at real shapes, no checkpoint: video is noise)"
    elif cfg.engine.checkpoint:
        engine = f"the model at {cfg.engine.checkpoint}"
    else:
        engine = "the PREVIEW engine (no checkpoint configured)"
    try:
        tls = ssl_context(cfg.server)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = Layout.parse(cfg.engine.layout)
    if not layout.single:
        engine += f", on a pipeline of {layout.world} ranks (layout {layout})"
    scheme = "https" if tls else "http"
    print(f"avatar server on {scheme}://{host}:{port}/call with {engine}; config: "
          f"{path or 'built-in defaults'}", flush=True)
    web.run_app(build_app(cfg), host=host, port=port, print=None, shutdown_timeout=5.0,
                access_log_class=AccessLogger, ssl_context=tls)
    return 0


def ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS (and WSS) from [server] tls_cert and tls_key, or None for plain HTTP."""
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except FileNotFoundError as exc:
        raise ConfigError(f"server.tls_cert / server.tls_key: {exc.filename} does not "
                          "exist") from None
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"server.tls_cert={cfg.tls_cert!r} with server.tls_key="
                          f"{cfg.tls_key!r}: not a PEM certificate and its key ({exc})") from None
    return context


def with_random_weights(engine: EngineConfig) -> EngineConfig:
    """`--random-weights`: the same [engine] settings, with random weights instead of weights."""
    if engine.checkpoint:
        log.warning("--random-weights: ignoring [engine] checkpoint = %r", engine.checkpoint)
    out = dataclasses.replace(engine, checkpoint="", random_weights=True)
    out.validate()
    return out
