"""The engine loop thread: deadlines, silence, skip-ahead, admission, clean shutdown."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.api import AudioChunk, BlockTimings, FrameBlock, SessionParams
from engine.errors import CapacityExhausted
from engine.preview import PreviewEngine, mouth_box
from engine.runtime import EngineRuntime


async def open_one(runtime: EngineRuntime, sid: str = "s"):  # noqa: ANN201
    blocks: list[tuple[float, FrameBlock]] = []
    errors: list[BaseException] = []
    runtime.admit()
    opened = await runtime.open_session(sid, SessionParams(size="128*64"),
                                        lambda b: blocks.append((time.monotonic(), b)),
                                        errors.append)
    return blocks, errors, opened.t0


async def test_blocks_come_on_deadline_as_silence_when_no_audio() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=2)
    blocks, _, t0 = await open_one(runtime)
    await asyncio.sleep(1.3)
    await runtime.aclose()
    assert [b.index for _, b in blocks][:2] == [0, 1]
    assert all(b.silent_samples > 0 for _, b in blocks)
    # block 0 is due at t0 + 0.48 s (+ grace), not earlier
    assert blocks[0][0] - t0 >= 0.48


async def test_audio_makes_a_block_start_before_its_deadline() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=2,
                            grace_s=0.5)
    blocks, _, t0 = await open_one(runtime)
    runtime.push_audio("s", AudioChunk(np.zeros(7680, np.float32), 0))
    await asyncio.sleep(0.3)
    await runtime.aclose()
    assert blocks and blocks[0][1].silent_samples == 0 and blocks[0][0] - t0 < 0.3


class SlowEngine(PreviewEngine):
    """A preview engine whose blocks take 0.9 s: slower than real time."""

    def open_session(self, params: SessionParams):  # noqa: ANN201
        inner = super().open_session(params)
        original = inner.next_block

        def slow(pad_silence: bool = False) -> FrameBlock:
            time.sleep(0.9)
            return original(pad_silence)

        inner.next_block = slow  # type: ignore[method-assign]
        return inner


async def test_a_late_session_skips_ahead_instead_of_queueing() -> None:
    runtime = EngineRuntime(SlowEngine(), asyncio.get_running_loop(), max_sessions=2)
    blocks, _, t0 = await open_one(runtime)
    await asyncio.sleep(4.5)
    await runtime.aclose()
    indices = [b.index for _, b in blocks]
    assert runtime.stats.skipped_blocks > 0
    assert indices == sorted(indices) and indices[-1] >= len(indices) + 1
    # after catching up, no block is more than max_lag behind its media time
    at, last = blocks[-1]
    assert at - t0 - (last.index + 1) * 0.48 < 3 * 0.48 + 0.9


async def test_admission_counts_sessions_and_measured_load() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=1)
    await open_one(runtime)
    with pytest.raises(CapacityExhausted):
        runtime.admit()
    runtime.close_session("s")
    await asyncio.sleep(0.1)
    runtime.admit()
    runtime.release()
    slow = EngineRuntime(SlowEngine(), asyncio.get_running_loop(), max_sessions=5)
    await open_one(slow)
    await asyncio.sleep(2.0)
    with pytest.raises(CapacityExhausted, match="real time"):
        slow.admit()  # 0.9 s per 0.48 s block: another session would not keep up
    await runtime.aclose()
    await slow.aclose()


async def test_engine_failure_is_reported_and_the_session_dropped() -> None:
    class Broken(PreviewEngine):
        def open_session(self, params):  # noqa: ANN001, ANN201
            inner = super().open_session(params)

            def boom(pad_silence: bool = False) -> FrameBlock:
                raise RuntimeError("GPU fell over")

            inner.next_block = boom  # type: ignore[method-assign]
            return inner

    runtime = EngineRuntime(Broken(), asyncio.get_running_loop(), max_sessions=1)
    _, errors, _ = await open_one(runtime)
    await asyncio.sleep(0.8)
    assert errors and "GPU fell over" in str(errors[0])
    assert runtime.active == 0 and runtime.stats.failed_sessions == 1
    await runtime.aclose()


async def test_open_errors_reach_the_caller() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=1)
    runtime.admit()
    from engine.errors import InputError

    with pytest.raises(InputError):
        await runtime.open_session("x", SessionParams(size="tiny"), print, print)
    runtime.admit()  # the reservation was released
    runtime.release()
    await runtime.aclose()
    assert not runtime._thread.is_alive()


def test_frameblock_defaults() -> None:
    b = FrameBlock(0, 0, np.zeros((12, 8, 16, 3), np.uint8), BlockTimings())
    assert b.size == (16, 8) and b.fps == 25


async def until(condition, seconds: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert condition()


async def test_cut_audio_silences_from_the_first_block_not_yet_started() -> None:
    """An interrupt's cut: blocks already made keep their speech, later ones are silent, and
    the runtime says exactly where the cut fell."""
    from engine.preview import mouth_opening

    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=2,
                            max_ahead_s=10.0)
    blocks, _, t0 = await open_one(runtime)
    loud = (0.5 * np.sin(2 * np.pi * 220 * np.arange(5 * 7680) / 16000)).astype(np.float32)
    runtime.push_audio("s", AudioChunk(loud[:2 * 7680], 0))  # blocks 0 and 1 are ready now
    await until(lambda: len(blocks) >= 2)
    runtime.push_audio("s", AudioChunk(loud[2 * 7680:], 2 * 7680))
    cuts: list[int] = []
    runtime.cut_audio("s", 100, 5 * 7680, cuts.append)  # asks for 100: blocks 0, 1 are made
    await until(lambda: bool(cuts) and len(blocks) >= 5)
    await runtime.aclose()
    cut = cuts[0]
    assert cut % 7680 == 0 and cut >= 2 * 7680, cut  # a block boundary no block had read
    made = {b.index: b.frames for _, b in blocks}
    h, w = made[0].shape[1:3]
    x0, y0, x1, y1 = mouth_box(w, h)

    def dark(frame: np.ndarray) -> float:
        region = frame[y0:y1, x0:x1].astype(int)
        return float(((region.sum(axis=2) < 150) & (region[:, :, 0] > region[:, :, 2])).mean())

    assert mouth_opening(loud[:640]) > 0.9
    # the preview draws the mouth from the audio each block read: speech before the cut only
    speaking = [b for b in range(5) if min(dark(f) for f in made[b]) > 0.2]
    idle = [b for b in range(5) if max(dark(f) for f in made[b]) < 0.2]  # a closed line
    assert speaking == list(range(cut // 7680)) and idle == list(range(cut // 7680, 5))


async def test_a_tier_change_lands_at_the_next_block() -> None:
    runtime = EngineRuntime(PreviewEngine(), asyncio.get_running_loop(), max_sessions=2)
    blocks, errors, _ = await open_one(runtime)
    runtime.push_audio("s", AudioChunk(np.zeros(7680 * 2, np.float32), 0))
    assert await wait_until(lambda: len(blocks) >= 2)
    done: list = []
    runtime.set_tier("s", size="64*64", on_done=done.append)
    runtime.set_tier("s", size="tiny", on_done=done.append)  # refused; the session goes on
    runtime.set_tier("nobody", steps=3, on_done=done.append)
    runtime.push_audio("s", AudioChunk(np.zeros(7680 * 2, np.float32), 7680 * 2))
    assert await wait_until(lambda: len(blocks) >= 4 and len(done) == 3)
    await runtime.aclose()
    assert done[0] is None and "WIDTH*HEIGHT" in str(done[1]) and isinstance(done[2], KeyError)
    assert [b.size for _, b in blocks[:4]] == [(128, 64)] * 2 + [(64, 64)] * 2
    assert not errors


class Unready(PreviewEngine):
    def health(self):  # noqa: ANN201
        from engine.api import EngineHealth

        return EngineHealth(False, "restarting", "rank 2 died")


async def test_admission_waits_while_the_engine_is_not_ready() -> None:
    runtime = EngineRuntime(Unready(), asyncio.get_running_loop(), max_sessions=2)
    with pytest.raises(CapacityExhausted, match="restarting.*rank 2 died") as err:
        runtime.admit()
    assert err.value.retryable
    await runtime.aclose()


async def wait_until(predicate, seconds: float = 5.0) -> bool:  # noqa: ANN001
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()
