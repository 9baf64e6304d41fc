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
