"""The data plane of a pipeline: each block's latents and audio tokens from DiT rank i to i+1,
and its clean latents from the last DiT rank to the VAE rank, by torch.distributed
point-to-point (NCCL between GPUs, gloo between CPU processes).

Every rank runs the same global sequence of plans, so each pair of neighbours sends and receives
the same tensors in the same order: no tags and no headers are needed (NCCL has no tags), and
shapes come from the plan (`block_shapes`). The latents travel in float32, as the steps leave
them (about 0.8 MB a hop at 704x384), so a pipeline computes the same bits as one process; the
audio tokens (about 0.2 MB at 14B) ride along, so every step of a block sees the audio rank 0
computed for it, with no lag.

Sends are asynchronous (`isend`); up to `MAX_SENDS` are in flight before the oldest is waited
for. A receive waits at most `timeout_s` on gloo; on NCCL the host does not wait at all (the GPU
stream does) and the group's timeout, enforced by NCCL's watchdog, bounds it instead. A rank that
dies is seen at once by the server, which replaces the whole group.
"""

from __future__ import annotations

import datetime
from collections import deque

import torch
import torch.distributed as dist

from engine.models.dit import AudioTokens, DiTConfig

MAX_SENDS = 8


def block_shapes(cfg: DiTConfig, frames: int, latent_hw: tuple[int, int]
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """(latents, local audio tokens, global audio token or None) of one block."""
    h, w = latent_hw
    glob = (1, frames, cfg.dim) if cfg.enable_adain else None
    return (1, cfg.in_dim, frames, h, w), (1, frames, cfg.num_audio_token + 1, cfg.dim), glob


class Hops:
    """Point-to-point sends and receives of one rank, in plan order."""

    def __init__(self, device: torch.device, timeout_s: float):
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._sends: deque[tuple[dist.Work, torch.Tensor]] = deque()
        self.blocking = device.type != "cuda"  # gloo: the host waits, with a timeout

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        for t in tensors:
            t = t.contiguous()
            work = dist.isend(t, dst)
            assert work is not None
            self._sends.append((work, t))  # keep t alive until it is sent
        while len(self._sends) > MAX_SENDS:
            self._wait_send()

    def recv(self, specs: list[tuple[tuple[int, ...], torch.dtype]], src: int
             ) -> list[torch.Tensor]:
        out = []
        works = []
        for shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            work = dist.irecv(t, src)
            assert work is not None
            works.append(work)
            out.append(t)
        for work in works:
            if self.blocking:
                work.wait(timeout=self.timeout)
            else:
                work.wait()  # the current stream waits; the host goes on queueing
        return out

    def send_block(self, x: torch.Tensor, audio: AudioTokens | None, dst: int) -> None:
        parts = [x.float()]
        if audio is not None:
            parts.append(audio.local)
            if audio.glob is not None:
                parts.append(audio.glob)
        self.send(parts, dst)

    def recv_block(self, cfg: DiTConfig, frames: int, latent_hw: tuple[int, int],
                   dtype: torch.dtype, src: int, with_audio: bool
                   ) -> tuple[torch.Tensor, AudioTokens | None]:
        x_shape, local_shape, glob_shape = block_shapes(cfg, frames, latent_hw)
        specs = [(x_shape, torch.float32)]
        if with_audio:
            specs.append((local_shape, dtype))
            if glob_shape is not None:
                specs.append((glob_shape, dtype))
        got = self.recv(specs, src)
        if not with_audio:
            return got[0], None
        return got[0], AudioTokens(got[1], got[2] if glob_shape is not None else None)

    def _wait_send(self) -> None:
        work, _ = self._sends.popleft()
        if self.blocking:
            work.wait(timeout=self.timeout)
        else:
            work.wait()

    def drain(self) -> None:
        while self._sends:
            self._wait_send()
