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
    ({"attention_backend": "fastest"}, "engine.attention_backend='fastest': accepted"),
    ({"compile_mode": "turbo"}, "engine.compile_mode='turbo': accepted"),
    ({"avatar_cache_mb": -1}, "engine.avatar_cache_mb=-1 is out of range"),
    ({"text_device": "tpu"}, "engine.text_device='tpu': accepted auto, cpu, cuda, cuda:N"),
    ({"random_shapes": "7B"}, "engine.random_shapes='7B': accepted"),
    ({"max_size": "704"}, "engine.max_size='704'"),
])
def test_bad_values_are_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig.parse(raw)
    assert needle in str(err.value)


def test_plain_turns_every_speed_path_off() -> None:
    fast = EngineConfig.parse({"fp8": True, "compile": True, "avatar_cache_mb": 100})
    plain = fast.plain()
    assert (plain.fp8, plain.compile, plain.vae_overlap, plain.vae_channels_last,
            plain.avatar_cache_mb, plain.attention_backend) == (False, False, False, False, 0,
                                                                "default")
    assert set(EngineConfig.speed_keys()) == {"fp8", "compile", "vae_overlap",
                                              "vae_channels_last", "avatar_cache_mb",
                                              "attention_backend"}
