"""`avatar serve` as a child process, for the measuring commands that bring their own server
(`avatar soak`, `avatar latency-probe`, `avatar latency-run`): a free loopback port, the child
started on a config file with its log kept, and a wait until its /readyz says ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(config: Path, log: Path, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """`avatar serve --config CONFIG ARGS...` with its stderr (the log) written to `log`."""
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "serve", "--config",
                             str(config), *args], stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"),  # noqa: SIM115
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def wait_ready(base: str, proc: subprocess.Popen | None, within: float = 60.0,
                     headers: dict[str, str] | None = None,
                     on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Poll `base`/readyz until it answers 200 (its body is returned); RuntimeError if the child
    exits first or `within` seconds pass. `on_status` hears each new not-ready status (loading,
    compiling: minutes with real weights)."""
    deadline, shown = time.monotonic() + within, ""
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, json.JSONDecodeError):
                async with http.get(f"{base}/readyz", headers=headers or {}) as r:
                    if r.status == 200:
                        return dict(await r.json())
                    if on_status is not None:
                        body = await r.json()
                        status = str(body.get("status"))
                        if body.get("error"):
                            status += f": {body['error']}"
                        if status != shown:
                            on_status(status)
                            shown = status
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{base} was not ready within {within:.0f} s")
