"""torch.compile of the DiT layer == eager, with one graph per ring fill level shared by every
layer and no recompilation once the ring is full.

The main test uses dynamo with the "aot_eager" backend: the real tracing, guards and
functionalised in-place ring writes, without inductor's code generation (which takes ~30 s for
the first graph on 2 CPU cores: `test_inductor_compiles_the_layer` does that once, marked slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo

from engine.api import SessionParams
from engine.generator import StreamGenerator
from engine.speed.compile import CompiledLayers, graphs
from engine.speed.prepare import SpeedState

BLOCKS = 7  # fills the ring (blocks 0-3), wraps it and refreshes the sink (block 4)


def velocities(models, image, audio, speed: SpeedState) -> dict:  # noqa: ANN001
    rec: dict = {}
    gen = StreamGenerator(models, SessionParams(image=image, size="64*64", seed=6), speed=speed,
                          step_observer=lambda b, i, x, v, blk: rec.__setitem__((b, i), v))
    gen.push_audio(audio)
    for _ in range(BLOCKS):
        gen.next_block()
    return rec


def test_compiled_layers_equal_eager_and_compile_once_per_fill_level(
        tiny_models, example_image, example_audio) -> None:  # noqa: ANN001
    torch._dynamo.reset()
    audio = example_audio[:16000 * 5]
    eager = velocities(tiny_models, example_image, audio, SpeedState.plain(tiny_models.device))
    speed = SpeedState.plain(tiny_models.device)
    speed.layers = CompiledLayers(backend="aot_eager")
    before = graphs()
    compiled = velocities(tiny_models, example_image, audio, speed)
    # fill levels 1, 2, 3, 4 blocks of history for the layer, one graph for the injection:
    # not one per layer (3), step (4), block (7) or write position (4)
    assert graphs() - before == 4 + 1
    for key, want in eager.items():
        torch.testing.assert_close(compiled[key], want, rtol=1e-5, atol=1e-5)
    # a second session of the same size compiles nothing
    again = graphs()
    velocities(tiny_models, example_image, audio, speed)
    assert graphs() == again


@pytest.mark.slow
def test_inductor_compiles_the_layer(tiny_models, example_image, example_audio) -> None:  # noqa: ANN001
    """Inductor's generated kernels (C++ on the CPU) compute the same block."""
    torch._dynamo.reset()
    audio = example_audio[:16000 * 2]
    speed = SpeedState.plain(tiny_models.device)
    speed.layers = CompiledLayers(mode="default")

    def first_block(s: SpeedState) -> np.ndarray:
        gen = StreamGenerator(tiny_models, SessionParams(image=example_image, size="64*64"),
                              speed=s)
        gen.push_audio(audio)
        return gen.next_block().frames

    plain = first_block(SpeedState.plain(tiny_models.device))
    fused = first_block(speed)
    assert np.abs(plain.astype(int) - fused.astype(int)).max() <= 1  # uint8 rounding only


# The VAE's fused norm -> SiLU -> causal padding (`compile_vae`) --------------------------------


def _decode_blocks(vae, seq: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    """The generator's pattern: prime on 7 latents, then blocks of 3, cache carried."""
    from engine.models.vae import CausalCache

    cache = CausalCache()
    with torch.inference_mode():
        out = [vae.decode(seq[:, :, :7], cache)]
        out += [vae.decode(seq[:, :, 7 + 3 * k:10 + 3 * k], cache) for k in range(3)]
    return out


def test_compiled_vae_decodes_the_eager_frames_and_compiles_only_at_first(tiny_models) -> None:  # noqa: ANN001
    import copy

    from engine.speed.compile import compile_vae

    torch._dynamo.reset()
    seq = torch.randn(1, 16, 16, 8, 12, generator=torch.Generator().manual_seed(4))
    eager = _decode_blocks(tiny_models.vae, seq)
    vae = copy.deepcopy(tiny_models.vae)
    # every residual block, the encoder's and the decoder's heads
    blocks = sum(type(m).__name__ == "ResidualBlock" for m in vae.modules())
    assert compile_vae(vae, backend="aot_eager") == blocks + 2
    before = graphs()
    compiled = _decode_blocks(vae, seq)
    first = graphs() - before
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops: the same bits
    assert 0 < first <= 40, first
    # a second stream of the same size compiles nothing: the graphs are per shape, not per call
    again = graphs()
    _decode_blocks(vae, seq)
    assert graphs() == again


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_fuses_norm_silu_pad_to_the_eager_values(dtype: torch.dtype) -> None:
    """Inductor's kernel for one call site (C++ on the CPU): the values of the eager ops, to
    the rounding of one bfloat16 step (eager rounds after the norm and again after the SiLU)."""
    from engine.models.vae import norm_silu_pad

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 32, 4, 6, 10, generator=g) * 3).to(dtype)
    past = torch.randn(1, 32, 2, 6, 10, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(32, 1, 1, 1, generator=g)).to(dtype)
    fused = torch.compile(norm_silu_pad, dynamic=False)
    for history in (None, past):  # a stream's first call and a later one
        want, want_past = norm_silu_pad(x, gamma, 32 ** 0.5, history, 2, (1, 1, 1, 1))
        got, got_past = fused(x, gamma, 32 ** 0.5, history, 2, (1, 1, 1, 1))
        assert got.shape == want.shape == (1, 32, 6, 8, 12) and got.dtype == dtype
        tol = 0.0 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6)
        torch.testing.assert_close(got_past.float(), want_past.float(), rtol=tol, atol=1e-6)


def test_the_compile_warm_up_runs_every_size_a_session_may_move_to(tiny_models,  # noqa: ANN001
                                                                   monkeypatch) -> None:
    # the governor's step down must not stall a session on a compile: with compile (or
    # vae_compile) the warm-up runs max_size, which it times for admission, then each of
    # warm_up_sizes; without, only the calibration at max_size
    import dataclasses

    from engine.config import EngineConfig
    from engine.wan_engine import WanEngine

    engine = WanEngine(tiny_models, EngineConfig(max_size="128*64",
                                                 warm_up_sizes="64*64,128*64,96*64"))
    try:
        ran: list[str] = []
        monkeypatch.setattr(engine, "_warm_up_session",
                            lambda size: ran.append(size) or 0.25 * len(ran))
        engine.warm_up()
        assert ran == ["128*64"]
        engine.config = dataclasses.replace(engine.config, vae_compile=True)
        ran.clear()
        engine.warm_up()
        assert ran == ["128*64", "64*64", "96*64"]
        cost = engine.block_cost()
        assert cost is not None and (cost.size, cost.seconds) == ("128*64", 0.25)
    finally:
        engine.close()
