"""The [sink | ring] buffer with device RoPE == the previous ring + per-layer concatenation.

`OldRing`/`OldRingAttention` are the engine's attention path before the buffer existed (RoPE
angles from numpy per step, the sink's keys re-rotated in every layer, keys and values
concatenated per layer), kept here as the reference. Both drive the same DiT over blocks that
fill and wrap the ring, with a fresh reference position per step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.denoise import BlockInput
from engine.kv_cache import StepAttention, StepKV
from engine.models.attention import attend
from engine.models.rope import RopeAngles, apply_rope, rope_cos_sin
from engine.transfer import to_device

RING_FRAMES, BLOCK_FRAMES, BLOCKS = 12, 3, 6  # blocks 4 and 5 overwrite the oldest slots


class OldRing:
    def __init__(self, layers, frames, tpf, heads, hd):  # noqa: ANN001
        self.k = torch.zeros(layers, 1, frames * tpf, heads, hd)
        self.v = torch.zeros_like(self.k)
        self.frames, self.tpf, self.written = frames, tpf, 0


class OldRingAttention:
    def __init__(self, ring, sink, bands, positions, sink_positions, f):  # noqa: ANN001
        self.ring, self.sink = ring, sink
        self.start = (ring.written % ring.frames) * ring.tpf
        self.valid = min(ring.frames, ring.written + f) * ring.tpf
        self.q_rope = rope_cos_sin(positions, bands)
        self.s_rope = rope_cos_sin(sink_positions, bands)

    def __call__(self, layer, q, k, v):  # noqa: ANN001, ANN204
        q = apply_rope(q, *self.q_rope)
        k = apply_rope(k, *self.q_rope)
        n = k.shape[1]
        rk, rv = self.ring.k[layer], self.ring.v[layer]
        rk[:, self.start:self.start + n] = k
        rv[:, self.start:self.start + n] = v
        sk = apply_rope(self.sink.keys[layer], *self.s_rope)
        keys = torch.cat([rk[:, :self.valid], sk], dim=1)
        values = torch.cat([rv[:, :self.valid], self.sink.values[layer]], dim=1)
        return attend(q, keys, values)


@pytest.fixture(scope="module")
def setup(tiny_models):  # noqa: ANN001, ANN201
    dit = tiny_models.dit
    g = torch.Generator().manual_seed(3)
    hh = ww = 8
    with torch.inference_mode():
        text = dit.text_kv(torch.randn(1, 7, dit.cfg.text_dim, generator=g))
        sink = dit.prefill_sink(*dit.embed_sink(torch.randn(1, 16, 1, hh, ww, generator=g),
                                                torch.randn(1, 16, 19, hh, ww, generator=g)),
                                text)
        audio = dit.encode_audio(torch.randn(1, dit.cfg.audio_layers, dit.cfg.audio_dim, 12,
                                             generator=g))
    latents = [torch.randn(1, 16, BLOCK_FRAMES, hh, ww, generator=g) for _ in range(BLOCKS)]
    return dit, text, sink, audio, latents


def test_buffer_path_equals_concatenation_path(setup) -> None:  # noqa: ANN001
    dit, text, sink, audio, latents = setup
    cfg = dit.cfg
    _, _, f, hh, ww = latents[0].shape
    tpf = (hh // 2) * (ww // 2)
    old = OldRing(cfg.num_layers, RING_FRAMES, tpf, cfg.num_heads, cfg.head_dim)
    kv = StepKV(cfg.num_layers, 1, sink.keys.shape[2], sink.ref_tokens, RING_FRAMES, tpf,
                cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    rope = RopeAngles(cfg.rope_bands, "cpu")
    kv.set_sink(sink, rope.of(to_device(sink.positions[sink.ref_tokens:], "cpu")))
    t = torch.full((1,), 857.69)
    worst = 0.0
    with torch.inference_mode():
        for b, x in enumerate(latents):
            frame0 = b * f
            ref_t = max(cfg.ref_time, frame0 + 4 + 5 * b)  # a new reference position per block
            attn_old = OldRingAttention(old, sink, cfg.rope_bands,
                                        dit.noisy_positions(frame0, f, hh, ww),
                                        sink.positions_with_ref_at(ref_t), f)
            want = dit.denoise(x, t, audio, text, attn_old)
            old.written += f
            kv.rotate_reference(sink, rope.grid(ref_t, 1, hh // 2, ww // 2))
            got = dit.denoise(x, t, audio, text, StepAttention(kv, rope.grid(frame0, f, hh // 2,
                                                                                ww // 2), f))
            kv.advance(f)
            rel = ((got - want).norm() / want.norm()).item()
            worst = max(worst, rel)
    print(f"worst relative L2 error {worst:.2e}")
    assert worst <= 1e-5, worst  # fp32 rounding only: the order of the keys differs


def test_window_is_a_prefix_after_the_sink() -> None:
    kv = StepKV(2, 1, sink_tokens=10, ref_tokens=4, frames=12, tokens_per_frame=5, heads=1,
                head_dim=8, dtype=torch.float32, device="cpu")
    seen = []
    for _ in range(6):
        seen.append(kv.window(3))
        kv.advance(3)
    # writes at sink + 0, 15, 30, 45, then wrap; the valid end grows to sink + ring and stays
    assert seen == [(10, 25), (25, 40), (40, 55), (55, 70), (10, 70), (25, 70)]
    with pytest.raises(ValueError, match="cannot hold blocks of 5"):
        kv.window(5)


def test_sink_rope_is_applied_once_per_step_not_per_layer(setup, monkeypatch) -> None:  # noqa: ANN001
    """A step rotates the reference keys once, for all layers, and no step builds tensors on
    the host: numpy is never converted inside the forward."""
    import engine.kv_cache as kv_cache

    dit, text, sink, audio, latents = setup
    cfg = dit.cfg
    hh, ww = latents[0].shape[3:]
    tpf = (hh // 2) * (ww // 2)
    kv = StepKV(cfg.num_layers, 1, sink.keys.shape[2], sink.ref_tokens, RING_FRAMES, tpf,
                cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    rope = RopeAngles(cfg.rope_bands, "cpu")
    kv.set_sink(sink, rope.of(to_device(sink.positions[sink.ref_tokens:], "cpu")))
    block = BlockInput(0, 0, audio, (10,), rope.grid(0, 3, hh // 2, ww // 2),
                       (rope.grid(30, 1, hh // 2, ww // 2),))
    calls = []
    real = kv_cache.apply_rope
    monkeypatch.setattr(kv_cache, "apply_rope", lambda x, c, s: calls.append(x.shape) or
                        real(x, c, s))

    def no_host(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("host tensor building inside a step")

    monkeypatch.setattr(torch, "from_numpy", no_host)
    monkeypatch.setattr(np, "outer", no_host)
    from engine.denoise import DenoiseStage
    from engine.sampling import FlowSchedule

    stage = DenoiseStage(dit, FlowSchedule.make(1, 3.0), 0, kv, _Cond(text, sink))
    with torch.inference_mode():
        stage.velocity(latents[0], block)
    ref_calls = [s for s in calls if s[0] == cfg.num_layers or len(s) == 5]
    per_layer = [s for s in calls if len(s) == 4]
    assert len(per_layer) == 2 * cfg.num_layers  # q and k of the block, in each layer
    assert len(ref_calls) == 1 and ref_calls[0][2] == sink.ref_tokens  # all layers in one go


class _Cond:
    def __init__(self, text, sink):  # noqa: ANN001
        self.text, self.sink = text, sink


def test_prefill_into_the_buffers_is_the_same_bits(tiny_models) -> None:  # noqa: ANN001
    # a session nothing caches prefills its sink straight into the steps' buffers (the whole
    # sink's K/V never sit beside them: 0.9 GB of a 24 GB card's rank at 448x256); the refresh
    # does the same; both must equal prefilling first and copying in, bit for bit
    from engine.conditioning import prefill_sink
    from engine.denoise import Conditioning, SessionDenoiser
    from engine.sampling import FlowSchedule

    dit = tiny_models.dit
    g = torch.Generator().manual_seed(5)
    hh = ww = 8
    schedule = FlowSchedule.make(4, 3.0)
    with torch.inference_mode():
        text = dit.text_kv(torch.randn(1, 7, dit.cfg.text_dim, generator=g))
        ref = torch.randn(1, 16, 1, hh, ww, generator=g)
        motion = torch.randn(1, 16, 19, hh, ww, generator=g)
        eager = SessionDenoiser(dit, RING_FRAMES, torch.float32, torch.device("cpu"))
        eager.start((hh, ww), Conditioning(text, prefill_sink(dit, ref, motion, text), motion),
                    schedule, sink_shared=False)
        into = SessionDenoiser(dit, RING_FRAMES, torch.float32, torch.device("cpu"))
        into.start((hh, ww), Conditioning(text, None, motion, ref=ref), schedule,
                   sink_shared=False)

        def same() -> None:
            assert len(eager.stages) == len(into.stages) == 4
            for a, b in zip(eager.stages, into.stages, strict=True):
                assert torch.equal(a.kv.k, b.kv.k) and torch.equal(a.kv.v, b.kv.v)
            sa, sb = eager.cond.sink, into.cond.sink
            assert sa is not None and sb is not None
            assert sb.keys.shape[2] == sb.ref_tokens == sa.ref_tokens  # reference keys only
            assert torch.equal(sa.keys, sb.keys) and torch.equal(sa.values, sb.values)
            assert np.array_equal(sa.positions, sb.positions)

        same()
        # the rolling sink's re-anchoring, as it ran before: the whole new sink first
        new = torch.randn(1, 16, 1, hh, ww, generator=g)
        whole = prefill_sink(dit, new, motion, text)
        for stage in eager.stages:
            stage.set_sink(whole, eager.motion_rope)
        eager.cond.sink = whole.reference_only()
        into.refresh(new)
        same()
