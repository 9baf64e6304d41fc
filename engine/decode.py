"""Decoding a block's latents into uint8 frames on the host, inline or overlapped.

The VAE does not depend on the next block's denoising, so with `[engine] vae_overlap` it runs
beside it: on a GPU on a second CUDA stream (which waits for the block's last step through an
event), on a CPU on one worker thread. Frames become uint8 on the device and are copied into
pinned host memory without blocking; a block's frames are handed over the moment its own decode
has finished (`PendingDecode.done()`), not one block later.

One `DecodeQueue` per engine: decodes of all its sessions run in submission order, so a decode
cache (per session) or a cached warm-up state (per avatar) made by one job is ready for the next.
A `SessionDecoder` is one session's decode stream on such a queue: its causal cache, primed on the
motion latents at the start and primed afresh after a cut in the timeline.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.models.vae import CausalCache, WanVAE
from engine.timing import StageClock

MODES = ("sync", "stream", "thread")


@dataclass
class DecodedFrames:
    """A decode job's result: frames (pinned host memory on a GPU) and its clock."""

    frames: torch.Tensor  # uint8 [T, H, W, 3] on the host
    clock: StageClock  # marks "decode_start", "decode", "postprocess"


class PendingDecode:
    """A submitted decode: `done()` never waits; `result()` waits for it."""

    def __init__(self, value: DecodedFrames | None = None,
                 event: torch.cuda.Event | None = None,
                 future: concurrent.futures.Future[DecodedFrames] | None = None):
        self._value, self._event, self._future = value, event, future

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event is None or bool(self._event.query())

    def result(self) -> DecodedFrames:
        if self._future is not None:
            return self._future.result()
        if self._event is not None:
            self._event.synchronize()
        assert self._value is not None
        return self._value


