"""The causal Wan2.2-S2V DiT (14B) as Live-Avatar runs it: block-wise, with a KV sink and rings.

One model, one file (the S2V side modules live in `s2v_parts.py`). Module names reproduce the
released checkpoint's 1260 keys exactly. The forward pass is split into the pieces a streaming
generator needs, so that no piece is recomputed when it need not be:

1. conditioning, once per session: `text_kv` (text cross-attention K/V per layer), `embed_sink`
   + `prefill_sink` (reference and motion tokens, attended among themselves at t=0);
2. per block: `encode_audio` (5 local + 1 global audio tokens per latent frame) and
3. per denoising step: `denoise` (noisy tokens attend to a `SelfAttention` strategy, i.e. the
   step's KV ring plus the sink; audio injected after the configured blocks; modulated head).

`forward` chains all of them for one block with a fresh sink (the documented-shape entry point).
Shapes: B batch, F latent frames, H/W latent size, h/w = H/2, W/2 patch grid, D width,
Hn heads, Dh head_dim, Lt text tokens, Ls sink tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.attention import Attention, attend
from engine.models.rope import RopeBands, apply_rope, grid_positions, rope_cos_sin, spread
from engine.models.s2v_parts import AudioInjector, CausalAudioEncoder, FramePacker

log = logging.getLogger(__name__)

# 1. Configuration -------------------------------------------------------------------------------

WAN_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the S2V DiT. Defaults are the published 14B values (not diffusers' class
    defaults); `engine.checkpoint.dit_config` fills this from a checkpoint's config.json."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_layers: int = 25  # wav2vec2 hidden states mixed by `casual_audio_encoder.weights`
    audio_inject_layers: tuple[int, ...] = WAN_14B_INJECT_LAYERS
    enable_adain: bool = True
    zero_timestep: bool = True
    add_last_motion: bool = True
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # Run-time constants of wan_s2v_14B.py (not in config.json): audio is left-padded with this
    # many video frames (the 73-frame motion clip = 19 latents), whose latent steps are dropped.
    motion_video_frames: int = 73
    ref_time: int = 30  # RoPE time position of the reference tokens at prefill

    def __post_init__(self) -> None:
        def bad(key: str, value: object, accepted: str) -> ValueError:
            return ValueError(f"DiT config {key}={value!r} is not supported: {accepted}")

        if self.dim % self.num_heads:
            raise bad("dim", self.dim, f"must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise bad("num_heads", self.num_heads, "dim/num_heads must be even and >= 6 (RoPE)")
        if self.dim % 4 or self.dim % self.num_audio_token:
            raise bad("dim", self.dim, "must be divisible by 4 and by num_audio_token")
        if self.patch_size != (1, 2, 2):
            raise bad("patch_size", self.patch_size, "only (1, 2, 2) exists for Wan S2V")
        if self.in_dim != 16 or self.out_dim != 16:
            raise bad("in_dim/out_dim", (self.in_dim, self.out_dim), "must be 16 (VAE z_dim)")
        if not self.zero_timestep:
            raise bad("zero_timestep", False, "the causal model needs true")
        ids = list(self.audio_inject_layers)
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.num_layers for i in ids):
            raise bad("audio_inject_layers", ids, f"unique block ids in [0, {self.num_layers})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_bands(self) -> RopeBands:
        return RopeBands.for_head_dim(self.head_dim)

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_video_frames + 3) // 4


# 2. Values passed between the pieces ------------------------------------------------------------


@dataclass
class AudioTokens:
    """Audio conditioning of F latent frames: local [B, F, T+1, D], global [B, F, D] or None."""

    local: torch.Tensor
    glob: torch.Tensor | None


@dataclass
class SinkKV:
    """Un-roped K/V of the sink (reference + motion tokens) of every layer, and their layout.

    keys/values: [layers, B, Ls, Hn, Dh] (`keys[i]` is layer i). The first `ref_tokens` tokens
    are the reference image; `positions` [Ls, 3] are the RoPE positions used at prefill (ref at
    `ref_time`). Read-only once made: sessions and caches may share one.
    """

    keys: torch.Tensor
    values: torch.Tensor
    ref_tokens: int
    positions: np.ndarray

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    def reference_only(self) -> SinkKV:
        """The reference tokens' keys alone (copied): all a step needs once its buffer holds
        the sink, since only the reference keys move with the rolling sink (the values stay
        where the buffer has them); `values` is empty, so such a sink never fills a buffer."""
        n = self.ref_tokens
        return SinkKV(self.keys[:, :, :n].clone(), self.keys.new_empty(0), n,
                      self.positions[:n].copy())

    def positions_with_ref_at(self, ref_t: int) -> np.ndarray:
        pos = self.positions.copy()
        pos[: self.ref_tokens, 0] = ref_t
        return pos


@dataclass
class TextKV:
    """Text cross-attention K/V per layer, computed once per session, stored compactly.

    keys/values: [B, Lk, Hn, Dh] per layer. Wan attends to all `length` (text_len) rows, the
    zero-padded ones too, and every padding row's K/V is the same row (the same zero input
    through the same per-row projections and norms), so only the first padding row is kept:
    Lk = prompt tokens + 1 instead of 512 (0.42 GB -> about 0.03 GB at the 14B shapes for a
    32-token prompt, per session and per DiT rank). `layer(i)` gives the full rows back, as
    attention reads them. length 0: the rows are stored in full.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K/V with every attended row, [B, length, Hn, Dh] each."""
        k, v = self.keys[i], self.values[i]
        pad = self.length - k.shape[1]
        if pad <= 0:
            return k, v
        return _repeat_last_row(k, pad), _repeat_last_row(v, pad)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x's bit patterns as integers of its width (to compare floats bit for bit)."""
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _repeat_last_row(x: torch.Tensor, extra: int) -> torch.Tensor:
    """x [B, L, ...] -> [B, L + extra, ...], the last row repeated `extra` more times."""
    return torch.cat([x, x[:, -1:].expand(x.shape[0], extra, *x.shape[2:])], dim=1)


