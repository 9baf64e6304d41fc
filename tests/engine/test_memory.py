"""The memory plan: the issue's figures by arithmetic, what fits which card, and the error that
names the size, the card and what would fit, before anything is loaded."""

from __future__ import annotations

import pytest
import torch

from engine.api import SessionParams
from engine.config import EngineConfig
from engine.errors import ConfigError, InputError
from engine.memory import (
    GB,
    GIB,
    SIZES,
    alternatives_for,
    check_fits,
    decoder_cache_bytes,
    dit_weight_bytes,
    fit_engine,
    plan_memory,
    ring_bytes,
    rounded_gb,
    sink_bytes,
)
from engine.models.dit import DiTConfig
from engine.models.text import UMT5Dims
from engine.models.vae import CausalCache, VAEConfig
from engine.wan_engine import WanEngine

DIT, VAE, T5 = DiTConfig(), VAEConfig(), UMT5Dims()
H100 = 85_520_809_984  # an "80 GB" card: 79.6 GiB
L40S = 47_697_362_944  # a "48 GB" card: 44.4 GiB
H200 = 150_754_820_096  # 140.4 GiB


def test_the_issue_s_figures() -> None:
    # bf16 weights 32.6 GB (the loader keeps the 95M-parameter audio encoder in fp32: 32.8)
    assert rounded_gb(dit_weight_bytes(DIT, 2, fp8=False, fp32_prefixes=())) == 32.6
    assert rounded_gb(dit_weight_bytes(DIT, 2, fp8=False)) == 32.8
    # FP8: the 15.9B quantised weights at 1 byte, the other 0.36B at 2 (audio encoder at 4)
    assert rounded_gb(dit_weight_bytes(DIT, 2, fp8=True)) == 16.9
    # one step's ring: 10.4 GB at 704x384, 7.1 at 576x320, 4.4 at 448x256
    assert [rounded_gb(ring_bytes(DIT, s)) for s in SIZES] == [10.4, 7.1, 4.4]
    # the sink: 2640 tokens at 704x384 (1056 reference + 1584 FramePack)
    assert sink_bytes(DIT, "704*384") == 40 * 2 * 2640 * 5120 * 2


def test_the_plan_meets_the_issue_s_memory_targets() -> None:
    total = {(s, fp8): plan_memory(DIT, VAE, s, fp8=fp8).total / GB
             for s in SIZES for fp8 in (False, True)}
    assert total["704*384", False] > 85  # bf16 at full size: more than an 80 GB card
    assert total["704*384", True] <= 75  # FP8 at 704x384 and bf16 at 576x320 on an 80 GB card
    assert total["576*320", False] <= 75
    assert total["448*256", True] <= 46  # FP8 at 448x256 on a 48 GB card
    plan = plan_memory(DIT, VAE, "704*384", fp8=True)
    assert set(plan.items) >= {"dit_weights", "rings", "step_sinks", "decoder_cache",
                               "activations", "wav2vec2_weights", "text_kv"}
    assert "total" in plan.format() and "GiB" in plan.format()
    half = plan_memory(DIT, VAE, "704*384", fp8=True, wav2vec_dtype=torch.bfloat16)
    assert half.items["wav2vec2_weights"] * 2 == plan.items["wav2vec2_weights"]


def test_decoder_cache_by_meta_decode_equals_a_real_one(tiny_models) -> None:  # noqa: ANN001
    vae = tiny_models.vae
    cache = CausalCache()
    with torch.inference_mode():
        vae.decode(torch.randn(1, 16, 7, 8, 12), cache)
    assert decoder_cache_bytes(vae.cfg, 8, 12, torch.float32) == cache.nbytes()


def test_too_big_for_the_card_is_refused_with_what_would_fit() -> None:
    plan = plan_memory(DIT, VAE, "704*384", fp8=False)
    with pytest.raises(ConfigError) as err:
        check_fits(plan, H100, "cuda:0 (NVIDIA H100 80GB HBM3)",
                   alternatives_for(DIT, VAE, "704*384", False))
    msg = str(err.value)
    assert "engine.max_size='704*384'" in msg and "bfloat16" in msg
    assert "85.5 GB (79.6 GiB)" in msg and "NVIDIA H100" in msg
    assert 'fp8 = true at max_size = "704*384"' in msg and 'max_size = "576*320"' in msg
    assert "multi-GPU" in msg and "rings" in msg
    # a 48 GB card: only the smallest size with FP8
    with pytest.raises(ConfigError) as err:
        check_fits(plan_memory(DIT, VAE, "704*384", fp8=True), L40S, "cuda:0 (L40S)",
                   alternatives_for(DIT, VAE, "704*384", True))
    assert 'max_size = "448*256"' in str(err.value) and "576*320" not in str(err.value)
    check_fits(plan_memory(DIT, VAE, "448*256", fp8=True), L40S, "cuda:0", {})


def test_fit_places_the_text_encoder_and_sizes_the_avatar_cache() -> None:
    kw = dict(steps=4, dtype=torch.bfloat16, sessions=1, text_device="auto",
              avatar_cache_bytes=4096 << 20)
    big = fit_engine(DIT, VAE, T5, size="704*384", fp8=False, capacity=H200, device="h200",
                     **kw)
    assert big.text_on_device and big.avatar_cache_bytes == 4096 << 20
    assert "text_encoder" in big.plan.items and big.plan.total < H200
    small = fit_engine(DIT, VAE, T5, size="704*384", fp8=True, capacity=H100, device="h100",
                       **kw)
    assert not small.text_on_device  # 11 GB of umT5 would leave too little: it goes to the CPU
    assert 0 < small.avatar_cache_bytes <= 4096 << 20
    assert small.plan.total <= H100 - 1.5 * GB
    with pytest.raises(ConfigError, match="max_size='704\\*384'"):
        fit_engine(DIT, VAE, T5, size="704*384", fp8=False, capacity=H100, device="h100", **kw)
    assert 70 * GIB < small.plan.total


def test_sessions_above_max_size_are_refused(tiny_models, example_image) -> None:  # noqa: ANN001
    engine = WanEngine(tiny_models, EngineConfig(max_size="128*64"))
    try:
        with pytest.raises(InputError, match="larger than this engine's max_size '128\\*64'"):
            engine.open_session(SessionParams(image=example_image, size="704*384"))
        engine.open_session(SessionParams(image=example_image, size="64*64")).close()
    finally:
        engine.close()


def test_max_size_is_validated() -> None:
    with pytest.raises(ConfigError, match="engine.max_size='huge'"):
        EngineConfig.parse({"max_size": "huge"})
