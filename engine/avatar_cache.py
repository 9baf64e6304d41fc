"""Per-avatar reuse: what a session's set-up computes from its image, size and prompt, kept so
that the next session with the same avatar skips it.

An entry holds the reference latent, the 19 motion latents, the text K/V, the prefilled sink and
the primed VAE decoder state (the causal cache after the warm-up decode): everything a session
computes before its first block except its rings. A process that runs only one role of the set-up
(a rank of a pipeline, `engine.parallel`) keeps only its part: the VAE's rank the latents and the
decoder state, a DiT rank the latents, the text K/V and the sink. All of it is read-only once made (sessions
copy the sink into their own buffers, and decoder slots are replaced, never written in place), so
sessions share one entry without copying it. Entries live on the engine's device; the cache is
bounded by bytes (`[engine] avatar_cache_mb`) and evicts the least recently used. umT5 outputs
are cached per prompt apart from it (`PromptCache`, a few kB each, always on): a prompt is a
pure function input, and umT5 may run on the CPU where it takes seconds.

Keys: a BLAKE2 digest of the image's pixels and shape, the generation size and the prompt; one
cache belongs to one engine, i.e. one model set, dtype and speed configuration.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.models.dit import SinkKV, TextKV

log = logging.getLogger(__name__)
MB = 1 << 20


@dataclass(frozen=True)
class AvatarKey:
    image: str  # digest of the pixels and their shape
    height: int
    width: int
    prompt: str

    @classmethod
    def of(cls, image: np.ndarray, height: int, width: int, prompt: str) -> AvatarKey:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((image.shape, str(image.dtype))).encode())
        h.update(np.ascontiguousarray(image).data)
        return cls(h.hexdigest(), height, width, prompt)


@dataclass
class AvatarState:
    """A session's set-up results for one avatar (shared, read-only)."""

    ref_latent: torch.Tensor  # [1, 16, 1, h, w]
    motion: torch.Tensor  # [1, 16, 19, h, w]
    text: TextKV | None = None  # the DiT's part (None where no denoising step runs)
    sink: SinkKV | None = None
    # the decoder's causal cache after the warm-up; filled by the warm-up job when it ran
    decode_slots: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [self.ref_latent, self.motion, *self.decode_slots.values()]
        text = self.text.nbytes if self.text is not None else 0
        sink = self.sink.nbytes if self.sink is not None else 0
        return text + sink + sum(t.numel() * t.element_size() for t in tensors)


class AvatarCache:
    """LRU of `AvatarState` by bytes. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._avatars: OrderedDict[AvatarKey, AvatarState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._avatars.values())

    def __len__(self) -> int:
        return len(self._avatars)

    def get(self, key: AvatarKey) -> AvatarState | None:
        with self._lock:
            state = self._avatars.get(key)
            if state is None:
                self.misses += 1
                return None
            self._avatars.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: AvatarKey, state: AvatarState) -> bool:
        """Keep `state`, evicting the least recently used entries to stay within budget; an
        entry larger than the whole budget is not kept. Returns whether it was kept."""
        size = state.nbytes
        with self._lock:
            if size > self.max_bytes:
                log.info("avatar cache: an entry of %.0f MB exceeds avatar_cache_mb=%.0f; not "
                         "kept", size / MB, self.max_bytes / MB)
                return False
            self._avatars[key] = state
            self._avatars.move_to_end(key)
            while sum(s.nbytes for s in self._avatars.values()) > self.max_bytes:
                self._avatars.popitem(last=False)
                self.evictions += 1
            return True



class PromptCache:
    """LRU of umT5 outputs by prompt (a few kB each: always on). Thread-safe."""

    def __init__(self, max_prompts: int = 64):
        self.max_prompts = max_prompts
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prompt: str) -> torch.Tensor | None:
        with self._lock:
            found = self._prompts.get(prompt)
            if found is not None:
                self._prompts.move_to_end(prompt)
            return found

    def put(self, prompt: str, context: torch.Tensor) -> None:
        with self._lock:
            self._prompts[prompt] = context
            self._prompts.move_to_end(prompt)
            while len(self._prompts) > self.max_prompts:
                self._prompts.popitem(last=False)
