"""FP8 linears: torch._scaled_mm == its exact emulation, and the FP8 DiT == the plain one within
e4m3's precision (CPU: torch 2.13 runs _scaled_mm for float8 on the CPU)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from engine.api import SessionParams
from engine.generator import StreamGenerator
from engine.models.fp8 import E4M3, FP8Linear, dequantize, quantize, quantize_linears

# Relative L2 error of a step's velocity, FP8 vs float32, over 6 blocks x 4 steps of the tiny
# model (measured 0.031-0.035 with "tensor", 0.022-0.029 with "row"): e4m3 keeps 3 mantissa bits.
VELOCITY_TOLERANCE = {"tensor": 0.06, "row": 0.05}


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_scaled_mm_equals_dequantised_matmul(scaling: str) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(2, 7, 64, generator=g) * 3.0
    x[0, 3] *= 40  # an outlier token
    fp8 = FP8Linear.from_linear(lin, scaling)
    assert fp8.weight.dtype == E4M3 and fp8.weight.shape == (48, 64)
    got = fp8(x)
    qx, sx = quantize(x.reshape(-1, 64), scaling)
    emulated = dequantize(qx, sx) @ dequantize(fp8.weight, fp8.weight_scale.reshape(-1, 1)).T
    emulated = (emulated + lin.bias).view(2, 7, 48)
    # the same products, summed in another order: the outlier token's terms (about +-25 each,
    # cancelling to about 2) leave float32 rounding of a few 1e-5 (4.7e-5 seen on one Xeon,
    # whose oneDNN kernel for _scaled_mm differs from the one where 1e-5 held)
    torch.testing.assert_close(got, emulated, rtol=1e-5, atol=1e-4)
    # and it approximates the float32 layer to e4m3 precision
    want = lin(x)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, rel


def test_quantize_round_trip_and_zero_rows() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 448.0], [1e-3, 2e-3, -4e-3]])
    q, s = quantize(x, "row")
    assert s.shape == (3, 1) and torch.isfinite(s).all()
    back = dequantize(q, s)
    assert torch.equal(back[0], torch.zeros(3))  # an all-zero token stays zero
    torch.testing.assert_close(back, x, rtol=0.07, atol=0.0)
    q, s = quantize(x, "tensor")
    assert s.shape == () and dequantize(q, s)[1, 2].item() == 448.0
    with pytest.raises(ValueError, match="accepted"):
        quantize(x, "block")


def test_only_the_upstream_layers_are_quantised(tiny_models) -> None:  # noqa: ANN001
    dit = copy.deepcopy(tiny_models.dit)
    count = quantize_linears(dit, "tensor")
    names = {n for n, m in dit.named_modules() if isinstance(m, FP8Linear)}
    layers = dit.cfg.num_layers
    injected = len(dit.cfg.audio_inject_layers)
    # per block: self q/k/v/o, cross q/k/v/o, ffn 0/2; per injection: q/k/v/o + AdaLN linear
    assert count == len(names) == 10 * layers + 5 * injected
    assert "blocks.0.ffn.0" in names and "audio_injector.injector_adain_layers.0.linear" in names
    for kept in ("text_embedding.0", "time_embedding.0", "time_projection.1", "head.head",
                 "casual_audio_encoder.encoder.final_linear"):
        assert isinstance(dit.get_submodule(kept), nn.Linear), kept


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_dit_follows_the_float32_dit(tiny_models, example_image, example_audio,
                                         scaling: str) -> None:  # noqa: ANN001
    def velocities(models) -> dict:  # noqa: ANN001
        rec: dict = {}
        gen = StreamGenerator(models, SessionParams(image=example_image, size="64*64", seed=2),
                              step_observer=lambda b, i, x, v, blk: rec.__setitem__((b, i), v))
        gen.push_audio(example_audio[:16000 * 4])
        for _ in range(6):
            gen.next_block()
        return rec

    want = velocities(tiny_models)
    dit = copy.deepcopy(tiny_models.dit)
    quantize_linears(dit, scaling)
    got = velocities(dataclasses.replace(tiny_models, dit=dit))
    errors = [((got[k] - want[k]).norm() / want[k].norm()).item() for k in sorted(want)]
    assert len(errors) == 24 and max(errors) <= VELOCITY_TOLERANCE[scaling], np.round(errors, 3)


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    ta = dict([*a.named_parameters(), *a.named_buffers()])
    tb = dict([*b.named_parameters(), *b.named_buffers()])
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        assert v.dtype == tb[k].dtype and torch.equal(v.float(), tb[k].float()), k


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_quantised_as_it_loads_equals_quantised_after(tiny_ckpt_master, scaling: str) -> None:  # noqa: ANN001
    """The loader's and the random builder's load-time FP8 give the model that loading in bf16
    and then quantising gives, tensor for tensor (the LoRA merged first in both)."""
    from engine.checkpoint.layout import CheckpointLayout
    from engine.checkpoint.loader import load_dit
    from engine.models.fp8 import weight_bytes
    from engine.random_weights import build_random_parts, model_shapes

    layout = CheckpointLayout.at(tiny_ckpt_master)
    after = load_dit(layout, "cpu", torch.bfloat16, lora_alpha=2.0)
    bf16_bytes = weight_bytes(after)
    count = quantize_linears(after, scaling)
    during = load_dit(layout, "cpu", torch.bfloat16, lora_alpha=2.0, fp8_scaling=scaling)
    assert sum(isinstance(m, FP8Linear) for m in during.modules()) == count > 0
    _same_tensors(during, after)
    # the weights are counted with their e4m3 buffers: a little over half the bf16 model's
    assert 0.4 * bf16_bytes < weight_bytes(during) < 0.9 * bf16_bytes

    shapes = model_shapes("tiny", torch.device("cpu"))
    plain = build_random_parts(shapes, ("dit",), torch.device("cpu"), torch.bfloat16)["dit"]
    quantize_linears(plain, scaling)
    filled = build_random_parts(shapes, ("dit",), torch.device("cpu"), torch.bfloat16,
                                fp8_scaling=scaling)["dit"]
    _same_tensors(filled, plain)
