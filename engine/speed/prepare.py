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
from engine.models.dit import WanS2VDiT
from engine.models.fp8 import is_quantized, quantize_linears
from engine.models.vae import WanVAE
from engine.speed import attention
from engine.speed.compile import CompiledLayers, compile_vae

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
    return prepare_parts(models.dit, models.vae, models.device, models.dtype, config,
                         ring_frames, block_frames)


def prepare_parts(dit: WanS2VDiT | None, vae: WanVAE | None, device: torch.device,
                  dtype: torch.dtype, config: EngineConfig, ring_frames: int = 12,
                  block_frames: int = 3) -> SpeedState:
    """`prepare_models` for a process that holds only some of the models (a pipeline rank):
    the DiT's paths where the DiT is, the VAE's where the VAE is."""
    choice = attention.AttentionChoice("default")
    layers = None
    if dit is not None:
        if config.fp8 and not is_quantized(dit):
            count = quantize_linears(dit, config.fp8_scaling)
            log.info("fp8: %d DiT linears quantised to e4m3 (%s scaling)", count,
                     config.fp8_scaling)
        cfg = dit.cfg
        q, kv = step_attention_shape(config.max_size, ring_frames, block_frames)
        choice = attention.choose(config.attention_backend, device, dtype, cfg.num_heads,
                                  cfg.head_dim, q, kv)
        layers = CompiledLayers(config.compile_mode) if config.compile else None
    channels_last = vae is not None and config.vae_channels_last and device.type == "cuda"
    if channels_last:  # (on a CPU the VAE's oneDNN path is fastest as it is)
        assert vae is not None
        use_channels_last(vae)
    vae_compiled = vae is not None and config.vae_compile
    if vae_compiled:
        assert vae is not None
        compile_vae(vae, config.compile_mode)
    decoder = DecodeQueue.for_device(device, config.vae_overlap and vae is not None)
    if vae is not None:
        log.info("vae decode: %s%s%s", decoder.mode, ", channels-last" if channels_last else "",
                 ", compiled" if vae_compiled else "")
    avatars = AvatarCache(config.avatar_cache_mb * MB) if config.avatar_cache_mb else None
    return SpeedState(decoder, choice, channels_last, avatars, layers=layers)