class SelfAttention(Protocol):
    """How the tokens of one forward attend: q, k, v [B, L, Hn, Dh] un-roped -> [B, L, Hn, Dh]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class SinkPrefill:
    """Self-attention of the sink pass: sink tokens attend only to each other; records K/V
    into [layers, ...] buffers allocated at the first layer (no per-layer list to stack).

    With `into`, each layer's K/V go to `into(layer, k, v)` instead (a step's K/V buffer) and
    only the keys of the first `keep` tokens (the reference's) are recorded, as
    `SinkKV.reference_only` keeps them: the whole sink's K/V (0.9 GB at 448x256) then never
    exist beside the buffers they are copied into."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, layers: int,
                 into: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 keep: int | None = None):
        self.cos, self.sin = cos, sin
        self.layers = layers
        self.into, self.keep = into, keep
        self.keys = torch.empty(0)
        self.values = torch.empty(0)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kept = k if self.keep is None else k[:, :self.keep]
        if layer == 0:
            self.keys = k.new_empty(self.layers, *kept.shape)
            self.values = v.new_empty(self.layers, *v.shape) if self.keep is None else \
                v.new_empty(0)
        self.keys[layer] = kept
        if self.keep is None:
            self.values[layer] = v
        if self.into is not None:
            self.into(layer, k, v)
        return attend(apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v)


