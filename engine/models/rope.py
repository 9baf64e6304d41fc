"""3-D rotary position embedding of the Wan DiT, split over time / height / width.

Wan rotates adjacent (even, odd) pairs of each head as complex numbers. head_dim d gives c = d/2
pairs, split into a time band of c - 2*(c//3) pairs and height/width bands of c//3 pairs each; a
band of n real channels uses theta_j = 10000^(-2j/n). Positions are signed integers: a negative
time is the complex conjugate of the positive one, which is exactly a rotation by a negative angle.

There is deliberately no precomputed table: angles are computed per call in float64 from int64
positions, so a stream can run for days (positions in the millions) without running off a table
or losing precision; only cos/sin are cast to float32. `rope_cos_sin` does it on the host from
numpy positions; `RopeAngles` does the same on the device (what a streaming block uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.transfer import to_device

THETA = 10000.0


@dataclass(frozen=True)
class RopeBands:
    """Pair counts of the time / height / width bands for one head_dim."""

    t: int
    h: int
    w: int

    @classmethod
    def for_head_dim(cls, head_dim: int) -> RopeBands:
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 for 3-D RoPE, got {head_dim}")
        c = head_dim // 2
        return cls(t=c - 2 * (c // 3), h=c // 3, w=c // 3)

    def inv_freqs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-band angular frequencies (float64), theta^(-2j/n) with n = 2 * pairs."""

        def band(pairs: int) -> np.ndarray:
            n = 2 * pairs
            return 1.0 / THETA ** (np.arange(0, n, 2, dtype=np.float64) / n)

        return band(self.t), band(self.h), band(self.w)


def grid_positions(
    t: list[int] | np.ndarray, h: list[int] | np.ndarray, w: list[int] | np.ndarray
) -> np.ndarray:
    """Positions of a (t, h, w) token grid flattened in (t, h, w) order -> int64 [T*H*W, 3]."""
    tt, hh, ww = np.meshgrid(np.asarray(t), np.asarray(h), np.asarray(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=1).astype(np.int64)


def spread(extent: int, count: int) -> np.ndarray:
    """`count` integer positions spread over [0, extent-1] like numpy linspace truncated to int.

    Compressed FramePack groups use this to cover the full latent grid with fewer tokens.
    """
    return np.linspace(0, extent - 1, count).astype(np.int64)


def rope_cos_sin(
    positions: np.ndarray, bands: RopeBands, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 positions [L, 3] -> (cos, sin), each float32 [L, head_dim/2] on `device`."""
    ft, fh, fw = bands.inv_freqs()
    pos = positions.astype(np.float64)
    angles = np.concatenate(
        [np.outer(pos[:, 0], ft), np.outer(pos[:, 1], fh), np.outer(pos[:, 2], fw)], axis=1
    )  # [L, c] float64
    return (to_device(np.cos(angles).astype(np.float32), device),
            to_device(np.sin(angles).astype(np.float32), device))


class RopeAngles:
    """cos/sin of any positions, computed on `device` in float64 from int64 positions.

    Holds only the per-band inverse frequencies (copied to the device once), so angles for a
    block are a handful of kernels with no host work and no transfer; the arithmetic is that of
    `rope_cos_sin` (float64 products and cos/sin, then float32).
    """

    def __init__(self, bands: RopeBands, device: torch.device | str):
        self.bands = bands
        self.device = torch.device(device)
        self.inv = tuple(torch.from_numpy(f).to(self.device) for f in bands.inv_freqs())

    def of(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 positions [L, 3] on the device -> (cos, sin), each float32 [L, head_dim/2]."""
        pos = positions.to(torch.float64)
        angles = torch.cat([pos[:, i:i + 1] * self.inv[i][None] for i in range(3)], dim=1)
        return torch.cos(angles).float(), torch.sin(angles).float()

    def grid(self, t0: int, frames: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles of the (t, h, w) grid [t0, t0 + frames) x [0, h) x [0, w) in (t, h, w) order,
        as `grid_positions` lays it out."""
        dev = self.device
        tt, hh, ww = torch.meshgrid(torch.arange(t0, t0 + frames, device=dev),
                                    torch.arange(h, device=dev), torch.arange(w, device=dev),
                                    indexing="ij")
        return self.of(torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=1))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [..., L, H, Dh] by angles (cos, sin) [L, Dh/2]; float32 math.

    Returns the same dtype as x. Leading dims (batch, or layers and batch) broadcast.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    xe, xo = xf[..., 0], xf[..., 1]  # [..., L, H, c]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = torch.stack((xe * c - xo * s, xe * s + xo * c), dim=-1)  # [..., L, H, c, 2]
    return out.flatten(-2).to(x.dtype)
