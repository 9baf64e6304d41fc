"""The Wan2.1 causal 3-D VAE (encoder + decoder) with an explicit, caller-owned causal cache.

Key names reproduce `Wan2.1_VAE.pth` (194 tensors at base dim 96). Every causal conv "call site"
(conv1, both convs of each residual block, the head conv, each temporal resample) has one slot in
a `CausalCache` that the caller passes in and gets back, so a session can decode one latent frame
at a time across blocks, and two sessions never share state. Feeding a sequence in any split
gives the same output as feeding it whole, by construction:

- a 3x3x3 causal conv keeps the last 2 input frames (zeros before the first frame);
- the decoder's temporal upsample passes the first frame through alone and then runs its time
  conv over the remaining frames with zero history (upstream's 'Rep' marker), 1 -> 2 frames;
- the encoder's temporal downsample passes the first frame through and then takes stride-2
  windows over (last frame of the previous chunk, this chunk).

So T_pix = 1 + 4k <-> T_lat = 1 + k. Pixels are in [-1, 1]; latents are normalised per channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_CPU_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")

# 1. Configuration -------------------------------------------------------------------------------

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if self.z_dim != len(LATENT_MEAN):
            raise ValueError(f"VAE z_dim={self.z_dim}: only 16 (the Wan2.1 normalisation) exists")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# 2. Causal cache --------------------------------------------------------------------------------


@dataclass
class CausalCache:
    """The causal history of one encode or decode stream, keyed by call-site name.

    A missing key means "nothing seen yet" (the sequence start). The cache is a plain value owned
    by the caller (a session), never a module attribute, so streams cannot interfere.
    """

    slots: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots.values())


class _CausalSite:
    """Mixin for modules with causal state: `site` is set to the module's name by the model."""

    site: str = ""


# 3. Building blocks -----------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """F.normalize over channels * sqrt(C) * gamma, in float32 (as upstream's fp32 weights under
    bf16 autocast), returned in x's dtype."""
    # F.normalize(x, dim=1): x / max(||x||, 1e-12), written out (faster on CPU)
    xf = x.float()
    norm = xf.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    return (xf / norm * (scale * gamma.float())).to(x.dtype)


def causal_pad(x: torch.Tensor, past: torch.Tensor | None, time_pad: int,
               space_pad: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal conv's input: `time_pad` frames of history (`past`, zeros at the start) before x,
    the spatial padding around; and the history for the next call (None without time_pad)."""
    new = None
    if time_pad:
        if past is None:
            past = x.new_zeros(*x.shape[:2], time_pad, *x.shape[3:])
        x = torch.cat([past.to(x.dtype), x], dim=2)
        new = x[:, :, -time_pad:].clone()
    return F.pad(x, space_pad), new


def norm_silu_pad(x: torch.Tensor, gamma: torch.Tensor, scale: float, past: torch.Tensor | None,
                  time_pad: int, space_pad: tuple[int, int, int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm -> SiLU -> causal padding: what runs before every 3x3x3 conv of a residual block
    and the heads, and (eagerly) 7 full-resolution passes of elementwise work and copies, which
    `engine.speed.compile.compile_vae` fuses by compiling this one function."""
    return causal_pad(F.silu(rms_norm(x, gamma, scale)), past, time_pad, space_pad)


# (x, gamma, scale, past, time_pad, space_pad) -> (padded conv input, history for the next call)
Fuse = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None, int,
                 tuple[int, int, int, int]], tuple[torch.Tensor, torch.Tensor | None]]


