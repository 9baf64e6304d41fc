"""Which scaled-dot-product-attention kernel the engine uses, chosen once at start-up.

PyTorch's SDPA dispatches to cuDNN, FlashAttention-2, memory-efficient or math kernels, and its
default order is not the fastest for every shape: on Hopper, cuDNN's attention is much faster
than flash for the step's 3,168 queries over ~15.8k keys (Live-Avatar credits cuDNN attention
and compilation with most of its 2.5-3x). `attention_backend = "auto"` times every backend that
runs at the session shapes (one full-ring step's self-attention) on a GPU and keeps the
fastest (on a CPU it is SDPA's own choice); a named
backend is used as asked (and refused at start-up if it cannot run); "default" leaves SDPA's own
choice (the plain path). The chosen backend goes first in the priority list and the others
follow, so a call it cannot serve (the 5-token audio attention, say) still runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.errors import ConfigError
from engine.timing import StageClock

log = logging.getLogger(__name__)

BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CHOICES = ("auto", "default", *BACKENDS)
_PRIORITY = inspect.signature(sdpa_kernel).parameters.get("set_priority") is not None


@dataclass(frozen=True)
class AttentionChoice:
    """The backend in use, and what the probe measured (ms, or why a backend cannot run)."""

    name: str  # a BACKENDS key, or "default"
    probed: dict[str, float | str] = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the enclosed attention calls on this backend (others as fallbacks)."""
        if self.name == "default":
            yield
            return
        first = BACKENDS[self.name]
        order = [first, *(b for b in BACKENDS.values() if b != first)]
        with sdpa_kernel(order, set_priority=True) if _PRIORITY else sdpa_kernel(order):
            yield

    def describe(self) -> str:
        parts = [f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k}: {v}"
                 for k, v in self.probed.items()]
        return self.name + (f" ({', '.join(parts)})" if parts else "")


def _time_backend(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  repeats: int) -> float:
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, k, v)  # warm-up (and: does it run at all?)
        times = []
        for _ in range(repeats):
            clock = StageClock(q.device)
            clock.mark("start")
            F.scaled_dot_product_attention(q, k, v)
            clock.mark("end")
            times.append(clock.between("start", "end"))
    return 1000.0 * min(times)


def probe(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, q_tokens: int,
          kv_tokens: int, repeats: int = 3) -> dict[str, float | str]:
    """Milliseconds of one self-attention call per backend at these shapes, or the reason a
    backend does not run."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, q_tokens, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, heads, kv_tokens, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    out: dict[str, float | str] = {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns about every backend that cannot run
        for name, backend in BACKENDS.items():
            try:
                out[name] = _time_backend(backend, q, k, v, repeats)
            except RuntimeError as exc:
                out[name] = "not available (" + str(exc).split(".")[0][:60] + ")"
    return out


def choose(setting: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int,
           q_tokens: int, kv_tokens: int) -> AttentionChoice:
    """The backend for `[engine] attention_backend = setting` at these shapes (logged)."""
    if setting not in CHOICES:
        raise ConfigError(f"engine.attention_backend={setting!r}: accepted {CHOICES}")
    if setting == "default" or (setting == "auto" and device.type != "cuda"):
        # on a CPU SDPA's own choice is the fast one, and probing 14B-sized calls takes seconds
        choice = AttentionChoice("default")
    else:
        probed = probe(device, dtype, heads, head_dim, q_tokens, kv_tokens)
        runs = {k: t for k, t in probed.items() if isinstance(t, float)}
        if setting == "auto":
            name = min(runs, key=runs.__getitem__) if runs else "default"
        elif setting not in runs:
            raise ConfigError(f"engine.attention_backend={setting!r} cannot run here "
                              f"({probed[setting]}); use \"auto\" or one of {sorted(runs)}")
        else:
            name = setting
        choice = AttentionChoice(name, probed)
    log.info("attention backend for %d queries x %d keys: %s", q_tokens, kv_tokens,
             choice.describe())
    return choice
