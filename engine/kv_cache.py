"""The K/V one denoising step attends to: the sink and a ring of the last latent frames, in one
preallocated buffer per layer, so attention reads them without a concatenation.

Layout per layer: `[ reference | motion | ring ]`, tokens along dim 1 of [B, S + R, Hn, Dh].

- The sink (S tokens) is the prefill's K/V. Its motion keys sit at fixed positions, so they are
  rotated once per sink (`set_sink`); the reference keys move with the rolling sink (4-30 latent
  frames ahead of each block, drawn per block and step), so they are re-rotated once per step for
  all layers at once (`rotate_reference`), before the forward, never per layer.
- The ring (R = frames * tokens_per_frame) holds keys already rotated at their absolute
  positions (timestep forcing: step i's ring is filled from its own noisy inputs). Every block
  writes `block_frames` frames and `frames` is a multiple of that, so a write never wraps inside
  a block and the valid part of the ring is always a prefix: a step attends to the contiguous
  `[:S + valid]`. Slot order does not matter (attention has no mask and positions are in the
  keys), so a block simply overwrites the oldest slots.

Positions are absolute int64 latent frame indices (no table), so a ring can run for days.
"""

from __future__ import annotations

import torch

from engine.models.attention import attend
from engine.models.dit import SinkKV
from engine.models.rope import apply_rope

ROTATE_CHUNK_BYTES = 64 << 20  # float32 working set of one reference re-rotation chunk


class StepKV:
    """K, V: [layers, B, sink + frames * tokens_per_frame, heads, head_dim]."""

    def __init__(self, layers: int, batch: int, sink_tokens: int, ref_tokens: int, frames: int,
                 tokens_per_frame: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        if not 0 < ref_tokens <= sink_tokens:
            raise ValueError(f"ref_tokens={ref_tokens} must be in 1..sink_tokens={sink_tokens}")
        shape = (layers, batch, sink_tokens + frames * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # one view per layer, made once: the same tensor objects every step (CUDA graphs can
        # then treat them as static addresses)
        self.k_layers = list(self.k.unbind(0))
        self.v_layers = list(self.v.unbind(0))
        self.sink_tokens = sink_tokens
        self.ref_tokens = ref_tokens
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.written = 0  # latent frames written so far (host int: no device sync)

    # 1. the sink ----------------------------------------------------------------------------

    def set_sink(self, sink: SinkKV, motion_rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy a (new) sink in: values as they are, motion keys rotated at their positions."""
        s, r = self.sink_tokens, self.ref_tokens
        if sink.keys.shape[2] != s or sink.ref_tokens != r:
            raise ValueError(f"sink of {sink.keys.shape[2]} tokens ({sink.ref_tokens} reference) "
                             f"does not fit a buffer made for {s} ({r})")
        self.v[:, :, :s] = sink.values
        self._rotate_into(self.k[:, :, r:s], sink.keys[:, :, r:], *motion_rope)

    def set_sink_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                       motion_rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`set_sink` for one layer, from its K/V [B, S, Hn, Dh] as the prefill makes them (the
        same bits: the rotation is elementwise, whatever the layers taken at once)."""
        s, r = self.sink_tokens, self.ref_tokens
        if keys.shape[1] != s:
            raise ValueError(f"sink of {keys.shape[1]} tokens does not fit a buffer made for {s}")
        self.v[layer, :, :s] = values
        self.k[layer, :, r:s] = apply_rope(keys[:, r:], *motion_rope)

    def copy_sink(self, other: StepKV) -> None:
        """Take the sink another step's buffer holds (the same bits `set_sink` would write: the
        values, and the motion keys at their fixed positions; the reference keys are re-rotated
        before every step anyway)."""
        s = self.sink_tokens
        if other.sink_tokens != s or other.k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"buffer with a {other.sink_tokens}-token sink does not fit one "
                             f"made for {s}")
        self.k[:, :, :s] = other.k[:, :, :s]
        self.v[:, :, :s] = other.v[:, :, :s]

    def rotate_reference(self, sink: SinkKV, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Place this step's reference keys at their rolling-sink position, in every layer."""
        self._rotate_into(self.k[:, :, :self.ref_tokens], sink.keys[:, :, :self.ref_tokens], *rope)

    @staticmethod
    def _rotate_into(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> None:
        # a few layers at a time: the float32 rotation of all 40 layers at once would need
        # gigabytes of temporaries at the 14B shapes
        per_layer = src[0].numel() * 4
        chunk = max(1, ROTATE_CHUNK_BYTES // max(1, per_layer))
        for i in range(0, src.shape[0], chunk):
            dst[i:i + chunk] = apply_rope(src[i:i + chunk], cos, sin)

    # 2. the ring ----------------------------------------------------------------------------

    @property
    def ring_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def window(self, new_frames: int) -> tuple[int, int]:
        """(buffer offset where a block of `new_frames` frames is written, tokens valid after
        the write, sink included)."""
        if self.frames % new_frames:
            raise ValueError(f"ring of {self.frames} frames cannot hold blocks of {new_frames}")
        start = self.sink_tokens + (self.written % self.frames) * self.tokens_per_frame
        valid = min(self.frames, self.written + new_frames) * self.tokens_per_frame
        return start, self.sink_tokens + valid

    def advance(self, new_frames: int) -> None:
        self.written += new_frames

    def empty_ring(self) -> None:
        """Forget the ring's history (the sink stays): the next block attends to itself and the
        sink only, as a session's first block does. Stale slots are never read, since a step
        attends to the valid prefix only."""
        self.written = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class StepAttention:
    """A block's self-attention in one step: its tokens, the ring's history and the sink.

    Implements `engine.models.dit.SelfAttention`. `rope` is the block's (cos, sin), shared by all
    layers and steps; the step's reference keys must already be rotated. Call `kv.advance` after
    the whole forward.
    """

    def __init__(self, kv: StepKV, rope: tuple[torch.Tensor, torch.Tensor], new_frames: int):
        self.kv = kv
        self.cos, self.sin = rope
        start, self.end = kv.window(new_frames)
        # where the block's keys go, as a device tensor: a compiled layer then depends on the
        # fill level (`end`, 4 values) but not on the write position
        n = new_frames * kv.tokens_per_frame
        self.index = torch.arange(start, start + n, device=kv.k.device)

    def layer(self, i: int) -> LayerAttention:
        return LayerAttention(self.kv.k_layers[i], self.kv.v_layers[i], self.index, self.end,
                              self.cos, self.sin)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.layer(layer)(layer, q, k, v)


class LayerAttention:
    """`StepAttention` bound to one layer's buffers (what a compiled layer receives: the same
    graph serves every layer, so the layer index it is called with is ignored)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, end: int,
                 cos: torch.Tensor, sin: torch.Tensor):
        self.keys, self.values, self.index, self.end = keys, values, index, end
        self.cos, self.sin = cos, sin

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: [B, L, H, Dh] un-roped; the buffer stores rotated keys
        q = apply_rope(q, self.cos, self.sin)
        k = apply_rope(k, self.cos, self.sin)
        self.keys.index_copy_(1, self.index, k)
        self.values.index_copy_(1, self.index, v)
        return attend(q, self.keys[:, :self.end], self.values[:, :self.end])