class CausalConv3d(nn.Conv3d, _CausalSite):
    """Conv3d padded symmetrically in space and 2*p in the past only; history from the cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C', T', H', W']
        padded, past = causal_pad(x, self._past(cache), self.time_pad, self.space_pad)
        return self._conv(padded, cache, past)

    def forward_normed(self, norm: RMSNorm, x: torch.Tensor, cache: CausalCache | None,
                       fuse: Fuse) -> torch.Tensor:
        """conv(SiLU(norm(x))) with the elementwise part done by `fuse` (`norm_silu_pad` or
        its compiled form)."""
        padded, past = fuse(x, norm.gamma, norm.scale, self._past(cache), self.time_pad,
                            self.space_pad)
        return self._conv(padded, cache, past)

    def _past(self, cache: CausalCache | None) -> torch.Tensor | None:
        return cache.slots.get(self.site) if cache is not None and self.time_pad else None

    def _conv(self, x: torch.Tensor, cache: CausalCache | None,
              past: torch.Tensor | None) -> torch.Tensor:
        if cache is not None and past is not None:
            cache.slots[self.site] = past
        if x.device.type == "cpu" and x.dtype == torch.float32 and _CPU_MKLDNN:
            # PyTorch routes small-channel CPU conv3d to an im2col path ~10x slower than oneDNN
            return torch.mkldnn_convolution(x, self.weight, self.bias, (0, 0, 0), self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


class RMSNorm(nn.Module):
    """F.normalize over channels * sqrt(C) * gamma (the Wan VAE's RMS_norm)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gamma, self.scale)


class FusedPrelude:
    """Modules whose norm -> SiLU -> causal conv runs through `fuse` (the model's choice)."""

    fuse: Fuse = staticmethod(norm_silu_pad)


class ResidualBlock(nn.Module, FusedPrelude):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices match the checkpoint: residual.{0,2,3,6} and the optional shortcut
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        h = self.shortcut(x)
        norm1, _, conv1, norm2, _, _, conv2 = self.residual  # (the SiLUs and dropout(0): fused)
        x = conv1.forward_normed(norm1, x, cache, self.fuse)
        x = conv2.forward_normed(norm2, x, cache, self.fuse)
        return x + h


def _head(owner: FusedPrelude, head: nn.Sequential, x: torch.Tensor,
          cache: CausalCache | None) -> torch.Tensor:
    """The encoder's or decoder's head (RMSNorm, SiLU, CausalConv3d) through `owner.fuse`."""
    norm, _, conv = head
    return conv.forward_normed(norm, x, cache, owner.fuse)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [bt, hw, c]
        o = self.proj(o.transpose(1, 2).reshape(b * t, c, h, w))
        return x + o.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class Upsample(nn.Upsample):
    """nearest-exact upsampling; bfloat16 through float32 on a CPU (whose builds may lack the
    kernel). Nearest copies values, so either way gives the same bits; on a GPU the direct
    kernel saves two passes over the decoder's largest maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" or x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


def _per_frame(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # apply a 2-D module to every frame of [B, C, T, H, W]
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Resample(nn.Module, _CausalSite):
    """Spatial x2 up/down resampling, with a causal temporal x2 step in the '3d' modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # The very first frame passes alone; every later frame becomes 2 through the time conv,
        # whose history starts at zeros after the first frame (upstream's 'Rep' marker).
        first_seen = cache is not None and self.site in cache.slots
        if cache is not None:
            cache.slots[self.site] = x.new_zeros(0)
        head, rest = (x[:, :, :0], x) if first_seen else (x[:, :, :1], x[:, :, 1:])
        if rest.shape[2] == 0:
            return head
        y = self.time_conv(rest, cache)  # [B, 2C, T, H, W]; channels [0:C] are the even frames
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([head, y], dim=2)

    def _time_downsample(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # The first frame passes alone; later output k sees input frames (2k-2, 2k-1, 2k).
        last = cache.slots.get(self.site) if cache is not None else None
        if last is None:
            head, seq = x[:, :, :1], x
        else:
            head, seq = x[:, :, :0], torch.cat([last.to(x.dtype), x], dim=2)
        if cache is not None:
            cache.slots[self.site] = x[:, :, -1:].clone()
        if seq.shape[2] < 3:
            return head
        return torch.cat([head, self.time_conv(seq)], dim=2)


# 4. Encoder and decoder -------------------------------------------------------------------------


def _run(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, (ResidualBlock, AttentionBlock, Resample, CausalConv3d)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module, FusedPrelude):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(din, dout))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                layers.append(Resample(dout, mode))
        self.downsamples = nn.Sequential(*layers)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top),
                                    ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top, images=False), nn.SiLU(),
                                  CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _head(self, self.head, x, cache)


class Decoder3d(nn.Module, FusedPrelude):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                din //= 2  # the previous upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(din, dout))
                din = dout
            if i != len(mult) - 1:
                layers.append(Resample(dout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _head(self, self.head, x, cache)


# 5. The VAE -------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encode(pixels, cache)` and `decode(latents, cache)`, both streamable.

    encode: pixels [B, 3, T, H, W] in [-1, 1] -> normalised latent mean [B, 16, T', H/8, W/8]
    decode: normalised latents [B, 16, T', h, w] -> pixels [B, 3, T, 8h, 8w] clamped to [-1, 1]
    With a fresh cache, T = 1 + 4k <-> T' = 1 + k; with a carried cache, a later chunk of n
    latents gives 4n frames and a later chunk of 4n frames gives n latents.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        for name, mod in self.named_modules():
            if isinstance(mod, _CausalSite):
                mod.site = name

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # constants, not buffers: nothing to load, nothing left on the meta device
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=like.dtype, device=like.device)
        std = torch.tensor(LATENT_STD, dtype=like.dtype, device=like.device)
        return mean.view(shape), std.view(shape)

    def encode(self, pixels: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        cache = CausalCache() if cache is None else cache
        mu, _ = self.conv1(self.encoder(pixels, cache)).chunk(2, dim=1)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latents: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        cache = CausalCache() if cache is None else cache
        mean, std = self._stats(latents)
        x = self.conv2(latents * std + mean)
        return self.decoder(x, cache).clamp(-1.0, 1.0)


def expected_state_dict_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = WanVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
