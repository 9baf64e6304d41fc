"""The package boundary of DESIGN.md section 2, enforced by importing with modules blocked.

`stream` must import with torch unimportable; `engine` must import with aiortc/aiohttp/av
unimportable. Each check runs in a fresh interpreter so nothing is already cached.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

BLOCKER = textwrap.dedent("""
    import importlib.abc, pkgutil, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked by the boundary test")
            return None
    sys.meta_path.insert(0, Block())
    import {package}
    names = [m.name for m in pkgutil.walk_packages({package}.__path__, "{package}.")]
    for name in names:
        __import__(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print(len(names), "modules imported")
""")


def _import_all(package: str, blocked: set[str]) -> str:
    code = BLOCKER.format(blocked=blocked, package=package)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_stream_imports_without_torch() -> None:
    assert "modules imported" in _import_all("stream", {"torch"})


def test_engine_imports_without_network_stack() -> None:
    assert "modules imported" in _import_all("engine", {"aiortc", "aiohttp", "av"})


def test_engine_package_import_is_torch_free() -> None:
    # `import engine` (and its torch-free modules) must stay cheap for the server side
    code = ("import sys; import engine, engine.errors, engine.commands; "
            "assert 'torch' not in sys.modules, 'engine imports torch eagerly'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
