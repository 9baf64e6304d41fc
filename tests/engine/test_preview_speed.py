"""The slow preview ([engine] preview_speed) and its marks ([engine] preview_marks), and what the
runtime does with a measured cost and a playout delay: admission of the first session, and
skip-ahead where a block would miss its presentation time."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.api import FRAMES_PER_BLOCK, SAMPLES_PER_FRAME, AudioChunk, FrameBlock, SessionParams
from engine.config import EngineConfig
from engine.errors import CapacityExhausted, ConfigError, InputError
from engine.preview import PreviewEngine
from engine.preview_marks import OnsetDetector, draw_marks, onset_patch_lit, read_frame_code
from engine.runtime import EngineRuntime

BLOCK = FRAMES_PER_BLOCK * SAMPLES_PER_FRAME


def timed_block(session, index: int) -> tuple[float, FrameBlock]:  # noqa: ANN001
    session.push_audio(AudioChunk(np.zeros(BLOCK, np.float32), index * BLOCK))
    start = time.perf_counter()
    block = session.next_block()
    return time.perf_counter() - start, block


def test_a_slow_preview_costs_area_times_steps_and_a_block_to_resize() -> None:
    engine = PreviewEngine(EngineConfig(max_size="448*256", preview_speed=2.0))
    assert engine.block_cost().seconds == pytest.approx(0.24) and \
        engine.block_cost().source == "cost model"
    session = engine.open_session(SessionParams(size="448*256"))
    took, block = timed_block(session, 0)
    assert took == pytest.approx(0.24, abs=0.03) and block.size == (448, 256)
    assert block.tier == ("448*256", 4) and block.timings.busy == pytest.approx(took, abs=0.01)
    session.set_tier("224*128", 2)  # about a quarter of the area, half the steps
    took, block = timed_block(session, 1)  # ...and one block of set-up for the new size
    w, h = block.size
    assert w * h < 448 * 256 / 4 and block.tier == ("224*128", 2)
    cost = 0.24 * (w * h) / (448 * 256) * 2 / 4
    assert block.timings.setup == pytest.approx(cost, abs=0.01)
    assert block.timings.busy == pytest.approx(cost, abs=0.015)
    took, block = timed_block(session, 2)
    assert took == pytest.approx(cost, abs=0.015) and block.timings.setup == 0
    session.set_tier(None, 4)  # steps alone: the cost changes, the picture does not
    took, block = timed_block(session, 3)
    assert block.size == (w, h) and took == pytest.approx(2 * cost, abs=0.015)
    with pytest.raises(InputError, match="steps=0"):
        session.set_tier(None, 0)
    with pytest.raises(ConfigError, match="engine.preview_speed"):
        EngineConfig.parse({"preview_speed": -1.0})


def test_marks_read_back_and_mark_onsets() -> None:
    frame = np.full((256, 448, 3), 90, np.uint8)
    for n in (0, 1, 1234, 65535):
        draw_marks(frame, n, onset=n % 2 == 0)
        assert read_frame_code(frame) == n and onset_patch_lit(frame) == (n % 2 == 0)
    frame[-14:, 14:28] = 255 - frame[-14:, 14:28]  # one cell wrong: the parity says so
    assert read_frame_code(frame) is None
    detector = OnsetDetector()
    quiet, loud = np.zeros(640, np.float32), np.full(640, 0.3, np.float32)
    lit = [detector.frame(x) for x in [quiet] * 4 + [loud] * 5 + [quiet] * 4 + [loud]]
    # white for the onset frame and the three after it; again after three quiet frames
    assert lit == [False] * 4 + [True] * 4 + [False] * 5 + [True]


@pytest.mark.parametrize("size", [(344, 196), (256, 146), (320, 184), (704, 402)])
def test_marks_read_back_at_every_output_rungs_scale(size: tuple[int, int]) -> None:
    """An output variant scales the generated frame (448x256 -> 344x196 is the ladder's third
    rung) through the encoder's scaler: the frame number and the patch still read back."""
    import cv2

    for n in (0, 37, 1234, 40000, 65535):
        frame = np.full((256, 448, 3), 90, np.uint8)
        draw_marks(frame, n, onset=n % 2 == 0)
        scaled = cv2.resize(frame, size, interpolation=cv2.INTER_AREA if size[0] < 448
                            else cv2.INTER_LINEAR)
        assert read_frame_code(scaled) == n, (size, n)
        assert onset_patch_lit(scaled) == (n % 2 == 0)


def test_marked_frames_come_from_the_engine() -> None:
    engine = PreviewEngine(EngineConfig(preview_marks=True))
    session = engine.open_session(SessionParams(size="256*128"))
    audio = np.zeros(BLOCK, np.float32)
    audio[5 * SAMPLES_PER_FRAME:] = 0.3  # a sound starts with frame 5
    session.push_audio(AudioChunk(audio, 0))
    block = session.next_block()
    assert [read_frame_code(f) for f in block.frames] == list(range(12))
    assert [onset_patch_lit(f) for f in block.frames] == [i in (5, 6, 7, 8) for i in range(12)]


async def test_skip_ahead_where_a_block_would_miss_its_presentation() -> None:
    # 0.72 s a block (1.5x slower than real time), shown 1.5 s after its media time: from the
    # first blocks on, each would be done later and later, so the runtime skips as soon as one
    # would be done after its frames' time, and every block it makes is shown in part
    engine = PreviewEngine(EngineConfig(max_size="256*128", preview_speed=0.48 / 0.72))
    runtime = EngineRuntime(engine, asyncio.get_running_loop(), max_sessions=2)
    blocks: list[tuple[float, FrameBlock]] = []
    runtime.admit()
    opened = await runtime.open_session("s", SessionParams(size="256*128"),
                                        lambda b: blocks.append((time.monotonic(), b)),
                                        lambda e: None)
    delay = 1.5
    runtime.set_playout_delay("s", delay)
    await asyncio.sleep(7.0)
    await runtime.aclose()
    assert runtime.stats.skipped_blocks >= 2
    for at, b in blocks:  # each block arrives before its last frame's presentation time
        assert at <= opened.t0 + delay + (b.index + 1) * 0.48 + 0.05, (b.index, at - opened.t0)
    indices = [b.index for _, b in blocks]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)


async def test_admission_refuses_the_first_session_when_it_cannot_run_in_real_time() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=4)
    with pytest.raises(CapacityExhausted, match="even at its cheapest tier"):
        runtime.admit(expected_load=1.6)
    runtime.admit(expected_load=0.6)  # the first fits...
    runtime.release()
    await runtime.aclose()
