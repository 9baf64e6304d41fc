"""config.toml's [engine] section parses into frozen dataclasses; bad values name their key."""

from __future__ import annotations

import tomllib

import pytest

from engine.config import EngineConfig
from engine.errors import ConfigError
from tests.conftest import REPO


def test_shipped_config_parses_to_defaults() -> None:
    raw = tomllib.loads((REPO / "config.toml").read_text())
    assert EngineConfig.parse(raw["engine"]) == EngineConfig()


@pytest.mark.parametrize("raw, needle", [
    ({"dtype": "fp8"}, "engine.dtype='fp8'"),
    ({"device": "tpu"}, "engine.device='tpu'"),
    ({"lora_alpha": "big"}, "engine.lora_alpha='big': expected float"),
    ({"sampling": {"steps": 0}}, "engine.sampling.steps=0 is out of range: accepted 1..50"),
    ({"sampling": {"shfit": 3}}, "[engine.sampling] has unknown key(s) ['shfit']"),
    ({"chekpoint": "/x"}, "[engine] has unknown key(s) ['chekpoint']"),
    ({"fp8": "yes"}, "engine.fp8='yes': expected true or false"),
    ({"fp8_scaling": "block"}, "engine.fp8_scaling='block': accepted ('tensor', 'row')"),
    ({"audio_dtype": "float16"},
     "engine.audio_dtype='float16': accepted ('float32', 'bfloat16')"),
    ({"attention_backend": "fastest"}, "engine.attention_backend='fastest': accepted"),
    ({"compile_mode": "turbo"}, "engine.compile_mode='turbo': accepted"),
    ({"avatar_cache_mb": -1}, "engine.avatar_cache_mb=-1 is out of range"),
    ({"text_device": "tpu"}, "engine.text_device='tpu': accepted auto, cpu, cuda, cuda:N"),
    ({"random_shapes": "7B"}, "engine.random_shapes='7B': accepted"),
    ({"max_size": "704"}, "engine.max_size='704'"),
    ({"layout": "4+gpu"}, "engine.layout='4+gpu': accepted \"k\""),
    ({"layout": "0"}, "engine.layout='0'"),
    ({"layout": "4", "sampling": {"steps": 3}},
     "engine.layout='4' gives each of its 4 DiT ranks at least one step, but "
     "engine.sampling.steps=3"),
    ({"group_launch": "ssh"}, "engine.group_launch='ssh': accepted ('spawn', 'torchrun')"),
    ({"group_listen": "29600"}, "engine.group_listen='29600': expected HOST:PORT"),
    ({"group_launch": "torchrun"}, "needs a fixed port in engine.group_listen"),
    ({"rank_timeout_s": 0.1}, "engine.rank_timeout_s=0.1 is out of range"),
    ({"warm_up_sizes": "576*320, 1280*720"},
     "engine.warm_up_sizes: '1280*720' is larger than max_size '704*384'"),
    ({"warm_up_sizes": "576"}, "engine.warm_up_sizes: '576'"),
])
def test_bad_values_are_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig.parse(raw)
    assert needle in str(err.value)


def test_plain_turns_every_speed_path_off() -> None:
    fast = EngineConfig.parse({"fp8": True, "compile": True, "avatar_cache_mb": 100,
                               "vae_compile": True})
    plain = fast.plain()
    assert (plain.fp8, plain.compile, plain.vae_overlap, plain.vae_channels_last,
            plain.vae_compile, plain.avatar_cache_mb, plain.attention_backend) == (
        False, False, False, False, False, 0, "default")
    assert set(EngineConfig.speed_keys()) == {"fp8", "compile", "vae_overlap",
                                              "vae_channels_last", "vae_compile",
                                              "avatar_cache_mb", "attention_backend"}


def test_layouts() -> None:
    from engine.parallel.layout import Layout

    four = Layout.parse("4+vae")
    assert (four.world, four.dit_ranks, four.decoder_rank, four.stages) == (5, 4, 4, 5)
    assert [four.steps_of(r, 4) for r in range(5)] == [range(0, 1), range(1, 2), range(2, 3),
                                                       range(3, 4), range(0)]
    # uneven: the extra steps go to the last DiT ranks (rank 0 also computes the features)
    assert [list(four.steps_of(r, 6)) for r in range(4)] == [[0], [1], [2, 3], [4, 5]]
    assert four.max_share(6) == 2
    assert [list(Layout.parse("2").steps_of(r, 3)) for r in range(2)] == [[0], [1, 2]]
    assert Layout.parse("1").single and not Layout.parse("1+vae").single
    roles = [four.role(r) for r in range(5)]
    # the VAE rank computes the features; rank 0 the audio tokens from them
    assert roles[0].parts == ("dit",) and roles[0].tokens and roles[3].parts == ("dit",)
    assert roles[4].parts == ("vae", "text", "wav2vec") and roles[3].last_dit
    # layout 4: the features on rank 1, which has neither the audio encoder nor the VAE
    plain4 = Layout.parse("4")
    assert [plain4.role(r).parts for r in range(4)] == [
        ("dit",), ("dit", "wav2vec"), ("dit",), ("dit", "vae", "text")]
    assert plain4.role(0).tokens and plain4.features_rank == 1
    assert Layout.parse("3").features_rank == 1
    two = Layout.parse(" 2 ")
    assert two.role(1).parts == ("dit", "vae", "text") and str(two) == "2"
    assert two.role(0).parts == ("dit", "wav2vec")  # too few ranks to keep them apart
    assert roles[3].describe(four, 4) == "rank 3: DiT step 3"
    with pytest.raises(ValueError, match="needs 4 or more steps"):
        four.steps_of(0, 3)


def test_warm_up_sizes_other_than_max_size_in_order_once() -> None:
    cfg = EngineConfig.parse({"max_size": "704*384",
                              "warm_up_sizes": "448*256, 704*384,576*320,448*256,"})
    assert cfg.extra_warm_up_sizes() == ("448*256", "576*320")
    assert EngineConfig().extra_warm_up_sizes() == ()