# 3. Transformer block and head ------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class DiTBlock(nn.Module):
    """AdaLN-modulated self-attention, text cross-attention and GELU-tanh FFN (WanAttentionBlock)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, layer: int, attn: SelfAttention,
                text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor:
        # x: [B, G, T, D] tokens in modulation groups (latent frames, or the whole sink)
        # e0: [B, G, 6, D] float32 time projection of each group
        dtype = x.dtype
        mod = (self.modulation.float()[:, None] + e0)[:, :, :, None]  # [B, G, 6, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(dim=2)

        # 3a. self-attention
        h = (_layer_norm(x.float(), self.eps) * (1 + scale1) + shift1).to(dtype).flatten(1, 2)
        q = self.self_attn.project_q(h)
        k, v = self.self_attn.project_kv(h)
        y = self.self_attn.project_out(attn(layer, q, k, v)).view_as(x)
        xf = x.float() + y.float() * gate1

        # 3b. text cross-attention (padding rows are attended: Wan uses no context mask)
        hc = self.norm3(xf.to(dtype)).flatten(1, 2)
        yc = self.cross_attn.project_out(attend(self.cross_attn.project_q(hc), text_k, text_v))
        xf = xf + yc.view_as(x).float()

        # 3c. feed-forward
        h2 = (_layer_norm(xf, self.eps) * (1 + scale2) + shift2).to(dtype)
        xf = xf + self.ffn(h2).float() * gate2
        return xf.to(dtype)


class Head(nn.Module):
    """Modulated LayerNorm + Linear D -> prod(patch) * out_dim; run in float32."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, 4 * cfg.out_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x: [B, F, T, D]; e: [B, F, D] float32 time embedding -> [B, F, T, 4*out] float32
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(dim=2)
        h = _layer_norm(x.float(), self.eps) * (1 + scale[:, :, None]) + shift[:, :, None]
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Cos-first sinusoid of t (any shape) -> [..., dim] float32, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1).float()


# 4. The model -----------------------------------------------------------------------------------


