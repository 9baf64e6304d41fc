"""Apply the configured speed paths to a loaded model set, once, before sessions open."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.avatar_cache import MB, AvatarCache, PromptCache
from engine.checkpoint.loader import EngineModels
from engine.config import EngineConfig
from engine.decode import DecodeQueue, use_channels_last
from engine.memory import step_attention_shape
from engine.models.fp8 import is_quantized, quantize_linears
from engine.speed import attention
from engine.speed.compile import CompiledLayers

log = logging.getLogger(__name__)


@dataclass
class SpeedState:
    """What the speed paths decided for one engine; shared by its sessions."""

    decoder: DecodeQueue
    attention: attention.AttentionChoice = field(
        default_factory=lambda: attention.AttentionChoice("default"))
    vae_channels_last: bool = False
    avatars: AvatarCache | None = None
    prompts: PromptCache = field(default_factory=PromptCache)
    layers: CompiledLayers | None = None  # None: eager

    @classmethod
    def plain(cls, device: torch.device) -> SpeedState:
        """No speed path: inline decode, SDPA's own backend."""
        return cls(DecodeQueue("sync", device))

    def close(self) -> None:
        self.decoder.close()


def prepare_models(models: EngineModels, config: EngineConfig, ring_frames: int = 12,
                   block_frames: int = 3) -> SpeedState:
    """Quantise the DiT's linears to FP8 when `config.fp8` (in place: the bf16 weights are
    freed; a model already quantised stays so), choose the attention backend for the largest
    size sessions may use, lay the VAE out channels-last, and make the decode queue, the
    avatar cache and the compiled layer."""
    if config.fp8 and not is_quantized(models.dit):
        count = quantize_linears(models.dit, config.fp8_scaling)
        log.info("fp8: %d DiT linears quantised to e4m3 (%s scaling)", count, config.fp8_scaling)
    cfg = models.dit.cfg
    q, kv = step_attention_shape(config.max_size, ring_frames, block_frames)
    choice = attention.choose(config.attention_backend, models.device, models.dtype,
                              cfg.num_heads, cfg.head_dim, q, kv)
    channels_last = config.vae_channels_last and models.device.type == "cuda"
    if channels_last:  # (on a CPU the VAE's oneDNN path is fastest as it is)
        use_channels_last(models.vae)
    decoder = DecodeQueue.for_device(models.device, config.vae_overlap)
    log.info("vae decode: %s%s", decoder.mode, ", channels-last" if channels_last else "")
    avatars = AvatarCache(config.avatar_cache_mb * MB) if config.avatar_cache_mb else None
    layers = CompiledLayers(config.compile_mode) if config.compile else None
    return SpeedState(decoder, choice, channels_last, avatars, layers=layers)
