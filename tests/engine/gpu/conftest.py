"""GPU test fixtures: a measured-figures report (tolerances and errors for the closing note) and
one random DiT at the 14B shapes shared by the speed-path tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def report():  # noqa: ANN201
    """A dict the tests fill with what they measured; written as JSON to $AVATAR_GPU_REPORT."""
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "torch": torch.__version__}
    yield out
    path = os.environ.get("AVATAR_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
