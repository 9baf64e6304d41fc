"""Every component of the tiny checkpoint loads strictly and runs a CPU forward of documented shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint.layout import CheckpointLayout
from engine.checkpoint.loader import load_dit, load_text_encoder, load_vae, load_wav2vec
from engine.errors import CheckpointError
from engine.models.audio import feature_frames, normalize_wave
from engine.models.vae import CausalCache
from engine.progress import ProgressPrinter

F32 = torch.float32


@pytest.fixture(scope="module")
def layout(tiny_ckpt_master: Path) -> CheckpointLayout:
    return CheckpointLayout.at(tiny_ckpt_master)


def dit_inputs(frames: int = 3, h: int = 8, w: int = 8, text_dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(1, 16, frames, h, w, generator=g),
        timestep=torch.tensor([857.69]),
        context=torch.randn(1, 9, text_dim, generator=g),
        ref=torch.randn(1, 16, 1, h, w, generator=g),
        motion=torch.randn(1, 16, 19, h, w, generator=g),
        audio_feats=torch.randn(1, 25, 32, 4 * frames, generator=g),
    )


def test_dit_forward_shape_and_finite(layout: CheckpointLayout) -> None:
    dit = load_dit(layout, "cpu", F32, lora_alpha=2.0)
    with torch.no_grad():
        out = dit(**dit_inputs())
    assert out.shape == (1, 16, 3, 8, 8)
    assert out.dtype == F32 and torch.isfinite(out).all()
    assert out.abs().max() > 0


def test_dit_forward_non_square_and_short_motion(layout: CheckpointLayout) -> None:
    # 64x128 px -> latent 8x16; fewer than 19 motion latents exercises the zero padding
    dit = load_dit(layout, "cpu", F32, lora_alpha=2.0)
    inputs = dit_inputs(frames=2, h=8, w=16)
    inputs["motion"] = inputs["motion"][:, :, :5]
    with torch.no_grad():
        out = dit(**inputs)
    assert out.shape == (1, 16, 2, 8, 16) and torch.isfinite(out).all()


def test_dit_bf16_keeps_audio_encoder_fp32(layout: CheckpointLayout) -> None:
    dit = load_dit(layout, "cpu", torch.bfloat16, lora_alpha=2.0)
    assert dit.patch_embedding.weight.dtype == torch.bfloat16
    assert dit.casual_audio_encoder.encoder.conv1_local.conv.weight.dtype == F32
    with torch.no_grad():
        out = dit(**dit_inputs())
    assert out.dtype == F32 and torch.isfinite(out).all()


def test_lora_merge_equals_low_rank_formula(layout: CheckpointLayout) -> None:
    alpha = 2.0
    base = load_dit(layout, "cpu", F32, use_lora=False)
    merged = load_dit(layout, "cpu", F32, lora_alpha=alpha)
    lora = layout.lora()
    assert lora is not None
    checked = 0
    with safe_open(str(lora), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            a = f.get_tensor(key).float()
            b = f.get_tensor(key.replace(".lora_A.", ".lora_B.")).float()
            want = base.get_submodule(module).weight + (alpha / a.shape[0]) * (b @ a)
            torch.testing.assert_close(merged.get_submodule(module).weight, want,
                                       rtol=0, atol=1e-6)
            checked += 1
    assert checked == 38
    # everything that is not a LoRA target is untouched
    torch.testing.assert_close(merged.head.head.weight, base.head.head.weight, rtol=0, atol=0)


def _rewrite_lora(path: Path, rename) -> None:
    with safe_open(str(path), "pt") as f:
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path))


@pytest.mark.parametrize("style", ["no_prefix", "peft_saved", "kohya"])
def test_lora_key_variants(tiny_ckpt: Path, style: str) -> None:
    lay = CheckpointLayout.at(tiny_ckpt)
    reference = load_dit(lay, "cpu", F32, lora_alpha=2.0)
    path = lay.lora()
    assert path is not None
    if style == "no_prefix":
        _rewrite_lora(path, lambda k: k.removeprefix("base_model.model."))
    elif style == "peft_saved":
        _rewrite_lora(path, lambda k: k.replace(".default.", "."))
    else:
        _rewrite_lora(path, lambda k: k.removeprefix("base_model.model.")
                      .replace(".lora_A.default.", ".lora_down.")
                      .replace(".lora_B.default.", ".lora_up."))
    variant = load_dit(lay, "cpu", F32, lora_alpha=2.0)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(variant.get_parameter(name), p, rtol=0, atol=0)


def test_loader_refuses_mismatched_dit(tiny_ckpt: Path) -> None:
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["ffn_dim"] = 96
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_dit(CheckpointLayout.at(tiny_ckpt), "cpu", F32)
    assert "blocks.0.ffn.0.weight: expected [96, 64], file has [128, 64]" in str(err.value)


def test_config_fallbacks_are_14b_values_and_reported(tiny_ckpt: Path) -> None:
    from engine.checkpoint.inspect import inspect_dit

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    for key in ("dim", "ffn_dim", "num_layers", "audio_dim", "eps", "text_len"):
        del cfg[key]
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    found = inspect_dit(CheckpointLayout.at(tiny_ckpt))
    assert found.report.ok, found.report.format()
    assert found.config is not None
    assert (found.config.dim, found.config.ffn_dim, found.config.num_layers) == (64, 128, 3)
    assert found.config.eps == 1e-6 and found.config.text_len == 512
    notes = "\n".join(found.report.notes)
    assert "omits dim; read 64 from the tensor shapes" in notes
    assert "omits eps; using the 14B value 1e-06" in notes


def test_config_fallback_that_cannot_fit_fails_naming_the_key(tiny_ckpt: Path) -> None:
    from engine.checkpoint.inspect import inspect_dit

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    del cfg["audio_inject_layers"]  # the 14B list names blocks a 3-block model does not have
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    found = inspect_dit(CheckpointLayout.at(tiny_ckpt))
    assert not found.report.ok
    text = found.report.format()
    assert "audio_inject_layers" in text and "[0, 4, 8" in text


def test_small_model_with_4096_text_dim(tmp_path: Path) -> None:
    from engine.checkpoint.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "wide", text_dim=4096)
    lay = CheckpointLayout.at(path)
    dit = load_dit(lay, "cpu", F32, lora_alpha=2.0)
    assert dit.cfg.text_dim == 4096 and dit.cfg.dim == 64
    text = load_text_encoder(lay, "cpu", F32)
    ctx = text.encode(["a person is talking"])[0]
    assert ctx.shape[1] == 4096
    inputs = dit_inputs(text_dim=4096)
    inputs["context"] = ctx[None]
    with torch.no_grad():
        assert torch.isfinite(dit(**inputs)).all()


def test_text_encoder_trims_to_true_length(layout: CheckpointLayout) -> None:
    enc = load_text_encoder(layout, "cpu", F32)
    out = enc.encode(["a person is talking to the camera", "  hello&amp;amp;   world "])
    ids = enc.tokenizer("a person is talking to the camera")["input_ids"]
    assert ids[-1] == 1  # </s> appended
    assert out[0].shape == (len(ids), 32)
    assert all(torch.isfinite(o).all() for o in out)
    # padding does not change the states of real tokens: encode alone == encode in a batch
    alone = enc.encode(["a person is talking to the camera"])[0]
    torch.testing.assert_close(alone, out[0], rtol=1e-5, atol=1e-5)


def test_wav2vec_gives_all_hidden_states(layout: CheckpointLayout) -> None:
    w2v = load_wav2vec(layout, "cpu", F32)
    wave = torch.randn(2, 7760, generator=torch.Generator().manual_seed(0))
    feats = w2v(normalize_wave(wave))
    assert feats.shape == (2, 25, feature_frames(7760), 32) == (2, 25, 24, 32)
    assert torch.isfinite(feats).all()


def test_wav2vec_in_bfloat16_is_close_to_float32(layout: CheckpointLayout) -> None:
    # [engine] audio_dtype = "bfloat16": half of wav2vec2's memory; its features stay float32
    # tensors and within bf16 rounding of the float32 model's
    w32 = load_wav2vec(layout, "cpu", F32)
    w16 = load_wav2vec(layout, "cpu", torch.bfloat16)
    assert next(w16.parameters()).dtype == torch.bfloat16
    wave = normalize_wave(torch.randn(1, 7760, generator=torch.Generator().manual_seed(1)))
    got, want = w16(wave), w32(wave)
    assert got.dtype == F32 and got.shape == want.shape
    err = ((got - want).norm() / want.norm()).item()
    assert err < 0.05, f"bf16 wav2vec2 relative error {err:.4f}"


def test_text_kv_keeps_one_padding_row_and_gives_every_row_back(
        layout: CheckpointLayout) -> None:
    dit = load_dit(layout, "cpu", F32, lora_alpha=2.0)
    context = dit_inputs()["context"]  # 9 tokens of text_len
    with torch.no_grad():
        full = dit.text_kv(context, compact=False)
        compact = dit.text_kv(context)
        long = dit.text_kv(torch.randn(1, dit.cfg.text_len - 1, context.shape[2]))
    lt = dit.cfg.text_len
    assert full.length == 0 and full.keys[0].shape[1] == lt
    assert compact.length == lt and compact.keys[0].shape[1] == 10
    assert compact.nbytes * lt == full.nbytes * 10
    for i in range(len(dit.blocks)):
        for got, want in zip(compact.layer(i), full.layer(i), strict=True):
            assert got.shape == want.shape and torch.equal(got, want)
    assert long.length == 0 and long.keys[0].shape[1] == lt  # nothing to drop: kept whole


def test_wav2vec_legacy_and_new_weight_norm_names_agree(tiny_ckpt: Path) -> None:
    lay = CheckpointLayout.at(tiny_ckpt)
    legacy = load_wav2vec(lay, "cpu", F32)
    path = lay.wav2vec / "model.safetensors"
    _rewrite_lora(path, lambda k: k.replace("weight_g", "parametrizations.weight.original0")
                  .replace("weight_v", "parametrizations.weight.original1"))
    modern = load_wav2vec(lay, "cpu", F32)
    wave = normalize_wave(torch.randn(1, 4000))
    torch.testing.assert_close(legacy(wave), modern(wave), rtol=0, atol=0)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_vae_maps_1_plus_4k_frames_to_1_plus_k_latents(layout: CheckpointLayout, k: int) -> None:
    vae = load_vae(layout, "cpu", F32)
    pixels = torch.rand(1, 3, 1 + 4 * k, 64, 96, generator=torch.Generator().manual_seed(k)) * 2 - 1
    with torch.no_grad():
        lat = vae.encode(pixels)
        assert lat.shape == (1, 16, 1 + k, 8, 12)
        back = vae.decode(lat)
    assert back.shape == pixels.shape
    assert torch.isfinite(back).all() and back.abs().max() <= 1.0


def test_vae_chunked_encode_equals_whole(layout: CheckpointLayout) -> None:
    vae = load_vae(layout, "cpu", F32)
    pixels = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(pixels)
        cache = CausalCache()
        parts = [vae.encode(pixels[:, :, :1], cache), vae.encode(pixels[:, :, 1:5], cache),
                 vae.encode(pixels[:, :, 5:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)


def test_progress_is_reported(layout: CheckpointLayout) -> None:
    import io

    buf = io.StringIO()
    load_vae(layout, "cpu", F32, progress=ProgressPrinter(buf))
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("loading vae: 100%")
