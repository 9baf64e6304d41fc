"""VAE decode beside the next block: the same frames as inline decoding, delivered in order, and
a block is handed over as soon as its own decode is done (no block of added latency).

On a CPU the overlap runs the decode on a worker thread (a GPU uses a second CUDA stream; the
GPU test checks that path): the split submit/collect and its ordering are the same code.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from engine.api import AudioChunk, BlockTimings, FrameBlock, SessionParams
from engine.config import EngineConfig
from engine.decode import DecodeQueue
from engine.generator import StreamGenerator
from engine.runtime import EngineRuntime
from engine.speed.prepare import SpeedState
from engine.wan_engine import WanEngine

BLOCKS = 6


def generate(models, image, audio, speed: SpeedState) -> list[FrameBlock]:  # noqa: ANN001
    gen = StreamGenerator(models, SessionParams(image=image, size="64*64", seed=9), speed=speed)
    gen.push_audio(audio)
    pending, out = [], []
    for _ in range(BLOCKS):  # keep two blocks in flight, as the runtime does
        pending.append(gen.submit_block())
        if len(pending) == 2:
            out.append(pending.pop(0).result())
    out += [p.result() for p in pending]
    return out


def test_overlapped_decode_gives_the_same_frames(tiny_models, example_image,
                                                 example_audio) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 4]
    plain = generate(tiny_models, example_image, audio, SpeedState.plain(tiny_models.device))
    queue = DecodeQueue("thread", tiny_models.device)
    try:
        overlapped = generate(tiny_models, example_image, audio, SpeedState(queue))
    finally:
        queue.close()
    assert [b.index for b in overlapped] == list(range(BLOCKS))
    for a, b in zip(plain, overlapped, strict=True):
        assert a.first_frame == b.first_frame and np.array_equal(a.frames, b.frames)
    t = overlapped[-1].timings
    assert t.decode > 0 and t.postprocess > 0 and len(t.steps) == 4
    # an overlapped decode is off the critical path; an inline one is on it
    assert abs(t.busy - (t.features + t.denoise)) < 1e-9
    p = plain[-1].timings
    assert abs(p.busy - (p.features + p.denoise + p.decode + p.postprocess)) < 1e-9


class FakePending:
    def __init__(self, block: FrameBlock, ready_after: float):
        self.index = block.index
        self._block = block
        self._ready = threading.Event()
        threading.Timer(ready_after, self._ready.set).start()

    def done(self) -> bool:
        return self._ready.is_set()

    def result(self) -> FrameBlock:
        self._ready.wait()
        return self._block


class FakePipelinedSession:
    """Steps take `compute_s` of the engine thread; the decode then `decode_s` beside it."""

    def __init__(self, compute_s: float, decode_s: float):
        self.compute_s, self.decode_s = compute_s, decode_s
        self.block = 0
        self.submitted: dict[int, float] = {}

    @property
    def size(self) -> tuple[int, int]:
        return 16, 8

    def push_audio(self, chunk: AudioChunk) -> None:
        pass

    def ready(self) -> bool:
        return True

    def seek(self, block: int) -> None:
        self.block = block

    def submit_block(self, pad_silence: bool = False) -> FakePending:
        time.sleep(self.compute_s)
        b = self.block
        self.block += 1
        self.submitted[b] = time.monotonic()
        frames = np.full((12, 8, 16, 3), b % 256, np.uint8)
        return FakePending(FrameBlock(b, 12 * b, frames, BlockTimings(busy=self.compute_s)),
                           self.decode_s)

    def next_block(self, pad_silence: bool = False) -> FrameBlock:
        return self.submit_block(pad_silence).result()

    def close(self) -> None:
        pass


class FakeEngine:
    name = "fake"
    description = "fake pipelined engine"
    lookahead_s = 0.0
    max_sessions = 1

    def __init__(self, session: FakePipelinedSession):
        self.session = session

    def open_session(self, params: SessionParams) -> FakePipelinedSession:
        return self.session

    def close(self) -> None:
        pass


async def test_runtime_delivers_each_block_when_its_decode_is_done() -> None:
    # steps of a block: 0.3 s; its decode 0.1 s beside the next block's steps
    session = FakePipelinedSession(compute_s=0.3, decode_s=0.1)
    runtime = EngineRuntime(FakeEngine(session), asyncio.get_running_loop(), max_sessions=1,
                            max_ahead_s=5.0)
    got: list[tuple[float, FrameBlock]] = []
    runtime.admit()
    await runtime.open_session("s", SessionParams(), lambda b: got.append((time.monotonic(), b)),
                               print)
    await asyncio.sleep(2.0)
    load = runtime.load()  # measured from the blocks' busy time: 0.3 s per 0.48 s
    await runtime.aclose()
    assert 0.5 < load < 0.75, load
    indices = [b.index for _, b in got]
    assert indices == list(range(len(indices))) and len(indices) >= 4
    for at, block in got[:-1]:
        latency = at - session.submitted[block.index]
        # its own decode (0.1 s) and a scheduling hop, not the next block's 0.3 s of steps
        assert latency < 0.25, (block.index, latency)
        assert block.frames[0, 0, 0, 0] == block.index % 256
    assert runtime.stats.blocks >= len(indices) - 1


def test_wan_engine_runs_pipelined_through_the_runtime(tiny_models, example_image,
                                                       example_audio) -> None:  # noqa: ANN001
    async def run(overlap: bool) -> list[FrameBlock]:
        engine = WanEngine(tiny_models, EngineConfig(vae_overlap=overlap))
        runtime = EngineRuntime(engine, asyncio.get_running_loop(), max_sessions=1,
                                max_ahead_s=30.0)
        blocks: list[FrameBlock] = []
        four = asyncio.Event()

        def on_block(block: FrameBlock) -> None:
            blocks.append(block)
            if len(blocks) >= 4:
                four.set()

        runtime.admit()
        await runtime.open_session("s", SessionParams(image=example_image, size="64*64",
                                                      seed=4), on_block, print)
        runtime.push_audio("s", AudioChunk(example_audio[:16000 * 3], 0))
        await asyncio.wait_for(four.wait(), 60)
        await runtime.aclose()
        engine.close()
        return blocks

    async def both() -> tuple[list[FrameBlock], list[FrameBlock]]:
        return await run(False), await run(True)

    plain, overlapped = asyncio.run(both())
    assert [b.index for b in overlapped[:4]] == [0, 1, 2, 3]
    for a, b in zip(plain[:4], overlapped[:4], strict=True):
        assert np.array_equal(a.frames, b.frames)