class DecodeQueue:
    """Where decode jobs run: "sync" (inline), "stream" (a second CUDA stream), "thread"."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}: accepted {MODES}")
        if mode == "stream" and device.type != "cuda":
            raise ValueError(f"decode mode 'stream' needs a CUDA device, not {device}")
        self.mode = mode
        self.device = device
        self.stream = torch.cuda.Stream(device) if mode == "stream" else None
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-vae")
                      if mode == "thread" else None)

    @classmethod
    def for_device(cls, device: torch.device, overlap: bool) -> DecodeQueue:
        if not overlap:
            return cls("sync", device)
        return cls("stream" if device.type == "cuda" else "thread", device)

    @property
    def overlapped(self) -> bool:
        return self.mode != "sync"

    def submit(self, job: Callable[[], DecodedFrames], inputs: tuple[torch.Tensor, ...] = ()
               ) -> PendingDecode:
        """Run `job` after everything already queued on the current stream (its `inputs` were
        made there)."""
        if self.mode == "sync":
            return PendingDecode(job())
        if self.mode == "thread":
            assert self._pool is not None
            return PendingDecode(future=self._pool.submit(_no_grad, job))
        assert self.stream is not None
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for t in inputs:  # made on the compute stream, read here: keep them alive for us
                t.record_stream(self.stream)
            value = job()
            done = torch.cuda.Event(blocking=True)  # waiting threads sleep, not spin
            done.record(self.stream)
        return PendingDecode(value, event=done)

    def run(self, job: Callable[[], Any], inputs: tuple[torch.Tensor, ...] = ()) -> None:
        """Queue work whose result nobody waits for (a decoder warm-up)."""
        self.submit(lambda: (job(), _EMPTY)[1], inputs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class SessionDecoder:
    """One session's streaming decode: the causal cache carried from block to block.

    `start` makes a fresh cache primed on the first `warmup_latents` motion latents (the frames
    are discarded), either from `primed` (the slots such a warm-up left, kept by the avatar
    cache) or by queueing the warm-up decode, whose slots it then also copies into `keep`. `cut`
    returns to that primed state (a seek: the decoder must not run across the jump), from the
    kept slots or by decoding the warm-up again; both are the same bits. Every change is a job
    on the queue, so it lands between the blocks submitted before and after it.
    """

    def __init__(self, vae: WanVAE, queue: DecodeQueue, channels_last: bool = False,
                 warmup_latents: int = 7):
        self.vae = vae
        self.queue = queue
        self.channels_last = channels_last
        self.warmup_latents = warmup_latents
        self.cache = CausalCache()
        self._warm = torch.empty(0)
        self._primed: dict[str, torch.Tensor] | None = None

    def start(self, motion: torch.Tensor, dtype: torch.dtype,
              primed: dict[str, torch.Tensor] | None = None,
              keep: dict[str, torch.Tensor] | None = None) -> PendingDecode | None:
        """A fresh primed cache for `motion` [1, 16, T, h, w]; returns the warm-up decode when
        one was queued."""
        self._warm = motion[:, :, : self.warmup_latents].to(dtype)
        self._primed = primed if primed else keep
        return self._prime(from_slots=bool(primed), keep=None if primed else keep)

    def cut(self) -> None:
        """Back to the primed state of `start`."""
        self._prime(from_slots=bool(self._primed), keep=None)

    def _prime(self, from_slots: bool, keep: dict[str, torch.Tensor] | None
               ) -> PendingDecode | None:
        cache = self.cache = CausalCache()
        if from_slots:
            primed = self._primed
            assert primed is not None
            # a job, so that slots a queued warm-up is still filling are complete by then
            self.queue.run(lambda: cache.slots.update(primed))
            return None
        warm = self._warm
        if not warm.shape[2]:
            return None
        vae, cl = self.vae, self.channels_last

        def job() -> DecodedFrames:
            out = decode_block(vae, warm, cache, cl)
            if keep is not None:
                keep.update(cache.slots)
            return out

        return self.queue.submit(job, inputs=(warm,))

    def submit(self, latents: torch.Tensor) -> PendingDecode:
        """Decode a block's clean latents [1, 16, F, h, w] (model dtype) after everything
        queued before."""
        vae, cache, cl = self.vae, self.cache, self.channels_last
        return self.queue.submit(lambda: decode_block(vae, latents, cache, cl), inputs=(latents,))

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes()


def _no_grad(job: Callable[[], DecodedFrames]) -> DecodedFrames:
    with torch.inference_mode():  # inference mode is per thread
        return job()


_EMPTY = DecodedFrames(torch.empty(0, dtype=torch.uint8), StageClock(torch.device("cpu")))


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the same device."""
    x = ((pixels[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def decode_block(vae: WanVAE, latents: torch.Tensor, cache: CausalCache,
                 channels_last: bool = False) -> DecodedFrames:
    """Latents [1, 16, F, h, w] (model dtype) -> uint8 frames on the host, one latent frame per
    decoder call (the causal cache makes that equal to one call; it keeps the activations of
    only 4 frames alive)."""
    clock = StageClock(latents.device)
    clock.mark("decode_start")
    parts = []
    for i in range(latents.shape[2]):
        z = latents[:, :, i:i + 1]
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        parts.append(vae.decode(z, cache))
    pixels = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    clock.mark("decode")
    frames = to_uint8(pixels)
    if frames.device.type == "cuda":
        host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        frames = host
    clock.mark("postprocess")
    return DecodedFrames(frames, clock)


def frames_to_numpy(frames: torch.Tensor) -> np.ndarray:
    """The host frames as numpy (shares the pinned memory; it stays alive with the array)."""
    return frames.cpu().numpy()


def use_channels_last(vae: WanVAE) -> None:
    """Store the VAE's convolution weights channels-last (NDHWC / NHWC), the layout cuDNN's
    bf16 convolutions run natively; in place, idempotent."""
    with torch.no_grad():
        for mod in vae.modules():
            if isinstance(mod, torch.nn.Conv3d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(mod, torch.nn.Conv2d):
                mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
