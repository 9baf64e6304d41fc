"""The KV state of one denoising step: a ring of the last `frames` latent frames, plus the sink.

Timestep forcing: step i's ring holds the keys/values its own noisy inputs produced (no clean
re-pass). Keys are stored already rotated at their absolute RoPE positions, so slot order does
not matter and a block simply overwrites the oldest slots. Positions are absolute int64 latent
frame indices computed per call (no table), so the ring can run for days.

Invariant: every block writes `block_frames` frames and `frames` is a multiple of it, so a write
never wraps inside a block and the valid region is always a prefix of the buffer.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.models.attention import attend
from engine.models.dit import SinkKV
from engine.models.rope import RopeBands, apply_rope, rope_cos_sin


class KVRing:
    """Per-layer ring buffers K, V: [layers, B, frames * tokens_per_frame, heads, head_dim]."""

    def __init__(self, layers: int, batch: int, frames: int, tokens_per_frame: int, heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, frames * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.written = 0  # latent frames written so far (host int: no device sync)

    def window(self, new_frames: int) -> tuple[int, int]:
        """(write offset, valid tokens after the write) for a block of `new_frames` frames."""
        if self.frames % new_frames:
            raise ValueError(f"ring of {self.frames} frames cannot hold blocks of {new_frames}")
        start = (self.written % self.frames) * self.tokens_per_frame
        valid = min(self.frames, self.written + new_frames) * self.tokens_per_frame
        return start, valid

    def advance(self, new_frames: int) -> None:
        self.written += new_frames

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RingAttention:
    """A block's self-attention: its tokens, the ring's history and the re-rotated sink.

    Implements `engine.models.dit.SelfAttention`. Call `ring.advance` after the whole forward.
    """

    def __init__(self, ring: KVRing, sink: SinkKV, bands: RopeBands, positions: np.ndarray,
                 sink_positions: np.ndarray, new_frames: int):
        device = ring.k.device
        self.ring = ring
        self.sink = sink
        self.start, self.valid = ring.window(new_frames)
        self.q_rope = rope_cos_sin(positions, bands, device)
        self.s_rope = rope_cos_sin(sink_positions, bands, device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: [B, L, H, Dh] un-roped; the ring stores rotated keys
        q = apply_rope(q, *self.q_rope)
        k = apply_rope(k, *self.q_rope)
        n = k.shape[1]
        ring_k, ring_v = self.ring.k[layer], self.ring.v[layer]
        ring_k[:, self.start:self.start + n] = k
        ring_v[:, self.start:self.start + n] = v
        sink_k = apply_rope(self.sink.keys[layer], *self.s_rope)
        keys = torch.cat([ring_k[:, :self.valid], sink_k.to(k.dtype)], dim=1)
        values = torch.cat([ring_v[:, :self.valid], self.sink.values[layer].to(v.dtype)], dim=1)
        return attend(q, keys, values)
