"""A pipeline of ranks computes the single-process generator's frames bit for bit (the tiny
checkpoint, float32, gloo on the CPU): for every layout, over >= 20 blocks that cross the sink
refresh, a seek and generation-tier changes; and several sessions interleaved in one pipeline
each get their own single-session frames."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import AudioChunk, FrameBlock, SessionParams
from engine.parallel.engine import ParallelEngine
from tests.engine.parallel.conftest import (
    SCENARIO,
    THREADS,
    reference_blocks,
    run_scenario,
    tiny_config,
)

LAYOUTS = ["1", "2", "4", "4+vae"]


def assert_same(got: list[FrameBlock], want: list[FrameBlock]) -> None:
    assert [(b.index, b.first_frame) for b in got] == [(b.index, b.first_frame) for b in want]
    for g, w in zip(got, want, strict=True):
        assert g.frames.shape == w.frames.shape, g.index
        assert np.array_equal(g.frames, w.frames), f"block {g.index} differs"


@pytest.fixture(scope="module")
def audio(example_audio):  # noqa: ANN001, ANN201
    return example_audio[:16000 * 14]


@pytest.fixture(scope="module")
def reference(tiny_models, tiny_ckpt_master, example_image, audio):  # noqa: ANN001, ANN201
    return reference_blocks(tiny_models, tiny_ckpt_master,
                            SessionParams(image=example_image, size="64*64", seed=5), audio)


@pytest.fixture(scope="module")
def pipelines(tiny_ckpt_master):  # noqa: ANN001, ANN201
    """One engine per layout, started when first asked for, all closed at the end."""
    engines: dict[str, ParallelEngine] = {}

    def get(layout: str) -> ParallelEngine:
        if layout not in engines:
            engines[layout] = ParallelEngine.load(tiny_config(tiny_ckpt_master, layout=layout),
                                                  threads=THREADS)
        return engines[layout]

    yield get
    for engine in engines.values():
        procs = list(engine.processes.values())
        engine.close()
        assert not any(p.is_alive() for p in procs), "a rank outlived its engine"


def test_the_scenario_crosses_what_it_must(reference: list[FrameBlock]) -> None:
    assert len(reference) >= 20
    indices = [b.index for b in reference]
    assert indices == [*range(6), *range(9, 26)]  # the seek
    sizes = [b.size for b in reference]
    assert sizes[:12] == [(64, 64)] * 12 and sizes[12:] == [(128, 64)] * 11  # the size change
    steps = [len(b.timings.steps) for b in reference]
    assert steps[:18] == [4] * 18 and steps[18:] == [6] * 5  # the step change
    assert SCENARIO[0] == ("blocks", 6)  # the refresh at block 4 is inside the first segment


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_single_process_frames(pipelines, reference, example_image,
                                                       audio, layout: str) -> None:  # noqa: ANN001
    engine = pipelines(layout)
    session = engine.open_session(SessionParams(image=example_image, size="64*64", seed=5))
    try:
        got = run_scenario(session, audio, engine.max_in_flight)
    finally:
        session.close()
    assert_same(got, reference)
    t = got[-1].timings
    assert len(t.steps) == 6 and t.busy > 0 and t.total >= t.busy and t.decode > 0


def test_two_sessions_interleaved_each_get_their_own_frames(
        pipelines, tiny_models, tiny_ckpt_master, example_image, audio) -> None:  # noqa: ANN001
    scenario = [("blocks", 6)]
    params = [SessionParams(image=example_image, size="64*64", seed=1),
              SessionParams(image=np.ascontiguousarray(example_image[:, ::-1]), size="64*64",
                            seed=2)]
    want = [reference_blocks(tiny_models, tiny_ckpt_master, p, audio, scenario) for p in params]
    engine = pipelines("4+vae")
    sessions = [engine.open_session(p) for p in params]
    try:
        for s in sessions:
            s.push_audio(AudioChunk(audio, 0))
        pending = [[], []]
        for _ in range(6):  # A0, B0, A1, B1, ...: blocks of both in the stages at once
            for i, s in enumerate(sessions):
                pending[i].append(s.submit_block())
        got = [[p.result() for p in pending[i]] for i in range(2)]
    finally:
        for s in sessions:
            s.close()
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert not np.array_equal(got[0][5].frames, got[1][5].frames)
