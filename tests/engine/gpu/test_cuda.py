"""The engine on a CUDA GPU (run on a lent GPU machine): the same code paths as on the CPU, in
bfloat16, and CUDA float32 == CPU float32. Skipped where there is no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import SessionParams
from engine.checkpoint.loader import load_models
from engine.checkpoint.tiny import make_tiny_checkpoint
from engine.generator import StreamGenerator
from engine.models.vae import CausalCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):  # noqa: ANN001, ANN201
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "tiny")


def face() -> np.ndarray:
    img = np.zeros((400, 720, 3), np.uint8)
    img[:, :, 0] = np.linspace(0, 255, 720, dtype=np.uint8)[None]
    img[100:300, 260:460] = (220, 180, 150)
    return img


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def run(models, blocks: int, observer=None) -> list[np.ndarray]:  # noqa: ANN001
    gen = StreamGenerator(models, SessionParams(image=face(), size="128*64", seed=1),
                          step_observer=observer)
    gen.push_audio(speech(4.0))
    return [gen.next_block().frames for _ in range(blocks)]


def test_bf16_generation_on_cuda(ckpt) -> None:  # noqa: ANN001
    models = load_models(ckpt, torch.device("cuda"), torch.bfloat16, lora_alpha=2.0)
    frames = run(models, 6)
    assert all(f.shape == (12, 64, 128, 3) and f.dtype == np.uint8 for f in frames)
    assert np.std(np.concatenate(frames)) > 1.0


def test_cuda_float32_matches_cpu_float32(ckpt) -> None:  # noqa: ANN001
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    got: dict[str, list[torch.Tensor]] = {"cpu": [], "cuda": []}
    for device in ("cpu", "cuda"):
        models = load_models(ckpt, torch.device(device), torch.float32, lora_alpha=2.0)
        run(models, 5, lambda b, i, x, v, blk, d=device: got[d].append(v.float().cpu()))
    for a, b in zip(got["cpu"], got["cuda"], strict=True):
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-4, rel


def test_streaming_vae_on_cuda(ckpt) -> None:  # noqa: ANN001
    models = load_models(ckpt, torch.device("cuda"), torch.float32, lora_alpha=2.0)
    z = torch.randn(1, 16, 6, 8, 16, device="cuda")
    with torch.inference_mode():
        whole = models.vae.decode(z)
        cache = CausalCache()
        parts = torch.cat([models.vae.decode(z[:, :, i:i + 1], cache) for i in range(6)], dim=2)
    assert (parts - whole).abs().max().item() <= 1e-5


def test_fp8_load_on_a_scratch_stream_is_the_same_bits(ckpt) -> None:  # noqa: ANN001
    # quantize-on-load makes its temporaries on a side stream and keeps the e4m3 weights on the
    # default stream's pool (engine.models.fp8.scratch): the weights equal quantising after
    # loading bit for bit (what it saves is measured by the rank-share bench)
    from engine.checkpoint.layout import CheckpointLayout
    from engine.checkpoint.loader import load_dit
    from engine.models.fp8 import FP8Linear, quantize_linears

    layout = CheckpointLayout.at(ckpt)
    on_load = load_dit(layout, "cuda", torch.bfloat16, fp8_scaling="tensor")
    after = load_dit(layout, "cuda", torch.bfloat16)
    quantize_linears(after, "tensor")
    a = {n: m for n, m in on_load.named_modules() if isinstance(m, FP8Linear)}
    b = {n: m for n, m in after.named_modules() if isinstance(m, FP8Linear)}
    assert a.keys() == b.keys() and a
    for n, m in a.items():
        assert torch.equal(m.weight.view(torch.uint8), b[n].weight.view(torch.uint8)), n
        assert torch.equal(m.weight_scale, b[n].weight_scale), n
