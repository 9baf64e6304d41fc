"""Attention building blocks shared by the DiT's self-, text- and audio-attention.

Wan attention: biased q/k/v/o Linears, RMSNorm of q and k over the full width (before the head
split), scale 1/sqrt(head_dim), no mask. Tensors in attention are [B, L, H, Dh].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32 (WanRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Projections of one Wan attention layer (`q,k,v,o,norm_q,norm_k`); the math is in `attend`."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))  # [B, L, D] -> [B, L, H, Dh]

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.norm_q(self.q(x)))

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.o(o.flatten(-2))  # [B, L, H, Dh] -> [B, L, D]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked scaled dot-product attention. q [B, Lq, H, Dh], k/v [B, Lk, H, Dh] -> [B, Lq, H, Dh]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)
