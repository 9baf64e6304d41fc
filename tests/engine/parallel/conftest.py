"""Pipelines of the tiny checkpoint on the CPU (gloo): one group per layout, shared by a module's
tests (starting ranks costs seconds each on these cores), always closed at the end."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.api import AudioChunk, FrameBlock, SessionParams
from engine.config import EngineConfig

THREADS = 1  # torch CPU threads of every rank and of the in-process reference: the same bits

# >= 20 blocks crossing the sink refresh (block 4), a seek (6 -> 9), a size change (at block 15,
# refreshed again at 19) and a step change (at block 21: 6 steps, uneven over 4 DiT ranks)
SCENARIO: list[tuple[str, object]] = [
    ("blocks", 6), ("seek", 9), ("blocks", 6), ("tier", {"size": "128*64"}), ("blocks", 6),
    ("tier", {"steps": 6}), ("blocks", 5)]


def tiny_config(ckpt, **kw) -> EngineConfig:  # noqa: ANN001
    """The tiny checkpoint (LoRA alpha 2, as `tiny_models` loads it), with the group's waits
    bounded for tests and no calibrating warm-up (its figure is not what these tests check)."""
    kw = {"group_start_timeout_s": 120.0, "receive_timeout_s": 30.0, "calibrate": False, **kw}
    return EngineConfig(checkpoint=str(ckpt), lora_alpha=2.0, **kw)


def run_scenario(session, audio, depth: int, scenario=SCENARIO) -> list[FrameBlock]:  # noqa: ANN001
    """Feed `audio`, then follow `scenario`, keeping up to `depth` blocks in flight as the
    runtime does (a seek or tier change lands at the next block submitted)."""
    session.push_audio(AudioChunk(audio, 0))
    out: list[FrameBlock] = []
    pending: deque = deque()
    for op, arg in scenario:
        if op == "blocks":
            for _ in range(arg):  # type: ignore[call-overload]
                pending.append(session.submit_block())
                if len(pending) >= depth:
                    out.append(pending.popleft().result())
        elif op == "seek":
            session.seek(arg)
        else:
            session.set_tier(**arg)  # type: ignore[arg-type]
    return out + [p.result() for p in pending]


@contextmanager
def rank_threads() -> Iterator[None]:
    """This process computes with the ranks' thread count (for a reference of the same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_blocks(tiny_models, tiny_ckpt, params: SessionParams,  # noqa: ANN001
                     audio, scenario=SCENARIO) -> list[FrameBlock]:
    """The single-process generator (the in-process Wan engine), same seed and audio, with the
    ranks' thread count."""
    from engine.wan_engine import WanEngine

    engine = WanEngine(tiny_models, tiny_config(tiny_ckpt))
    try:
        with rank_threads():
            session = engine.open_session(params)
            blocks = run_scenario(session, audio, 2, scenario)
            session.close()
        return blocks
    finally:
        engine.close()