class WanS2VDiT(nn.Module):
    """Wan2.2-S2V DiT with Live-Avatar's causal (block + sink + ring) attention."""

    # Parameters the loader keeps in float32 whatever the compute dtype (upstream runs the audio
    # encoder under fp32 autocast; it is 95M parameters).
    keep_fp32_prefixes: tuple[str, ...] = ("casual_audio_encoder.",)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d),
                                            nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, d, kernel_size=cfg.patch_size,
                                      stride=cfg.patch_size)
        self.trainable_cond_mask = nn.Embedding(3, d)  # 0 noisy, 1 reference, 2 motion
        self.casual_audio_encoder = CausalAudioEncoder(
            cfg.audio_dim, d, cfg.audio_layers, cfg.num_audio_token, cfg.enable_adain)
        self.audio_injector = AudioInjector(d, cfg.num_heads, len(cfg.audio_inject_layers),
                                            cfg.eps, cfg.enable_adain)
        self.frame_packer = FramePacker(cfg.in_dim, d, cfg.framepack_buckets)
        # block id -> injector index, in list order (not upstream's substring matching)
        self.injector_of = {b: j for j, b in enumerate(cfg.audio_inject_layers)}

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # 4a. conditioning computed once per session ---------------------------------------------

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """umT5 states [B, Lc, text_dim] (true length) -> [B, text_len, D], zero-padded first."""
        b, lc, _ = context.shape
        if lc > self.cfg.text_len:
            raise ValueError(f"text context has {lc} tokens; at most {self.cfg.text_len}")
        padded = context.new_zeros(b, self.cfg.text_len, context.shape[2])
        padded[:, :lc] = context
        return self.text_embedding(padded.to(self.dtype))

    def text_kv(self, context: torch.Tensor, compact: bool = True) -> TextKV:
        """Per-layer text cross-attention K/V: the same for every step of a session.

        With `compact`, the padding rows past the first are dropped (see `TextKV`) once they
        are checked to equal it bit for bit, so `TextKV.layer` returns exactly the rows made
        here; a layer where they differ (never seen: each row is its own input's function)
        makes the whole K/V stored in full instead. One host sync, at session set-up."""
        lc = context.shape[1]
        emb = self.embed_text(context)
        keep = lc + 1
        compact = compact and keep < self.cfg.text_len  # (else there is nothing to drop)
        out = TextKV(length=self.cfg.text_len if compact else 0)
        same = []
        for block in self.blocks:
            k, v = block.cross_attn.project_kv(emb)
            for t, kept in ((k, out.keys), (v, out.values)):
                if not compact:
                    kept.append(t)
                    continue
                bits = _bits(t)
                same.append((bits[:, lc:] == bits[:, lc:keep]).all())
                kept.append(t[:, :keep].clone())  # (a view would keep the whole 512 rows)
        if compact and not bool(torch.stack(same).all()):
            log.warning("text K/V: padding rows differ; keeping all %d rows", self.cfg.text_len)
            return self.text_kv(context, compact=False)
        return out

    def time_embedding_of(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B, F] (0..1000) -> e [B, F, D] and e0 = projection [B, F, 6, D], float32."""
        sin = sinusoidal_embedding(self.cfg.freq_dim, t)
        lin0, lin2 = self.time_embedding[0], self.time_embedding[2]
        e = F.linear(F.silu(F.linear(sin, lin0.weight.float(), lin0.bias.float())),
                     lin2.weight.float(), lin2.bias.float())
        proj, d, x = self.time_projection[1], self.cfg.dim, F.silu(e)
        # the projection's float32 weights one modulation group at a time: a float32 copy of
        # the whole weight is 0.63 GB at the 14B shapes, made on every call beside everything a
        # pipeline rank on a 24 GB card holds (it was that rank's peak)
        e0 = torch.stack([F.linear(x, proj.weight[g * d:(g + 1) * d].float(),
                                   proj.bias[g * d:(g + 1) * d].float()) for g in range(6)],
                         dim=-2)
        return e, e0

    def embed_sink(self, ref: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, int]:
        """Reference [B, 16, 1, H, W] + motion latents [B, 16, Tm, H, W] -> sink tokens.

        Returns tokens [B, Ls, D] (cond-mask embeddings added), positions [Ls, 3] with the
        reference at `ref_time`, and the number of reference tokens (which come first).
        """
        _, _, _, hh, ww = ref.shape
        ref_tok = self.patch_embedding(ref.to(self.dtype)).flatten(2).transpose(1, 2)
        zero_newest = 0 if self.cfg.add_last_motion else sum(self.cfg.framepack_buckets[:2])
        mot_tok = self.frame_packer(motion.to(self.dtype), zero_newest=zero_newest)
        mask = self.trainable_cond_mask.weight
        tokens = torch.cat([ref_tok + mask[1], mot_tok + mask[2]], dim=1)
        positions = np.concatenate(
            [self.ref_positions(hh, ww, self.cfg.ref_time), self.motion_positions(hh, ww)])
        return tokens, positions, ref_tok.shape[1]

    def ref_positions(self, hh: int, ww: int, ref_t: int) -> np.ndarray:
        return grid_positions([ref_t], range(hh // 2), range(ww // 2))

    def motion_positions(self, hh: int, ww: int) -> np.ndarray:
        """RoPE positions of the FramePack groups: newest at t=-1, 2x at -3, 4x at -19..-4."""
        h2, w2 = hh // 2, ww // 2
        groups = []
        start = 0
        for bucket, stride in zip(self.cfg.framepack_buckets, (1, 2, 4), strict=True):
            start += bucket
            count = bucket // stride
            # the group spans frames [-start, -start + bucket - 1], compressed to `count` steps
            t = -np.linspace(start, start - bucket + 1, count).astype(np.int64)
            groups.append(grid_positions(t, spread(h2, hh // (2 * stride)),
                                         spread(w2, ww // (2 * stride))))
        return np.concatenate(groups)

    def prefill_sink(self, tokens: torch.Tensor, positions: np.ndarray, ref_tokens: int,
                     text: TextKV,
                     into: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                     ) -> SinkKV:
        """Run the blocks over the sink tokens alone at t=0 and keep each layer's un-roped K/V.

        With `into`, every layer's K/V [B, Ls, Hn, Dh] are handed to it as they are made and
        the result keeps the reference tokens only (what `SinkKV.reference_only` gives)."""
        b = tokens.shape[0]
        _, e0 = self.time_embedding_of(torch.zeros(b, 1, device=tokens.device))
        cos, sin = rope_cos_sin(positions, self.cfg.rope_bands, tokens.device)
        attn = SinkPrefill(cos, sin, len(self.blocks), into,
                           keep=None if into is None else ref_tokens)
        x = tokens[:, None]  # [B, 1, Ls, D]: one modulation group
        for i, block in enumerate(self.blocks):
            x = block(x, e0, i, attn, *text.layer(i))
        kept = positions if into is None else positions[:ref_tokens].copy()
        return SinkKV(attn.keys, attn.values, ref_tokens, kept)

    # 4b. per block ----------------------------------------------------------------------------

    def encode_audio(self, feats: torch.Tensor) -> AudioTokens:
        """wav2vec2 features [B, 25, A, 4F] of a block's video frames -> audio tokens of F frames.

        As upstream, the block's first frame is repeated `motion_video_frames` times in front
        and the latent steps that belong to that padding are dropped.
        """
        pad = feats[..., :1].expand(*feats.shape[:-1], self.cfg.motion_video_frames)
        loc, glob = self.casual_audio_encoder(torch.cat([pad, feats], dim=-1))
        drop = self.cfg.motion_latent_frames
        loc = loc[:, drop:].to(self.dtype)
        return AudioTokens(loc, None if glob is None else glob[:, drop:].to(self.dtype))

    def noisy_positions(self, frame0: int, frames: int, hh: int, ww: int) -> np.ndarray:
        return grid_positions(range(frame0, frame0 + frames), range(hh // 2), range(ww // 2))

    # 4c. one denoising step -----------------------------------------------------------------

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, audio: AudioTokens,
                text: TextKV, attn: SelfAttention, cond: torch.Tensor | None = None,
                layers: LayerRunner | None = None) -> torch.Tensor:
        """Velocity of a noisy block. latents [B, 16, F, H, W]; timestep [B] (0..1000).

        `attn` decides what the block attends to (its KV ring + sink); it applies RoPE.
        `layers` runs the blocks and audio injections (e.g. compiled); default: as they are.
        Returns the flow prediction [B, 16, F, H, W] in float32.
        """
        b, _, f, hh, ww = latents.shape
        x = self.patch_embedding(latents.to(self.dtype))  # [B, D, F, h, w]
        if cond is None:
            x = x + self.cond_encoder.bias[:, None, None, None]  # conv of zeros = its bias
        else:
            x = x + self.cond_encoder(cond.to(self.dtype))
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, F, h*w, D]
        x = x + self.trainable_cond_mask.weight[0]
        e, e0 = self.time_embedding_of(timestep.reshape(b, 1).expand(b, f))
        for i, block in enumerate(self.blocks):
            if layers is None:
                x = block(x, e0, i, attn, *text.layer(i))
            else:
                x = layers.block(block, x, e0, i, attn, *text.layer(i))
            if i in self.injector_of:
                j = self.injector_of[i]
                if layers is None:
                    x = self._inject_audio(j, x, audio)
                else:
                    x = layers.inject(*self._injector(j), x, audio.local, audio.glob)
        return self.unpatchify(self.head(x, e), hh, ww)

    def unpatchify(self, out: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
        """Head output [B, F, h*w, 4*C] -> [B, C, F, H, W].

        The token vector index is ((p*2 + q)*2 + r)*C + c, p being the (size 1) time patch.
        """
        b, f = out.shape[:2]
        out = out.view(b, f, hh // 2, ww // 2, 2, 2, self.cfg.out_dim)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.cfg.out_dim, f, hh, ww)

    def _injector(self, j: int) -> tuple[nn.Module, nn.Module | None]:
        inj = self.audio_injector
        return inj.injector[j], inj.injector_adain_layers[j] if inj.enable_adain else None

    def _inject_audio(self, j: int, x: torch.Tensor, audio: AudioTokens) -> torch.Tensor:
        return inject_audio(*self._injector(j), x, audio.local, audio.glob)

    # 4d. documented-shape entry point ----------------------------------------------------------

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                ref: torch.Tensor, motion: torch.Tensor, audio_feats: torch.Tensor) -> torch.Tensor:
        """One block with a fresh sink and an empty ring (the first block of a stream).

        latents [B, 16, F, H, W], timestep [B], context [B, Lc, text_dim], ref [B, 16, 1, H, W],
        motion [B, 16, Tm, H, W], audio_feats [B, 25, A, 4F] -> velocity [B, 16, F, H, W].
        """
        text = self.text_kv(context)
        tokens, positions, n_ref = self.embed_sink(ref, motion)
        sink = self.prefill_sink(tokens, positions, n_ref, text)
        _, _, f, hh, ww = latents.shape
        attn = BlockAttention(sink, self.cfg.rope_bands,
                              self.noisy_positions(0, f, hh, ww),
                              sink.positions_with_ref_at(self.cfg.ref_time))
        return self.denoise(latents, timestep, self.encode_audio(audio_feats), text, attn)


class BlockAttention:
    """A block attending to itself and the sink, no history (the ring-empty case)."""

    def __init__(self, sink: SinkKV, bands: RopeBands, positions: np.ndarray,
                 sink_positions: np.ndarray):
        device = sink.keys[0].device
        self.sink = sink
        self.q_rope = rope_cos_sin(positions, bands, device)
        self.s_rope = rope_cos_sin(sink_positions, bands, device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = apply_rope(q, *self.q_rope)
        k = apply_rope(k, *self.q_rope)
        sk = apply_rope(self.sink.keys[layer], *self.s_rope)
        return attend(q, torch.cat([k, sk], dim=1), torch.cat([v, self.sink.values[layer]], dim=1))


def inject_audio(attn: Attention, adain: nn.Module | None, x: torch.Tensor, local: torch.Tensor,
                 glob: torch.Tensor | None) -> torch.Tensor:
    """One audio injection: each latent frame's tokens x [B, F, T, D] attend to that frame's
    audio tokens local [B, F, T_a, D], after an AdaLN on the global token glob [B, F, D]."""
    b, f, t, d = x.shape
    flat = x.reshape(b * f, t, d)
    if adain is not None:
        assert glob is not None, "enable_adain needs the global audio token"
        h = adain(flat, glob.reshape(b * f, d))
    else:
        h = _layer_norm(flat, 1e-6)
    k, v = attn.project_kv(local.reshape(b * f, -1, d))
    y = attn.project_out(attend(attn.project_q(h), k, v))
    return x + y.view(b, f, t, d)


class LayerRunner(Protocol):
    """How `denoise` runs its repeated parts (`engine.speed.compile` compiles them)."""

    def block(self, block: DiTBlock, x: torch.Tensor, e0: torch.Tensor, layer: int,
              attn: SelfAttention, text_k: torch.Tensor, text_v: torch.Tensor) -> torch.Tensor: ...

    def inject(self, attn: Attention, adain: nn.Module | None, x: torch.Tensor,
               local: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor: ...


def expected_state_dict_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of this architecture, built on the meta device (no allocation)."""
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lora_target_modules(model: nn.Module, targets: Sequence[str] = ("q", "k", "v", "o", "ffn.0",
                                                                      "ffn.2")) -> list[str]:
    """Names of the nn.Linear modules PEFT would wrap for these targets (name == t or endswith .t)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return out
