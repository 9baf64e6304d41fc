"""Shared fixtures: tiny checkpoints written by the project's own CLI, example media paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "examples"


def make_tiny(path: Path, *args: str) -> Path:
    """Write a tiny checkpoint through `avatar make-tiny-checkpoint` (in-process)."""
    from stream.cli import main

    assert main(["make-tiny-checkpoint", str(path), *args]) == 0
    return path


@pytest.fixture(scope="session")
def tiny_ckpt_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "Wan2.2-S2V-14B")


@pytest.fixture
def tiny_ckpt(tiny_ckpt_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "Wan2.2-S2V-14B"
    shutil.copytree(tiny_ckpt_master, dst)
    return dst


@pytest.fixture(scope="session")
def examples() -> Path:
    if not EXAMPLES.is_dir():
        pytest.fail(f"example media not found at {EXAMPLES} (expected ../shared/examples)")
    return EXAMPLES
