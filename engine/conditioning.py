"""A session's set-up from its avatar, by role, so that one process can run all of it (the
generator) or a pipeline can split it (`engine.parallel`):

- the encoder's part, where the VAE and umT5 live: the reference image cropped to the generation
  size and VAE-encoded, the same image as a static 73-frame clip encoded to 19 motion latents,
  and the prompt's umT5 states (cached per prompt);
- the DiT's part, on every process that runs denoising steps: the text cross-attention K/V of
  every layer and the sink (reference + FramePack motion tokens) prefilled at t=0.

Every function is deterministic in its inputs, so the parts computed in different processes are
the same bits as when one process computes them all.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.avatar_cache import PromptCache
from engine.image import prepare_reference
from engine.models.dit import SinkKV, TextKV, WanS2VDiT
from engine.models.text import TextEncoder
from engine.models.vae import CausalCache, WanVAE
from engine.transfer import to_device


def encode_reference(vae: WanVAE, image: np.ndarray, height: int, width: int,
                     device: torch.device, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference pixels [1, 3, 1, H, W] in the model dtype, its latent [1, 16, 1, h, w] float32)."""
    ref_px = to_device(prepare_reference(image, height, width), device, dtype)
    return ref_px, vae.encode(ref_px).float()


def encode_motion(vae: WanVAE, ref_px: torch.Tensor, frames: int) -> torch.Tensor:
    """The reference as a static clip of `frames` frames -> motion latents [1, 16, 19, h, w].

    The causal encoder takes the clip as 1 + 4 + 4 + ... frames with its cache carried, which
    equals one call over the whole clip and keeps the activations of 4 frames alive instead of
    73 (gigabytes at 704x384).
    """
    cache = CausalCache()
    chunks = [vae.encode(ref_px, cache)]
    for start in range(1, frames, 4):
        n = min(4, frames - start)
        chunks.append(vae.encode(ref_px.expand(-1, -1, n, -1, -1), cache))
    return torch.cat(chunks, dim=2).float()


def prompt_context(text: TextEncoder, prompts: PromptCache, prompt: str,
                   device: torch.device) -> torch.Tensor:
    """umT5 states of the prompt [1, Lc, text_dim] on `device` (cached per prompt)."""
    context = prompts.get(prompt)
    if context is None:
        context = text.encode([prompt])[0][None].to(device)
        prompts.put(prompt, context)
    return context


def prefill_sink(dit: WanS2VDiT, ref: torch.Tensor, motion: torch.Tensor, text: TextKV) -> SinkKV:
    """The sink's K/V of every layer for this reference latent and these motion latents."""
    tokens, positions, n_ref = dit.embed_sink(ref, motion)
    return dit.prefill_sink(tokens, positions, n_ref, text)
