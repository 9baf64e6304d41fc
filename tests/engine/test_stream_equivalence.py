"""Block-by-block generation with KV rings == a reference forward with no cache, per step.

The reference recomputes, for block b at step i, every token from scratch: the sink tokens (each
attending only to the sink), and the step-i inputs of blocks 0..b, layer by layer, block j
attending to the blocks of its window (the last ring_frames latent frames, itself included) with
keys at their absolute RoPE positions, plus the sink with its reference keys placed at
max(30, first frame of j + d). It shares the model's layers (projections, norms, FFN) but none of
the streaming machinery: no KVRing, no RingAttention, no prefill_sink, no stored keys.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine.api import SessionParams
from engine.generator import BlockInput, StreamConfig, StreamGenerator
from engine.models.attention import attend
from engine.models.rope import apply_rope, rope_cos_sin

BLOCKS = 6  # crosses the ring wrap (block 4) and the sink refresh (block 4)


class Record:
    def __init__(self) -> None:
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.velocity: dict[tuple[int, int], torch.Tensor] = {}
        self.blocks: dict[int, BlockInput] = {}

    def __call__(self, b: int, i: int, x: torch.Tensor, v: torch.Tensor, blk: BlockInput) -> None:
        self.inputs[b, i] = x.clone()
        self.velocity[b, i] = v.clone()
        self.blocks[b] = blk


def reference_velocity(dit, text, sinks, window, rec: Record, b: int, i: int, t: float,
                       ring_blocks: int) -> torch.Tensor:
    """Velocity of block b at step i from scratch (see module docstring)."""
    cfg = dit.cfg
    bands = cfg.rope_bands
    _, _, f, hh, ww = rec.inputs[b, i].shape
    # sink streams: (tokens [1, 1, Ls, D], prefill positions, ref token count)
    sink_h = {name: tok[:, None] for name, (tok, _, _) in sinks.items()}
    sink_rope = {name: rope_cos_sin(pos, bands) for name, (_, pos, _) in sinks.items()}
    _, e0_zero = dit.time_embedding_of(torch.zeros(1, 1))
    # block streams
    hs = []
    for j in range(b + 1):
        x = dit.patch_embedding(rec.inputs[j, i])
        x = x + dit.cond_encoder.bias[:, None, None, None]
        hs.append(x.flatten(3).permute(0, 2, 3, 1) + dit.trainable_cond_mask.weight[0])
    e, e0 = dit.time_embedding_of(torch.full((1, f), t))
    positions = [dit.noisy_positions(j * f, f, hh, ww) for j in range(b + 1)]

    for layer, block in enumerate(dit.blocks):
        tk, tv = text.layer(layer)
        # the sinks: dense attention among their own tokens, un-roped K/V kept for the blocks
        sink_kv = {}
        for name in sinks:
            def sink_attn(_l, q, k, v, name=name, sink_kv=sink_kv):
                sink_kv[name] = (k, v)
                c, s = sink_rope[name]
                return attend(apply_rope(q, c, s), apply_rope(k, c, s), v)
            sink_h[name] = block(sink_h[name], e0_zero, layer, sink_attn, tk, tv)
        # the blocks, in order; each attends to its window and to its sink
        keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        new_hs = []
        for j in range(b + 1):
            name = window(j)
            ref_ahead = rec.blocks[j].ref_ahead[i]
            sink_pos = sinks[name][1].copy()
            sink_pos[: sinks[name][2], 0] = max(cfg.ref_time, j * f + ref_ahead)

            def block_attn(_l, q, k, v, j=j, name=name, sink_pos=sink_pos, keys=keys,
                           sink_kv=sink_kv):
                c, s = rope_cos_sin(positions[j], bands)
                keys[j] = (apply_rope(k, c, s), v)
                hist = range(max(0, j - ring_blocks + 1), j + 1)
                sk, sv = sink_kv[name]
                sc, ss = rope_cos_sin(sink_pos, bands)
                all_k = torch.cat([keys[m][0] for m in hist] + [apply_rope(sk, sc, ss)], dim=1)
                all_v = torch.cat([keys[m][1] for m in hist] + [sv], dim=1)
                return attend(apply_rope(q, c, s), all_k, all_v)

            h = block(hs[j], e0, layer, block_attn, tk, tv)
            if layer in dit.injector_of:
                h = dit._inject_audio(dit.injector_of[layer], h, rec.blocks[j].audio)
            new_hs.append(h)
        hs = new_hs
    return dit.unpatchify(dit.head(hs[b], e), hh, ww)


@pytest.fixture(scope="module")
def sharp_models(tiny_models):
    """The tiny model with 8x q/k norm gains: peaked, position-sensitive self-attention.

    With random weights attention is nearly uniform, so a wrong RoPE position would move the
    output by less than the tolerance; sharpening makes every position error visible.
    """
    dit = copy.deepcopy(tiny_models.dit)
    with torch.no_grad():
        for block in dit.blocks:
            block.self_attn.norm_q.weight.mul_(8.0)
            block.self_attn.norm_k.weight.mul_(8.0)
    return dataclasses.replace(tiny_models, dit=dit)


@pytest.fixture(scope="module")
def recorded(sharp_models, example_image, example_audio):
    rec = Record()
    cfg = StreamConfig()
    gen = StreamGenerator(sharp_models, SessionParams(image=example_image, size="64*64", seed=7),
                          cfg, step_observer=rec)
    gen.push_audio(example_audio[: 16000 * 4])
    for _ in range(BLOCKS):
        gen.next_block()
    return gen, rec


def test_ring_generation_equals_no_cache_reference(sharp_models, recorded) -> None:
    gen, rec = recorded
    dit = sharp_models.dit
    assert gen.cfg.sink_refresh_block == 4 and gen.cfg.ring_frames == 12
    with torch.inference_mode():
        text = dit.text_kv(sharp_models.text.encode([gen.params.prompt])[0][None])
        first_latent = rec.inputs[0, gen.schedule.steps - 1] + gen.schedule.delta(
            gen.schedule.steps - 1) * rec.velocity[0, gen.schedule.steps - 1]
        sinks = {
            "original": dit.embed_sink(gen.ref_latent, gen.cond.motion),
            "refreshed": dit.embed_sink(first_latent[:, :, :1], gen.cond.motion),
        }
        ring_blocks = gen.cfg.ring_frames // gen.cfg.block_frames

        def window(j: int) -> str:
            return "original" if j < gen.cfg.sink_refresh_block else "refreshed"

        worst = 0.0
        for b in range(BLOCKS):
            for i in range(gen.schedule.steps):
                ref = reference_velocity(dit, text, sinks, window, rec, b, i,
                                         gen.schedule.timestep(i), ring_blocks)
                got = rec.velocity[b, i]
                rel = ((got - ref).norm() / ref.norm()).item()
                worst = max(worst, rel)
                assert rel <= 1e-4, f"block {b} step {i}: relative error {rel:.2e}"
    assert worst < 1e-4


def test_timestep_forcing_chain(recorded) -> None:
    # each step's input is the previous step's Euler update (no clean re-pass between steps)
    gen, rec = recorded
    s = gen.schedule
    for b in range(BLOCKS):
        for i in range(1, s.steps):
            want = rec.inputs[b, i - 1] + s.delta(i - 1) * rec.velocity[b, i - 1]
            torch.testing.assert_close(rec.inputs[b, i], want, rtol=0, atol=0)


def test_ref_ahead_is_drawn_per_step_in_range(recorded) -> None:
    _, rec = recorded
    drawn = [d for blk in rec.blocks.values() for d in blk.ref_ahead]
    assert all(4 <= d <= 30 for d in drawn)
    assert len(set(drawn)) > 3  # not pinned


def test_rope_is_relative_at_huge_positions() -> None:
    # attention scores depend only on position differences, even days into a stream
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 32, generator=g)
    k = torch.randn(1, 4, 2, 32, generator=g)
    from engine.models.rope import RopeBands

    bands = RopeBands.for_head_dim(32)
    base = np.array([[t, 1, 2] for t in (3, 4, 5, 6)])
    scores = []
    for offset in (0, 1024, 45_000, 5_400_000):  # Wan's table, LiveAvatar's table, ~10 days
        c, s = rope_cos_sin(base + [offset, 0, 0], bands)
        scores.append(torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, c, s), apply_rope(k, c, s)))
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-4, atol=1e-4)
