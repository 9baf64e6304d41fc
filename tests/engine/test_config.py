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
])
def test_bad_values_are_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig.parse(raw)
    assert needle in str(err.value)
