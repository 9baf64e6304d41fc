"""`avatar serve` as the README runs it: the shipped config.toml, no checkpoint, preview engine."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_avatar_serve_with_the_shipped_config() -> None:
    exe = Path(sys.executable).with_name("avatar")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stream.cli"]
    port = free_port()
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    ready = json.load(r)
                    break
            except OSError:
                time.sleep(0.3)
        assert ready is not None, "the server did not come up"
        assert ready["ready"] and ready["engine"] == "preview"
        req = urllib.request.Request(f"{base}/v1/sessions", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            session = json.load(r)
        assert session["engine"]["preview"] is True
        with urllib.request.urlopen(session["urls"]["stream_ts"], timeout=10) as r:
            data = r.read(188 * 200)
        assert data[0] == 0x47 and data[188] == 0x47  # MPEG-TS packets
        with urllib.request.urlopen(f"{base}/call", timeout=5) as r:
            assert b"Start call" in r.read()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "PREVIEW engine" in out  # announced in the log


def test_a_bad_layout_is_refused_before_anything_starts(capsys) -> None:  # noqa: ANN001
    from stream.cli import main

    assert main(["serve", "--layout", "4+gpu"]) == 2
    assert "engine.layout='4+gpu': accepted" in capsys.readouterr().err
    assert main(["render", "--image", "x.jpg", "--audio", "y.wav", "--out", "z.mp4",
                 "--random-weights", "--layout", "0"]) == 2
    assert "engine.layout='0'" in capsys.readouterr().err
