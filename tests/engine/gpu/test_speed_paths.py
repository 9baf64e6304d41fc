"""Every speed path computes the plain path's function at the 14B shapes, on a CUDA GPU, with
random weights: the attention backends, FP8 _scaled_mm, the compiled layer, FP8 DiT steps, and
the decode on a second CUDA stream. Tolerances are stated per test; the measured errors go to
the report ($AVATAR_GPU_REPORT) for the closing note. Run on a lent GPU:
`python3 -m pytest -m gpu tests/engine/gpu -s` (tests/engine/gpu/session.sh does it)."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from engine.api import SessionParams
from engine.checkpoint.loader import finish_module, load_models
from engine.checkpoint.tiny import make_tiny_checkpoint
from engine.decode import DecodeQueue
from engine.denoise import BlockInput, Conditioning, DenoiseStage
from engine.generator import StreamGenerator
from engine.kv_cache import StepKV
from engine.models.dit import DiTConfig, WanS2VDiT
from engine.models.fp8 import FP8Linear, dequantize, quantize, quantize_linears
from engine.models.rope import RopeAngles
from engine.random_weights import fill_random
from engine.sampling import FlowSchedule
from engine.speed.attention import BACKENDS, probe
from engine.speed.compile import CompiledLayers, graphs
from engine.speed.prepare import SpeedState
from engine.transfer import to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def big_card() -> bool:
    return torch.cuda.get_device_properties(0).total_memory > 120e9


@pytest.fixture(scope="module")
def size() -> tuple[int, int]:
    """Latent (h, w) of the step under test: 704x384 on an H200, 448x256 on an 80 GB card."""
    return (48, 88) if big_card() else (32, 56)


@pytest.fixture(scope="module")
def dit14b() -> WanS2VDiT:
    with torch.device("meta"):
        dit = WanS2VDiT(DiTConfig())
    fill_random(dit, CUDA, torch.bfloat16, seed=0, keep_fp32=dit.keep_fp32_prefixes)
    finish_module(dit, "dit")
    return dit


class Step:
    """One denoising step with a full ring at the 14B shapes, replayable from the same state."""

    def __init__(self, dit: WanS2VDiT, hw: tuple[int, int]):
        cfg = dit.cfg
        g = torch.Generator(device=CUDA).manual_seed(1)
        hh, ww = hw
        with torch.inference_mode():
            text = dit.text_kv(torch.randn(1, 64, cfg.text_dim, device=CUDA, generator=g))
            sink = dit.prefill_sink(*dit.embed_sink(
                torch.randn(1, 16, 1, hh, ww, device=CUDA, generator=g),
                torch.randn(1, 16, 19, hh, ww, device=CUDA, generator=g)), text)
            self.audio = dit.encode_audio(torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12,
                                                      device=CUDA, generator=g))
        self.rope = RopeAngles(cfg.rope_bands, CUDA)
        self.hw, self.text, self.sink = hw, text, sink
        tpf = (hh // 2) * (ww // 2)
        self.kv = StepKV(cfg.num_layers, 1, sink.keys.shape[2], sink.ref_tokens, 12, tpf,
                         cfg.num_heads, cfg.head_dim, dit.dtype, CUDA)
        with torch.inference_mode():
            self.kv.set_sink(sink, self.rope.of(to_device(sink.positions[sink.ref_tokens:],
                                                          CUDA)))
        self.x = [torch.randn(1, 16, 3, hh, ww, device=CUDA, generator=g) for _ in range(5)]
        for b in range(4):  # fill the ring
            self.run(dit, b)
        self.saved = (self.kv.k.clone(), self.kv.v.clone(), self.kv.written)

    def block(self, b: int) -> BlockInput:
        h2, w2 = self.hw[0] // 2, self.hw[1] // 2
        return BlockInput(b, 3 * b, self.audio, (10,), self.rope.grid(3 * b, 3, h2, w2),
                          (self.rope.grid(max(30, 3 * b + 10), 1, h2, w2),))

    def run(self, dit: WanS2VDiT, b: int, layers=None) -> torch.Tensor:  # noqa: ANN001
        stage = DenoiseStage(dit, FlowSchedule.make(1, 3.0), 0, self.kv,
                             Conditioning(self.text, self.sink, torch.empty(0)), layers)
        with torch.inference_mode():
            return stage.velocity(self.x[b], self.block(b))

    def replay(self, dit: WanS2VDiT, layers=None) -> torch.Tensor:  # noqa: ANN001
        """The 5th block's step (ring full) from the saved state."""
        k, v, written = self.saved
        self.kv.k.copy_(k)
        self.kv.v.copy_(v)
        self.kv.written = written
        return self.run(dit, 4, layers)


@pytest.fixture(scope="module")
def step(dit14b: WanS2VDiT, size: tuple[int, int]) -> Step:
    return Step(dit14b, size)


