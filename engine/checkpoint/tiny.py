"""Write a random tiny checkpoint in exactly the published layout (`avatar make-tiny-checkpoint`).

Same files, key names, dtypes and nesting as Wan2.2-S2V-14B + Live-Avatar, with tiny widths
(reference: wan-s2v-checkpoint-format.md section 8) so that every loading and inference path runs
on a CPU in tests: 2 DiT shards + index (bf16), the VAE .pth (fp32, base dim 8, z_dim 16), the
umT5 .pth (bf16, width 32), a Unigram tokenizer, a 24-layer wav2vec2 CTC folder (legacy
weight_g/weight_v names) and a rank-4 LoRA with PEFT key names. The same seed gives the same files.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from engine.checkpoint import layout as names
from engine.models import dit as dit_model
from engine.models import text as text_model
from engine.models import vae as vae_model

TINY_DIT = dit_model.DiTConfig(
    dim=64, ffn_dim=128, num_heads=2, num_layers=3, freq_dim=256, text_len=512, text_dim=32,
    audio_dim=32, audio_inject_layers=(0, 2))
TINY_VAE = vae_model.VAEConfig(dim=8)
TINY_T5 = text_model.UMT5Dims(vocab=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
TINY_W2V = dict(
    hidden_size=32, num_hidden_layers=24, num_attention_heads=2, intermediate_size=64,
    conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=33,
    mask_time_prob=0.05, layer_norm_eps=1e-5, hidden_act="gelu", feat_extract_activation="gelu",
    architectures=["Wav2Vec2ForCTC"], model_type="wav2vec2", pad_token_id=0, bos_token_id=1,
    eos_token_id=2)
TINY_LORA_RANK = 4
TINY_LORA_ALPHA = 2.0  # scale 0.5, the same as the released rank 128 / alpha 64
WORDS = ("a", "the", "person", "man", "woman", "is", "talking", "speaking", "to", "camera",
         "with", "and", "of", "in", "smiling", "face", "clear", "video")


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Deterministic random weights scaled by fan-in, so activations stay O(1)."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p[0].numel() if p.dim() >= 2 else p.numel()
            std = 1.0 / max(fan_in, 1) ** 0.5 if p.dim() >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _dit_config_json(cfg: dit_model.DiTConfig) -> dict:
    # what diffusers' save_config writes for WanModel_S2V (ignore_for_config keys omitted)
    return {
        "_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0",
        "adain_mode": "attn_norm", "add_last_motion": cfg.add_last_motion,
        "audio_dim": cfg.audio_dim, "audio_inject_layers": list(cfg.audio_inject_layers),
        "cond_dim": cfg.cond_dim, "dim": cfg.dim, "enable_adain": cfg.enable_adain,
        "enable_framepack": True, "enable_motioner": False, "enable_tsm": False, "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim, "framepack_drop_mode": "padd", "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim, "model_type": "s2v", "motion_token_num": 1024,
        "num_audio_token": cfg.num_audio_token, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "out_dim": cfg.out_dim, "text_len": cfg.text_len,
        "trainable_token_pos_emb": False, "zero_init": True, "zero_timestep": cfg.zero_timestep,
    }


def _write_dit(root: Path, gen: torch.Generator, shards: int,
               cfg: dit_model.DiTConfig) -> dit_model.WanS2VDiT:
    model = dit_model.WanS2VDiT(cfg)
    _randomize(model, gen)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with (root / names.DIT_INDEX).open("w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with (root / names.CONFIG).open("w") as f:
        json.dump(_dit_config_json(cfg), f, indent=2)
    return model


def _write_lora(root: Path, model: nn.Module, gen: torch.Generator) -> None:
    tensors = {}
    for module in dit_model.lora_target_modules(model):
        lin = model.get_submodule(module)
        assert isinstance(lin, nn.Linear)
        a = torch.randn(TINY_LORA_RANK, lin.in_features, generator=gen) * 0.02
        b = torch.randn(lin.out_features, TINY_LORA_RANK, generator=gen) * 0.02
        tensors[f"base_model.model.{module}.lora_A.default.weight"] = a.to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.default.weight"] = b.to(torch.bfloat16)
    path = root / names.LORA
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_vae(root: Path, gen: torch.Generator) -> None:
    model = vae_model.WanVAE(TINY_VAE)
    _randomize(model, gen)
    with torch.no_grad():  # RMS-norm gains near 1 keep the tiny decoder's output in range
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(1.0)
    torch.save({k: v.float().contiguous() for k, v in model.state_dict().items()}, root / names.VAE)


def _write_t5(root: Path, gen: torch.Generator, dims: text_model.UMT5Dims) -> None:
    model = text_model.build_encoder(dims)
    _randomize(model, gen)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        sd[text_model.hf_to_wan_key(k)] = v.to(torch.bfloat16).contiguous()
    torch.save(sd, root / names.T5)


def build_tokenizer() -> Any:
    """A small Unigram tokenizer with umT5's special tokens (a `tokenizers.Tokenizer`).

    Random-weight engines use it in memory; its ids fit the tiny embedding and any larger one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -2.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(chr(c), -6.0) for c in range(ord("a"), ord("z") + 1)]
    if len(pieces) > TINY_T5.vocab:
        raise AssertionError("tiny tokenizer larger than the tiny embedding")
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    return tok


TOKENIZER_SPECIAL = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _write_tokenizer(root: Path) -> None:
    folder = root / names.TOKENIZER
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    special = TOKENIZER_SPECIAL
    with (folder / "tokenizer_config.json").open("w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
                   "additional_special_tokens": [], **special}, f, indent=2)
    with (folder / "special_tokens_map.json").open("w") as f:
        json.dump(special, f, indent=2)


def _write_wav2vec(root: Path, seed: int) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    folder = root / names.WAV2VEC
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Wav2Vec2Config(**{k: v for k, v in TINY_W2V.items() if k != "model_type"})  # type: ignore[arg-type]
    model = Wav2Vec2ForCTC(config)
    sd = {}
    for k, v in model.state_dict().items():
        # the released folder predates parametrized weight norm: legacy names
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        sd[k] = v.float().contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with (folder / "config.json").open("w") as f:
        json.dump(TINY_W2V, f, indent=2)
    with (folder / "preprocessor_config.json").open("w") as f:
        json.dump({"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                   "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                   "return_attention_mask": True, "sampling_rate": 16000}, f, indent=2)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({chr(ord("a") + i): 5 + i for i in range(26)})
    vocab.update({"'": 31, "-": 32})
    with (folder / "vocab.json").open("w") as f:
        json.dump(vocab, f)
    with (folder / "special_tokens_map.json").open("w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>"}, f)


def make_tiny_checkpoint(root: str | Path, seed: int = 0, shards: int = 2,
                         text_dim: int = TINY_DIT.text_dim) -> Path:
    """Write the tiny checkpoint into `root` (created if needed); returns the folder.

    `text_dim` sets the umT5 width and the DiT's text input width together (4096 gives a tiny
    DiT that upstream code could also load, since upstream fixes text_dim at 4096).
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model = _write_dit(path, gen, shards, replace(TINY_DIT, text_dim=text_dim))
    _write_lora(path, model, gen)
    _write_vae(path, gen)
    _write_t5(path, gen, replace(TINY_T5, dim=text_dim))
    _write_tokenizer(path)
    _write_wav2vec(path, seed)
    return path
