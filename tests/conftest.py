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


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt_master: Path):
    """The tiny checkpoint loaded on the CPU in float32 (LoRA alpha 2: scale 0.5 at rank 4)."""
    import torch

    from engine.checkpoint.loader import load_models

    return load_models(tiny_ckpt_master, torch.device("cpu"), torch.float32, lora_alpha=2.0)


@pytest.fixture(scope="session")
def example_image(examples: Path):
    from stream.media.decode import read_image

    return read_image(examples / "dwarven_blacksmith.jpg")


@pytest.fixture(scope="session")
def example_audio(examples: Path):
    """17.7 s of speech, 16 kHz mono float32."""
    from stream.media.decode import read_audio

    return read_audio(examples / "dwarven_blacksmith.wav")