def test_attention_backends_agree_at_step_shapes(report: dict, size: tuple[int, int]) -> None:
    """Tolerance: relative L2 <= 1e-2 against float32 math (bf16 inputs)."""
    tpf = (size[0] // 2) * (size[1] // 2)
    q_len, kv_len = 3 * tpf, 12 * tpf + (5 * tpf) // 2
    g = torch.Generator(device=CUDA).manual_seed(2)
    q = torch.randn(1, 40, q_len, 128, device=CUDA, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 40, kv_len, 128, device=CUDA, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 40, kv_len, 128, device=CUDA, dtype=torch.bfloat16, generator=g)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    times = probe(CUDA, torch.bfloat16, 40, 128, q_len, kv_len)
    errors = {}
    for name, backend in BACKENDS.items():
        if not isinstance(times[name], float):
            continue
        with sdpa_kernel([backend]):
            errors[name] = rel(F.scaled_dot_product_attention(q, k, v), want)
    report["attention_backends"] = {"queries": q_len, "keys": kv_len, "ms": times,
                                    "relative_l2_vs_fp32": errors, "tolerance": 1e-2}
    assert {"flash", "efficient"} & set(errors), times
    assert all(e <= 1e-2 for e in errors.values()), errors


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_scaled_mm_on_cuda_matches_its_emulation(report: dict, scaling: str) -> None:
    """Tolerances: <= 5e-3 against the dequantised float32 product (fast accumulation),
    <= 0.06 against the bf16 layer."""
    g = torch.Generator(device=CUDA).manual_seed(3)
    lin = torch.nn.Linear(5120, 13824, device=CUDA, dtype=torch.bfloat16)
    x = torch.randn(3168, 5120, device=CUDA, dtype=torch.bfloat16, generator=g)
    fp8 = FP8Linear.from_linear(lin, scaling)
    with torch.inference_mode():
        got = fp8(x)
        qx, sx = quantize(x, scaling)
        emulated = dequantize(qx, sx) @ dequantize(fp8.weight, fp8.weight_scale.reshape(-1, 1)).T
        emulated = emulated + lin.bias.float()
        errors = {"vs_emulation": rel(got, emulated), "vs_bf16": rel(got, lin(x))}
    report.setdefault("scaled_mm", {})[scaling] = {**errors, "tolerance": [5e-3, 0.06]}
    assert errors["vs_emulation"] <= 5e-3 and errors["vs_bf16"] <= 0.06, errors


def test_compiled_step_equals_eager_at_14b_shapes(report: dict, dit14b: WanS2VDiT,
                                                  step: Step) -> None:
    """Tolerance: relative L2 <= 2e-2 (inductor fuses bf16 glue in float32 where eager rounds
    each op to bf16). One graph for the full ring and one for the injection."""
    eager = step.replay(dit14b)
    layers = CompiledLayers("default")
    before, start = graphs(), time.perf_counter()
    compiled = step.replay(dit14b, layers)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    again = step.replay(dit14b, layers)
    error = rel(compiled, eager)
    report["compile"] = {"relative_l2_vs_eager": error, "tolerance": 2e-2,
                         "graphs": graphs() - before, "first_call_s": round(compile_s, 1)}
    assert graphs() - before == 2
    assert error <= 2e-2, error
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)  # replays are deterministic


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_step_follows_the_bf16_step(report: dict, dit14b: WanS2VDiT, step: Step,
                                        scaling: str) -> None:
    """Tolerance: relative L2 of the velocity <= 0.1 (tensor) / 0.08 (row)."""
    want = step.replay(dit14b)
    fp8 = copy.deepcopy(dit14b)
    quantize_linears(fp8, scaling)
    error = rel(step.replay(fp8), want)
    del fp8
    torch.cuda.empty_cache()
    tolerance = {"tensor": 0.1, "row": 0.08}[scaling]
    report.setdefault("fp8_step", {})[scaling] = {"relative_l2_vs_bf16": error,
                                                  "tolerance": tolerance}
    assert error <= tolerance, error


def test_decode_on_a_second_stream_gives_the_same_frames(report: dict, tmp_path) -> None:  # noqa: ANN001
    models = load_models(make_tiny_checkpoint(tmp_path / "tiny"), CUDA, torch.bfloat16,
                         lora_alpha=2.0)
    img = np.zeros((384, 704, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, 704, dtype=np.uint8)[None]
    t = np.arange(16000 * 4) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(
        np.float32)

    def run(speed: SpeedState) -> list:
        gen = StreamGenerator(models, SessionParams(image=img, size="256*128", seed=2),
                              speed=speed)
        gen.push_audio(audio)
        pending, out = [], []
        for _ in range(6):
            pending.append(gen.submit_block())
            if len(pending) == 2:
                out.append(pending.pop(0).result())
        return out + [p.result() for p in pending]

    plain = run(SpeedState.plain(CUDA))
    queue = DecodeQueue("stream", CUDA)
    overlapped = run(SpeedState(queue))
    diff = max(int(np.abs(a.frames.astype(int) - b.frames.astype(int)).max())
               for a, b in zip(plain, overlapped, strict=True))
    report["decode_stream"] = {"max_uint8_difference": diff, "tolerance": 0,
                               "decode_ms": overlapped[-1].timings.decode * 1000}
    assert [b.index for b in overlapped] == list(range(6))
    assert diff == 0
