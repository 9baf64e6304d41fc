"""config.toml: read once by the entry point; each package parses its own section. Torch-free."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from engine.errors import ConfigError


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (pass --config PATH)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
