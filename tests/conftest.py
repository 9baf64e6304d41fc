"""Shared fixtures: tiny checkpoints written by the project's own CLI, and test media made here
(tests/media.py, imported only by the fixtures that make media): nothing outside the repository
is read."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# tests that run a server against the wall clock (frame rates, latency, A/V sync, soak): under
# pytest-xdist they share one worker and run one after another, never two at once
REALTIME_DIRS = ("tests/stream", "tests/client")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # .ci/test's two workers on CI's two cores: a thread pool each would oversubscribe them
        # (set before anything imports torch or numpy's BLAS; servers the tests start inherit it)
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With `--dist loadgroup` the real-time tests form one group (one worker, in order) and
    the engine's CPU-bound tests fill the other worker; without xdist the marker is inert.
    (The long wall-clock tests run after both, alone: .ci/test's second phase.)"""
    for item in items:
        rel = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
        if rel.startswith(REALTIME_DIRS):
            item.add_marker(pytest.mark.xdist_group("realtime"))


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
def tiny_models(tiny_ckpt_master: Path):
    """The tiny checkpoint loaded on the CPU in float32 (LoRA alpha 2: scale 0.5 at rank 4)."""
    import torch

    from engine.checkpoint.loader import load_models

    return load_models(tiny_ckpt_master, torch.device("cpu"), torch.float32, lora_alpha=2.0)


@dataclasses.dataclass(frozen=True)
class Example:
    """One avatar picture and one speech recording, as files (like a user's inputs)."""

    image: Path
    audio: Path


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Example]:
    """A landscape (720x400) and a portrait (400x720) drawn face, each with espeak-ng speech:
    the shapes of the real examples users try by hand."""
    from tests import media  # (PyAV: not needed by the GPU tests, not on every GPU image)

    folder = tmp_path_factory.mktemp("media")
    try:
        speech = media.espeak_wav(folder / "speech.wav")
        short = media.espeak_wav(folder / "short.wav", media.PARAGRAPH.split(". ")[0])
    except media.MediaToolMissing as exc:
        pytest.fail(str(exc))
    return {
        "landscape": Example(media.write_image(folder / "landscape.jpg",
                                               media.drawn_face(720, 400)), speech),
        "portrait": Example(media.write_image(folder / "portrait.png",
                                              media.drawn_face(400, 720)), short),
    }


@pytest.fixture(scope="session")
def example_image(examples: dict[str, Example]):
    """The landscape example picture, decoded as a user's upload would be (uint8 RGB)."""
    from stream.media.decode import read_image

    return read_image(examples["landscape"].image)


@pytest.fixture(scope="session")
def example_audio(examples: dict[str, Example]):
    """About 22 s of espeak-ng speech, 16 kHz mono float32."""
    from stream.media.decode import read_audio

    return read_audio(examples["landscape"].audio)
