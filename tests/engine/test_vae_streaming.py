"""Streaming VAE decode (one latent frame at a time, cache carried) == one-shot decode."""

from __future__ import annotations

import pytest
import torch

from engine.models.vae import CausalCache


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 16, 8, 8, 12, generator=torch.Generator().manual_seed(0))


def test_one_frame_at_a_time_equals_one_shot(tiny_models, latents) -> None:
    vae = tiny_models.vae
    with torch.inference_mode():
        whole = vae.decode(latents)
        cache = CausalCache()
        parts = [vae.decode(latents[:, :, i:i + 1], cache) for i in range(latents.shape[2])]
    stream = torch.cat(parts, dim=2)
    assert [p.shape[2] for p in parts] == [1] + [4] * 7
    assert stream.shape == whole.shape == (1, 3, 29, 64, 96)
    assert (stream - whole).abs().max().item() <= 1e-5


def test_warm_up_then_blocks_of_three_equals_one_shot(tiny_models, latents) -> None:
    # the generator's pattern: prime on 7 (motion) latents, then 3 latents per block
    vae = tiny_models.vae
    with torch.inference_mode():
        seq = torch.cat([latents[:, :, :7], latents[:, :, 1:7]], dim=2)  # 13 latents
        whole = vae.decode(seq)
        cache = CausalCache()
        warm = vae.decode(seq[:, :, :7], cache)
        blocks = [vae.decode(seq[:, :, 7 + 3 * k:10 + 3 * k], cache) for k in range(2)]
    assert warm.shape[2] == 25 and all(b.shape[2] == 12 for b in blocks)
    stream = torch.cat([warm, *blocks], dim=2)
    assert (stream - whole).abs().max().item() <= 1e-5


def test_cache_is_per_stream(tiny_models, latents) -> None:
    # two interleaved streams with their own caches do not disturb each other
    vae = tiny_models.vae
    other = latents.flip(2)
    with torch.inference_mode():
        a, b = CausalCache(), CausalCache()
        out_a, out_b = [], []
        for i in range(4):
            out_a.append(vae.decode(latents[:, :, i:i + 1], a))
            out_b.append(vae.decode(other[:, :, i:i + 1], b))
        ref_a = vae.decode(latents[:, :, :4])
    assert (torch.cat(out_a, dim=2) - ref_a).abs().max().item() <= 1e-5
    assert a.nbytes() == b.nbytes() > 0
