"""torch.compile of the DiT's repeated layer, compiled once per ring fill level and reused;
and of the VAE's elementwise work between its convolutions (`compile_vae`).

What is compiled is one DiT layer (modulated norms, q/k/v with their RMSNorms, RoPE, the ring
write, attention over [sink | ring], gates, text cross-attention, FFN) and one audio injection:
the glue kernels between the GEMMs and attention calls (half of an eager step on an H200) fuse.
Every layer is the same code with other weights, and weights are graph inputs, so one graph
serves all 40 layers; the layer index is never passed in (a `LayerAttention` is bound to its
layer). The ring's write position is a device tensor, so the only value a graph specialises on
is the number of keys, which takes one value per fill level: 1, 2, 3 blocks of history, then
full for ever. A stream therefore compiles 4 graphs in its first 4 blocks and none after
(`graphs()` counts them); other sizes compile their own. With `[engine] compile_mode =
"reduce-overhead"` the graphs are replayed as CUDA graphs: the K/V buffers are fixed tensors
marked as static addresses, so replays read and write them in place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from engine.errors import ConfigError
from engine.models.attention import Attention
from engine.models.dit import DiTBlock, SelfAttention, inject_audio

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_CACHE = 64  # graphs per compiled function: fill levels x sizes, with room to spare


def _compile_options(mode: str, backend: str, inductor_mode: str | None = None
                     ) -> dict[str, Any]:
    """torch.compile's options for `mode` (checked), static shapes, and room in dynamo's cache
    for a graph per shape."""
    if mode not in MODES:
        raise ConfigError(f"engine.compile_mode={mode!r}: accepted {MODES}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                GRAPH_CACHE)
    options: dict[str, Any] = {"dynamic": False, "backend": backend}
    if backend == "inductor":
        options["mode"] = inductor_mode or mode
    return options


def _layer(block: DiTBlock, x: torch.Tensor, e0: torch.Tensor, attn: SelfAttention,
           text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
    return block(x, e0, 0, attn, text_k, text_v)  # 0: the attention is bound to its layer


class CompiledLayers:
    """An `engine.models.dit.LayerRunner` whose block and injection are compiled."""

    def __init__(self, mode: str = "default", backend: str = "inductor"):
        self.mode = mode
        self.cuda_graphs = mode == "reduce-overhead"
        options = _compile_options(mode, backend)
        self._block = torch.compile(_layer, **options)
        self._inject = torch.compile(inject_audio, **options)
        log.info("torch.compile of the DiT layer: mode %s, backend %s (graphs compile during "
                 "the first blocks of each size)", mode, backend)

    def block(self, block: DiTBlock, x: torch.Tensor, e0: torch.Tensor, layer: int,
              attn: Any, text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        return self._block(block, x, e0, attn.layer(layer), text_k, text_v)

    def inject(self, attn: Attention, adain: nn.Module | None, x: torch.Tensor,
               local: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
        return self._inject(attn, adain, x, local, glob)

    def mark_static(self, *tensors: torch.Tensor) -> None:
        """Tensors that keep their address across steps (K/V buffers, text K/V): CUDA graphs
        use them in place instead of copying them into the graph's own inputs."""
        if self.cuda_graphs:
            for t in tensors:
                torch._dynamo.mark_static_address(t)


def compile_vae(vae: nn.Module, mode: str = "default", backend: str = "inductor") -> int:
    """Compile the VAE's norm -> SiLU -> causal padding (`engine.models.vae.norm_silu_pad`), the
    elementwise work and copies before each of its 3x3x3 convolutions, into a few fused
    kernels; the convolutions stay cuDNN's. Shapes are static: a decode stream compiles one
    graph per (channels, frames, height, width) it meets, with and without history (about 20
    per size, all in a session's first blocks) and none after. Returns the modules switched."""
    from engine.models.vae import FusedPrelude, norm_silu_pad

    # (CUDA graphs would pin every activation of the decode; the fusion is what pays)
    fused = torch.compile(norm_silu_pad, **_compile_options(
        mode, backend, inductor_mode="default" if mode == "reduce-overhead" else mode))
    count = 0
    for module in vae.modules():
        if isinstance(module, FusedPrelude):
            module.fuse = fused
            count += 1
    log.info("torch.compile of the VAE's norm/SiLU/padding before %d convolution sites", count)
    return count


def graphs() -> int:
    """Graphs dynamo has compiled in this process (to check that nothing recompiles)."""
    return int(counters["stats"]["unique_graphs"])
