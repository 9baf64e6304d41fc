"""wav2vec2 speech features through `transformers.Wav2Vec2Model`: all hidden states, 50 Hz.

The checkpoint folder `wav2vec2-large-xlsr-53-english/` holds a `Wav2Vec2ForCTC` (keys under
`wav2vec2.` plus an unused `lm_head`). Its positional conv may be saved with the legacy
weight-norm names `weight_g`/`weight_v`; `to_model_key` maps every file key onto the names the
installed transformers uses. The S2V DiT mixes all num_hidden_layers + 1 hidden states (25 for
the released model): the input of layer 0 (after the positional conv) and every layer's output.

Which tensor is "the last hidden state" changed inside transformers. Wan2.2 was trained under
transformers <= 4.51, where `hidden_states[-1]` of the released "stable layer norm" layout
(`do_stable_layer_norm: true`) is the encoder output *after* its final `layer_norm`; from
transformers 5 on, `hidden_states[-1]` is the last layer's output *before* that norm. Both agree
that `last_hidden_state` is the encoder's final output (after the norm for the stable layout, the
last layer's output for the other one), so the 25th state is always taken from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

SAMPLE_RATE = 16000
HOP = 320  # samples per 50 Hz feature frame
RECEPTIVE_FIELD = 400  # samples seen by the first feature frame


def feature_frames(samples: int) -> int:
    """Number of 50 Hz frames wav2vec2 yields for `samples` samples: floor((N-400)/320)+1."""
    return 0 if samples < RECEPTIVE_FIELD else (samples - RECEPTIVE_FIELD) // HOP + 1


def load_config(folder: Path) -> Wav2Vec2Config:
    path = folder / "config.json"
    with path.open() as f:
        raw = json.load(f)
    return Wav2Vec2Config(**{k: v for k, v in raw.items() if k != "architectures"})


def build_model(config: Wav2Vec2Config) -> Wav2Vec2Model:
    return Wav2Vec2Model(config)


def weight_norm_names(model: nn.Module) -> tuple[str, str]:
    """The (g, v) suffixes this transformers version uses for the positional conv's weight norm."""
    keys = model.state_dict().keys()
    if any(k.endswith("pos_conv_embed.conv.parametrizations.weight.original0") for k in keys):
        return "parametrizations.weight.original0", "parametrizations.weight.original1"
    return "weight_g", "weight_v"


def to_model_key(file_key: str, g_name: str, v_name: str) -> str | None:
    """Checkpoint key -> Wav2Vec2Model key; None for keys the feature model does not use."""
    key = file_key[len("wav2vec2."):] if file_key.startswith("wav2vec2.") else file_key
    if key.startswith("lm_head.") or key.startswith("quantizer.") or key.startswith("project_"):
        return None
    for legacy, new in (("weight_g", g_name), ("weight_v", v_name),
                        ("parametrizations.weight.original0", g_name),
                        ("parametrizations.weight.original1", v_name)):
        suffix = "pos_conv_embed.conv." + legacy
        if key.endswith(suffix):
            return key[: -len(legacy)] + new
    return key


def normalize_wave(wave: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance per row, as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    wave = wave.float()
    mean = wave.mean(dim=-1, keepdim=True)
    var = wave.var(dim=-1, keepdim=True, unbiased=False)
    return (wave - mean) / torch.sqrt(var + 1e-7)


class Wav2Vec2Features(nn.Module):
    """Normalised 16 kHz waveform [B, N] -> hidden states [B, L+1, T50, A] (float32)."""

    def __init__(self, model: Wav2Vec2Model):
        super().__init__()
        if getattr(model.config, "add_adapter", False):
            # the adapter would replace `last_hidden_state`, which stands in for the 25th state
            raise ValueError("wav2vec2 configs with add_adapter=true are not supported (the "
                             "released wav2vec2-large-xlsr-53-english has none)")
        self.model = model

    @property
    def num_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # the first layer's dtype (the model's first parameter, masked_spec_embed, is unused)
        dtype = next(self.model.feature_extractor.parameters()).dtype
        out = self.model(wave.to(dtype), output_hidden_states=True)
        # the transformers 4.x definition under every version (see the module docstring)
        states = (*out.hidden_states[:-1], out.last_hidden_state)
        return torch.stack(states, dim=1).float()
