"""The 25 wav2vec2 states the DiT mixes are the transformers 4.x ones under every version.

Each state is recomputed layer by layer through the model's own submodules, following the 4.x
definition (the input of layer 0 after the positional conv, then every layer's output, the last
one after the encoder's final layer norm for the "stable layer norm" layout), and compared with
what `Wav2Vec2Features` returns. Under transformers 5, passing `out.hidden_states` through
unchanged gives the pre-norm last layer instead, which this test catches.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2Config

from engine.models.audio import Wav2Vec2Features, build_model


def tiny_config(stable: bool) -> Wav2Vec2Config:
    return Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_bias=True, feat_extract_norm="layer" if stable else "group",
        do_stable_layer_norm=stable, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, vocab_size=33, layer_norm_eps=1e-5)


def _layer_output(out: object) -> torch.Tensor:
    # transformers 4.x layers return a tuple, 5.x a tensor
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


def reference_states(model, wave: torch.Tensor) -> torch.Tensor:
    """The 4.x `hidden_states`, computed one submodule at a time -> [B, L+1, T, A]."""
    feats = model.feature_extractor(wave).transpose(1, 2)
    hidden, _ = model.feature_projection(feats)
    enc = model.encoder
    hidden = hidden + enc.pos_conv_embed(hidden)
    stable = model.config.do_stable_layer_norm
    if not stable:  # the post-norm layout normalises before the first layer
        hidden = enc.layer_norm(hidden)
    states = [hidden]
    for layer in enc.layers:
        hidden = _layer_output(layer(hidden))
        states.append(hidden)
    if stable:  # ...and the stable one after the last layer, which 4.x reports as the last state
        states[-1] = enc.layer_norm(hidden)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("stable", [True, False], ids=["stable-layer-norm", "post-norm"])
def test_every_state_matches_the_4x_definition(stable: bool) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(stable)).eval()
    wave = torch.randn(1, 16000)
    with torch.no_grad():
        got = Wav2Vec2Features(model)(wave)
        want = reference_states(model, wave)
    assert got.shape == (1, 5, 49, 32)
    for i in range(want.shape[1]):
        torch.testing.assert_close(got[:, i], want[:, i], rtol=1e-5, atol=1e-5,
                                   msg=f"hidden state {i} of {want.shape[1]} differs")
    if stable:  # the last state really is normalised: this is what the test guards
        last = want[:, -1]
        assert last.mean(-1).abs().max() < 1e-4 and (last.std(-1, unbiased=False) - 1).abs().max() < 0.05


def test_adapter_configs_are_refused() -> None:
    config = tiny_config(True)
    config.add_adapter = True
    config.output_hidden_size = 32
    with pytest.raises(ValueError, match="add_adapter"):
        Wav2Vec2Features(build_model(config))
