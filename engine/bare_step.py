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
from engine.timing import StageClock

Linear = Callable[[torch.Tensor, Any], torch.Tensor]  # (x, an nn.Linear) -> x @ W.T


def _plain(x: torch.Tensor, layer: Any) -> torch.Tensor:
    return F.linear(x, layer.weight)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def bare_step(dit: WanS2VDiT, tokens_per_frame: int, frames: int, kv_tokens: int,
              audio_tokens: int, linear: Linear = _plain) -> Callable[[], torch.Tensor]:
    """A closure running the bare kernels of one step once (inputs preallocated).

    `linear(x, module)` is the GEMM of one projection (the plain one, or FP8's).
    """
    cfg = dit.cfg
    device, dtype = dit.device, dit.dtype
    n = tokens_per_frame * frames
    heads, hd = cfg.num_heads, cfg.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    x = rand(n, cfg.dim)
    k_self, v_self = rand(1, heads, kv_tokens, hd), rand(1, heads, kv_tokens, hd)
    k_text, v_text = rand(1, heads, cfg.text_len, hd), rand(1, heads, cfg.text_len, hd)
    k_audio, v_audio = rand(frames, heads, audio_tokens, hd), rand(frames, heads, audio_tokens, hd)
    inj: Any = dit.audio_injector
    blocks: list[Any] = list(dit.blocks)

    def heads_of(t: torch.Tensor, batch: int = 1) -> torch.Tensor:
        return t.view(batch, -1, heads, hd).transpose(1, 2)

    def run() -> torch.Tensor:
        out = x
        for i, block in enumerate(blocks):
            sa, ca = block.self_attn, block.cross_attn
            q = linear(x, sa.q)
            linear(x, sa.k)
            linear(x, sa.v)
            o = _attend(heads_of(q), k_self, v_self)
            out = linear(o.transpose(1, 2).reshape(n, cfg.dim), sa.o)
            o = _attend(heads_of(linear(x, ca.q)), k_text, v_text)
            out = linear(o.transpose(1, 2).reshape(n, cfg.dim), ca.o)
            out = linear(linear(x, block.ffn[0]), block.ffn[2])
            if i in dit.injector_of:
                attn = inj.injector[dit.injector_of[i]]
                o = _attend(heads_of(linear(x, attn.q), frames), k_audio, v_audio)
                out = linear(o.transpose(1, 2).reshape(n, cfg.dim), attn.o)
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
