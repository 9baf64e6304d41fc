"""The attention backend: probed and chosen at start-up; every backend that runs here gives the
same DiT step (CPU: math and the CPU flash kernel; the GPU test covers cuDNN/flash/efficient)."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.errors import ConfigError
from engine.kv_cache import StepAttention, StepKV
from engine.models.rope import RopeAngles
from engine.speed.attention import BACKENDS, AttentionChoice, choose, probe
from engine.transfer import to_device


def test_probe_names_what_runs_and_what_does_not() -> None:
    probed = probe(torch.device("cpu"), torch.float32, heads=2, head_dim=32, q_tokens=48,
                   kv_tokens=232)
    assert set(probed) == set(BACKENDS)
    assert isinstance(probed["math"], float) and isinstance(probed["flash"], float)
    assert str(probed["cudnn"]).startswith("not available")


def test_choice_is_logged_and_a_backend_that_cannot_run_is_refused(caplog) -> None:  # noqa: ANN001
    with caplog.at_level(logging.INFO, logger="engine.speed.attention"):
        choice = choose("math", torch.device("cpu"), torch.float32, 2, 32, 48, 232)
    assert choice.name == "math" and "attention backend for 48 queries x 232 keys: math" in \
        caplog.text
    assert choose("auto", torch.device("cpu"), torch.float32, 2, 32, 48, 232).name == "default"
    with pytest.raises(ConfigError, match="attention_backend='cudnn' cannot run here"):
        choose("cudnn", torch.device("cpu"), torch.float32, 2, 32, 48, 232)
    with pytest.raises(ConfigError, match="accepted"):
        choose("fastest", torch.device("cpu"), torch.float32, 2, 32, 48, 232)


def test_every_available_backend_gives_the_same_step(tiny_models) -> None:  # noqa: ANN001
    dit = tiny_models.dit
    cfg = dit.cfg
    g = torch.Generator().manual_seed(5)
    hh = ww = 8
    with torch.inference_mode():
        text = dit.text_kv(torch.randn(1, 9, cfg.text_dim, generator=g))
        sink = dit.prefill_sink(*dit.embed_sink(torch.randn(1, 16, 1, hh, ww, generator=g),
                                                torch.randn(1, 16, 19, hh, ww, generator=g)),
                                text)
        audio = dit.encode_audio(torch.randn(1, cfg.audio_layers, cfg.audio_dim, 12,
                                             generator=g))
    x = torch.randn(1, 16, 3, hh, ww, generator=g)
    rope = RopeAngles(cfg.rope_bands, "cpu")
    runs = [n for n, t in probe(torch.device("cpu"), torch.float32, cfg.num_heads,
                                cfg.head_dim, 48, 232).items() if isinstance(t, float)]
    assert {"math", "flash"} <= set(runs)
    out = {}
    for name in runs:
        kv = StepKV(cfg.num_layers, 1, sink.keys.shape[2], sink.ref_tokens, 12, 16,
                    cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
        kv.set_sink(sink, rope.of(to_device(sink.positions[sink.ref_tokens:], "cpu")))
        kv.rotate_reference(sink, rope.grid(30, 1, 4, 4))
        with torch.inference_mode(), AttentionChoice(name).active():
            out[name] = dit.denoise(x, torch.full((1,), 602.15), audio, text,
                                    StepAttention(kv, rope.grid(0, 3, 4, 4), 3))
    for name in runs:
        torch.testing.assert_close(out[name], out["math"], rtol=1e-4, atol=1e-5)
