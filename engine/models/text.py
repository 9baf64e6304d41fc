"""umT5-XXL text encoder through `transformers.UMT5EncoderModel`, fed from Wan's `.pth` keys.

Wan stores the encoder as a flat state dict (`token_embedding`, `blocks.i.attn.q`, ...); the
transformers model is the same network under other names, so loading is a pure key rename (no
reshape). Every hyper-parameter is recovered from tensor shapes. Prompts are cleaned and tokenised
as Wan does (padding to text_len, `</s>` appended) and each output is trimmed to its true length.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

# 1. Dimensions and key map ----------------------------------------------------------------------


@dataclass(frozen=True)
class UMT5Dims:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> UMT5Dims:
        """Recover the architecture from Wan-named tensor shapes."""
        try:
            vocab, dim = shapes["token_embedding.weight"]
            dim_attn = shapes["blocks.0.attn.q.weight"][0]
            dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
            buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        except KeyError as exc:
            raise ValueError(f"not a Wan umT5 encoder state dict: missing {exc.args[0]}") from None
        layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
        return cls(vocab, dim, dim_attn, dim_ffn, heads, layers, buckets)

    def hf_config(self) -> UMT5Config:
        return UMT5Config(
            vocab_size=self.vocab, d_model=self.dim, d_kv=self.dim_attn // self.num_heads,
            d_ff=self.dim_ffn, num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False)


_BLOCK_RENAMES = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)


def wan_to_hf_key(key: str) -> str:
    """Wan umT5 key -> transformers UMT5EncoderModel key (raises KeyError for unknown keys)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        for wan, hf in _BLOCK_RENAMES:
            if m.group(2) == wan:
                return f"encoder.block.{m.group(1)}.{hf}"
    raise KeyError(key)


def hf_to_wan_key(key: str) -> str:
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
    if m:
        for wan, hf in _BLOCK_RENAMES:
            if m.group(2) == hf:
                return f"blocks.{m.group(1)}.{wan}"
    raise KeyError(key)


def build_encoder(dims: UMT5Dims) -> UMT5EncoderModel:
    return UMT5EncoderModel(dims.hf_config())


def expected_state_dict_shapes(dims: UMT5Dims) -> dict[str, tuple[int, ...]]:
    """Wan-named key -> shape for these dims, built on the meta device."""
    with torch.device("meta"):
        model = build_encoder(dims)
    return {hf_to_wan_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


# 2. Prompt handling -----------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: unescape HTML twice, collapse whitespace, strip.

    (Wan also runs ftfy.fix_text first; it is used here when installed.)
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# 3. The encoder ---------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Tokenizer + umT5 encoder: prompts -> per-prompt states [L_i, dim], trimmed to true length."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length",
                               truncation=True, max_length=self.text_len,
                               add_special_tokens=True, return_tensors="pt")
        device = self.model.shared.weight.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [s[:n] for s, n in zip(states, lengths, strict=True)]
