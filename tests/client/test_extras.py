"""The SDK stands alone (no server packages, no framework), and an adapter whose framework is
missing says how to install it. Each check runs in a fresh interpreter with modules blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked by the test", name=name)
            return None
    sys.meta_path.insert(0, Block())
""")


def run(code: str, blocked: set[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'client' / 'python'}"}
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked) + code],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_sdk_imports_without_the_server_or_any_framework() -> None:
    blocked = {"torch", "engine", "stream", "pipecat", "livekit"}
    proc = run(textwrap.dedent("""
        import avatar_client, avatar_client.media, avatar_client.playback
        import avatar_client.integrations
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok")
    """), blocked)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize(("extra", "package"), [("pipecat", "pipecat-ai"),
                                                ("livekit", "livekit-agents")])
def test_an_adapter_without_its_framework_says_what_to_install(extra: str, package: str) -> None:
    proc = run(textwrap.dedent(f"""
        try:
            import avatar_client.integrations.{extra}
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without its framework")
    """), {extra})
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert f"pip install 'avatar-stream[{extra}]'" in message and package in message, message
