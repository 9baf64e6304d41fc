"""The speech-to-video parts of the Wan S2V DiT: causal audio encoder, audio injector, FramePack.

Module and parameter names reproduce the released checkpoint's keys (`casual_audio_encoder` is
upstream's spelling). Shapes use D = model width, A = wav2vec2 width, T = audio tokens per frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.attention import Attention

# 1. Causal audio encoder ------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """Conv1d that left-pads k-1 frames by replicating the first frame (causal in time)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T] -> [B, C', ceil(T / stride)]
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class AudioConvStack(nn.Module):
    """`casual_audio_encoder.encoder`: per-token local path and (with AdaIN) a global path.

    Both paths share conv2/conv3. The local path yields T tokens + 1 learned padding token per
    latent-rate step; the global path yields one token per step for the injector's AdaLN.
    """

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int, need_global: bool):
        super().__init__()
        self.num_tokens = num_tokens
        self.need_global = need_global
        q = hidden_dim // 4
        self.conv1_local = CausalConv1d(in_dim, q * num_tokens, 3, stride=1)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, q, 3, stride=1)
            self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.conv2 = CausalConv1d(q, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    @staticmethod
    def _norm_act(x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, T]; non-affine LayerNorm over C (eps 1e-6), then SiLU
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)
        return F.silu(x).transpose(1, 2)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, D/4, T] -> [N, Tl, D] with Tl = ceil(ceil(T/2)/2)
        x = self._norm_act(x)
        x = self._norm_act(self.conv2(x))
        x = self._norm_act(self.conv3(x))
        return x.transpose(1, 2)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # feat: [B, T, A] mixed wav2vec2 features at video rate
        b = feat.shape[0]
        x = feat.transpose(1, 2)  # [B, A, T]
        loc = self.conv1_local(x)  # [B, T*D/4, T]
        # channels split as (token, channel): the token index is the outer factor
        loc = loc.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B*T, D/4, t]
        loc = self._shared(loc)  # [B*Tok, Tl, D]
        loc = loc.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, Tl, Tok, D]
        pad = self.padding_tokens.expand(b, loc.shape[1], 1, -1).to(loc.dtype)
        loc = torch.cat([loc, pad], dim=2)  # [B, Tl, Tok+1, D]
        if not self.need_global:
            return loc, None
        glob = self._shared(self.conv1_global(x))  # [B, Tl, D]
        glob = self.final_linear(glob)
        return loc, glob


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder`: softmax-free learned mixing of the wav2vec2 layers, then convs."""

    def __init__(self, audio_dim: int, dim: int, num_layers: int, num_tokens: int, need_global: bool):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = AudioConvStack(audio_dim, dim, num_tokens, need_global)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # feats: [B, L=25, A, T] -> local [B, Tl, Tok+1, D], global [B, Tl, D] | None (fp32)
        w = F.silu(self.weights.float())
        mixed = (feats.float() * w).sum(dim=1) / w.sum(dim=1)  # [B, A, T]
        return self.encoder(mixed.transpose(1, 2).to(self.weights.dtype))


# 2. Audio injector ------------------------------------------------------------------------------


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm with chunk_dim=1: Linear(SiLU(temb)) -> (shift, scale), LN eps 1e-5."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: [N, L, D]; temb: [N, D]; normalised and modulated in float32 (upstream runs it
        # under fp32 autocast), returned in x's dtype
        shift, scale = self.linear(F.silu(temb)).float().chunk(2, dim=1)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
        return (h * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)


class AudioInjector(nn.Module):
    """`audio_injector`: one cross-attention (plus its AdaLN) per injected block, in list order."""

    def __init__(self, dim: int, num_heads: int, count: int, eps: float, enable_adain: bool):
        super().__init__()
        self.injector = nn.ModuleList(Attention(dim, num_heads, eps) for _ in range(count))
        self.enable_adain = enable_adain
        if enable_adain:
            self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(count))


# 3. FramePack motion packer ---------------------------------------------------------------------


class FramePacker(nn.Module):
    """`frame_packer`: motion latents -> tokens, newest frames finest.

    The last sum(buckets) = 19 latent frames are split oldest->newest into 16 / 2 / 1 frames and
    patchified with strides (4,8,8), (2,4,4), (1,2,2). Token order: post (1x), 2x, 4x.
    """

    def __init__(self, channels: int, dim: int, buckets: tuple[int, int, int] = (1, 2, 16)):
        super().__init__()
        self.channels = channels
        self.buckets = buckets  # newest -> oldest
        self.proj = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    @property
    def frames(self) -> int:
        return sum(self.buckets)

    def forward(self, motion: torch.Tensor, zero_newest: int = 0) -> torch.Tensor:
        # motion: [B, C, Tm, H, W] -> tokens [B, H/2*W/2 + H/4*W/4 + 4*H/8*W/8, D]
        b, c, tm, h, w = motion.shape
        if h % 8 or w % 8:
            raise ValueError(f"latent height/width must be multiples of 8, got {h}x{w}")
        n = self.frames
        packed = motion.new_zeros(b, c, n, h, w)
        keep = min(n, tm)
        if keep:
            packed[:, :, n - keep:] = motion[:, :, tm - keep:]  # zero-pad the oldest side
        if zero_newest:
            packed[:, :, n - zero_newest:] = 0
        b1, b2, b4 = self.buckets
        old4, mid2, post = packed.split([b4, b2, b1], dim=2)
        toks = [
            self.proj(post).flatten(2).transpose(1, 2),
            self.proj_2x(mid2).flatten(2).transpose(1, 2),
            self.proj_4x(old4).flatten(2).transpose(1, 2),
        ]
        return torch.cat(toks, dim=1)

    def token_counts(self, h: int, w: int) -> tuple[int, int, int]:
        """Tokens per group (post, 2x, 4x) for a latent grid of h x w."""
        b1, b2, b4 = self.buckets
        return (b1 * (h // 2) * (w // 2), (b2 // 2) * (h // 4) * (w // 4),
                (b4 // 4) * (h // 8) * (w // 8))


def audio_latent_steps(video_frames: int) -> int:
    """Latent-rate length after the two stride-2 causal convs: ceil(ceil(T/2)/2)."""
    return math.ceil(math.ceil(video_frames / 2) / 2)
