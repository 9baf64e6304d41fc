"""The floor of one denoising step: its GEMMs and attention calls alone, at the same shapes.

For every layer of the DiT, the matrix products a step must do (self-attention q/k/v/o, text
cross-attention q/o, the FFN, and after the audio layers the injector's q/o) with the model's own
weights, and the attention calls (the block's queries over the step's key count, over the 512 text
tokens, and per latent frame over its audio tokens), with nothing around them: no norms, RoPE,
modulation, gates, casts or copies. `avatar bench` times this in the same run as the real step,
so "step / bare" says how much of the step is glue. The text K/V are per-session constants and are
not part of a step; bias adds are glue (cuBLAS would fuse them, but the real step's are counted
there).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine.models.dit import WanS2VDiT
from engine.models.fp8 import FP8Linear, quantize
from engine.timing import StageClock


def bare_step(dit: WanS2VDiT, tokens_per_frame: int, frames: int, kv_tokens: int,
              audio_tokens: int) -> Callable[[], torch.Tensor]:
    """A closure running the bare kernels of one step once (inputs preallocated).

    With FP8 linears (`engine.models.fp8`) the GEMMs are `torch._scaled_mm` on pre-quantised
    inputs: quantising activations is glue, not part of the floor.
    """
    cfg = dit.cfg
    device, dtype = dit.device, dit.dtype
    n = tokens_per_frame * frames
    heads, hd = cfg.num_heads, cfg.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    x_dim, x_ffn = rand(n, cfg.dim), rand(n, cfg.ffn_dim)
    k_self, v_self = rand(1, heads, kv_tokens, hd), rand(1, heads, kv_tokens, hd)
    k_text, v_text = rand(1, heads, cfg.text_len, hd), rand(1, heads, cfg.text_len, hd)
    k_audio, v_audio = rand(frames, heads, audio_tokens, hd), rand(frames, heads, audio_tokens, hd)
    q_self = rand(1, heads, n, hd)
    q_audio = rand(frames, heads, n // frames, hd)
    inj: Any = dit.audio_injector
    blocks: list[Any] = list(dit.blocks)
    fp8 = [m for m in dit.modules() if isinstance(m, FP8Linear)]
    scaling: str | None = fp8[0].scaling if fp8 else None
    quantised = {id(x): quantize(x, scaling) for x in (x_dim, x_ffn)} if scaling else {}

    def gemm(x: torch.Tensor, layer: Any) -> torch.Tensor:
        if isinstance(layer, FP8Linear):
            q, scale = quantised[id(x)]
            return torch._scaled_mm(q, layer.weight.t(), scale_a=scale,
                                    scale_b=layer.weight_scale, out_dtype=dtype,
                                    use_fast_accum=True)
        return F.linear(x, layer.weight)

    def run() -> torch.Tensor:
        out = x_dim
        for i, block in enumerate(blocks):
            sa, ca = block.self_attn, block.cross_attn
            for proj in (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o):
                out = gemm(x_dim, proj)
            out = gemm(x_ffn, block.ffn[2])
            out = gemm(x_dim, block.ffn[0])
            F.scaled_dot_product_attention(q_self, k_self, v_self)
            F.scaled_dot_product_attention(q_self, k_text, v_text)
            if i in dit.injector_of:
                attn = inj.injector[dit.injector_of[i]]
                out = gemm(x_dim, attn.q)
                out = gemm(x_dim, attn.o)
                F.scaled_dot_product_attention(q_audio, k_audio, v_audio)
        return out

    return run


def time_bare_step(run: Callable[[], torch.Tensor], device: torch.device,
                   repeats: int = 5) -> float:
    """Median seconds of `run` after one warm-up call (device time on CUDA)."""
    with torch.inference_mode():
        run()
        times = []
        for _ in range(repeats):
            clock = StageClock(device)
            clock.mark("start")
            run()
            clock.mark("end")
            times.append(clock.between("start", "end"))
    return statistics.median(times)
