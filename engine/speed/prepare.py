"""Apply the configured speed paths to a loaded model set, once, before sessions open."""

from __future__ import annotations

import logging

from engine.checkpoint.loader import EngineModels
from engine.config import EngineConfig
from engine.models.fp8 import is_quantized, quantize_linears

log = logging.getLogger(__name__)


def prepare_models(models: EngineModels, config: EngineConfig) -> None:
    """Quantise the DiT's linears to FP8 when `config.fp8` (in place: the bf16 weights are
    freed). Idempotent; a model already quantised stays so even if `config` is plain."""
    if config.fp8 and not is_quantized(models.dit):
        count = quantize_linears(models.dit, config.fp8_scaling)
        log.info("fp8: %d DiT linears quantised to e4m3 (%s scaling)", count, config.fp8_scaling)
