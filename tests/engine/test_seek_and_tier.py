"""Seeks and generation-tier changes on the tiny checkpoint follow engine.session_plan's rule:
after a seek (or a size change) at block N the frames equal those of a fresh session started at N
with the state the rule keeps (the sink), and a step change empties the rings only."""

from __future__ import annotations

import numpy as np
import torch

from engine.api import SessionParams
from engine.generator import StreamGenerator
from engine.sampling import FlowSchedule


def session(models, image, audio, size: str = "64*64", **kw) -> StreamGenerator:  # noqa: ANN001
    gen = StreamGenerator(models, SessionParams(image=image, size=size, seed=11), **kw)
    gen.push_audio(audio)
    return gen


def frames(gen: StreamGenerator, n: int) -> list[np.ndarray]:
    return [gen.next_block().frames for _ in range(n)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_seek_over_the_refresh_block_equals_a_fresh_session_started_there(
        tiny_models, example_image, example_audio) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 9]
    a = session(tiny_models, example_image, audio)
    frames(a, 3)  # blocks 0-2: rings and decoder hold history, block 0's latent is kept
    original = a.cond.sink
    a.seek(10)  # over block 4, where the refresh would have been
    assert a.stages[0].kv.written == 9
    b = session(tiny_models, example_image, audio)
    b.seek(10)
    got, want = frames(a, 4), frames(b, 4)  # blocks 10-13
    assert all(s.kv.written == 12 for s in a.stages)  # emptied at the seek: 4 blocks since
    assert same(got, want)
    assert a.cond.sink is original  # the refresh is the segment's: 4 blocks in, at block 14
    got, want = frames(a, 2), frames(b, 2)
    assert a.cond.sink is not original and same(got, want)


def test_a_seek_after_the_refresh_keeps_the_refreshed_sink(tiny_models, example_image,
                                                            example_audio) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 9]
    kept: dict = {}

    def observe(b, i, x, v, blk) -> None:  # noqa: ANN001
        if b == 0 and i == 3:  # block 0's clean latent: what the refresh re-anchors on
            kept["latent"] = (x + FlowSchedule.make(4, 3.0).delta(3) * v)[:, :, :1].clone()

    a = session(tiny_models, example_image, audio, step_observer=observe)
    frames(a, 6)  # refreshed at block 4
    a.seek(12)
    got = frames(a, 3)
    # a fresh session started at 12 with the same kept state: the refreshed sink
    b = session(tiny_models, example_image, audio)
    b.seek(12)
    with torch.inference_mode():
        b.denoiser.refresh(kept["latent"])
    b.plans.refreshed = True
    assert same(got, frames(b, 3))
    c = session(tiny_models, example_image, audio)  # the original sink gives other frames
    c.seek(12)
    assert not same(got, frames(c, 3))


def test_a_size_change_equals_a_fresh_session_at_that_size(tiny_models, example_image,
                                                            example_audio) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 7]
    a = session(tiny_models, example_image, audio, size="128*64")
    assert frames(a, 2)[0].shape == (12, 64, 128, 3)
    a.set_tier(size="64*64")
    b = session(tiny_models, example_image, audio, size="64*64")
    b.seek(2)
    got, want = frames(a, 6), frames(b, 6)  # blocks 2-7, refreshed at 6 in both
    assert got[0].shape == (12, 64, 64, 3) and (a.width, a.height) == (64, 64)
    assert same(got, want)
    assert a.tier.size == "64*64"


def test_a_step_change_empties_the_rings_and_keeps_sink_and_decoder(
        tiny_models, example_image, example_audio) -> None:  # noqa: ANN001
    audio = example_audio[:16000 * 5]
    vel: dict = {}
    a = session(tiny_models, example_image, audio,
                step_observer=lambda b, i, x, v, blk: vel.setdefault(("a", b, i), v.clone()))
    frames(a, 3)
    decode_cache, sink_values = a.decode_cache, a.stages[0].kv.v[:, :, :a.sink_tokens].clone()
    a.set_tier(steps=3)
    frames(a, 2)  # blocks 3, 4 (4 refreshes the sink as usual: same segment)
    assert len(a.stages) == 3 and a.schedule == FlowSchedule.make(3, 3.0)
    assert all(s.kv.written == 6 for s in a.stages)  # 2 blocks since the change
    assert a.decode_cache is decode_cache  # the decoder runs on across a step change
    # block 3's denoising is that of a fresh 3-step session started at 3 (empty rings, the
    # original sink): velocities equal; only the decoder's history differs
    b = session(tiny_models, example_image, audio,
                step_observer=lambda b, i, x, v, blk: vel.setdefault(("b", b, i), v.clone()))
    b.set_tier(steps=3)
    b.seek(3)
    frames(b, 1)
    for i in range(3):
        torch.testing.assert_close(vel["a", 3, i], vel["b", 3, i], rtol=0, atol=0)
    assert torch.equal(b.stages[0].kv.v[:, :, :b.sink_tokens], sink_values)
    a.set_tier(steps=4)  # back up: a new buffer takes the sink from another step's
    frames(a, 1)
    assert len(a.stages) == 4 and all(s.kv.written == 3 for s in a.stages)
