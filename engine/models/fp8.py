"""FP8 (e4m3) linear layers for the DiT: weights quantised once at load, activations per call.

The GEMM is `torch._scaled_mm(x_fp8, w_fp8.T, scale_x, scale_w)`: each operand is stored as
e4m3 values q with a float32 scale s such that the operand is about q * s, and the product is
accumulated in higher precision and returned in the activation's dtype. Two scalings:

- "tensor" (what Live-Avatar ships): one scale for the whole weight (amax / 448) and one for the
  whole activation, computed on the device at every call (no host sync);
- "row": one scale per output channel of the weight and per token of the activation; more
  accurate for activations with outlier tokens, and as fast on Hopper.

What stays in bf16/fp32, as upstream: the embeddings (patch, text, time, cond, FramePack), the
time projection, the head, every norm and modulation, and the whole causal audio encoder (its
`final_linear` included); quantised: self- and text cross-attention q/k/v/o, the FFN, and the
audio injector's attentions and AdaLN linears.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
SCALINGS = ("tensor", "row")

# nn.Linear modules under these names are left in the compute dtype (upstream's exclusions)
KEEP_PRECISION = ("text_embedding", "time_embedding", "time_projection", "head.head",
                  "casual_audio_encoder")


def quantize(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale: [] for "tensor", [M, 1] for "row").

    x is about q * scale. amax is taken on the device; an all-zero row gets scale 1/448 so it
    quantises to zeros instead of dividing by zero.
    """
    xf = x.float()
    if scaling == "tensor":
        amax = xf.abs().amax()
    elif scaling == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"fp8 scaling {scaling!r}: accepted {SCALINGS}")
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class FP8Linear(nn.Module):
    """y = x W^T + b with W stored as e4m3 [N, K] and its float32 scale."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, scaling: str):
        super().__init__()
        self.scaling = scaling
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # e4m3 [N, K], row-major
        # _scaled_mm wants the weight's scale as [1, N] beside a row-major [M, 1] one
        self.register_buffer("weight_scale",
                             weight_scale.reshape(1, -1) if scaling == "row" else weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: str) -> FP8Linear:
        q, scale = quantize(linear.weight.detach(), scaling)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias, scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        q, scale = quantize(x2, self.scaling)
        bias = self.bias if self.scaling == "tensor" and self.bias is not None else None
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=None if bias is None else bias.to(x.dtype),
                               out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None and bias is None:
            # row-wise _scaled_mm takes no bias on every build: add it here
            out = out + self.bias.to(out.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scaling={self.scaling}")


def quantize_linears(model: nn.Module, scaling: str = "tensor",
                     keep: tuple[str, ...] = KEEP_PRECISION) -> int:
    """Replace every nn.Linear of `model` not under a `keep` name by an FP8Linear, in place.

    One layer at a time, so the peak is the model plus one float32 copy of one weight; the
    original weights are freed as their modules are dropped. Returns the number replaced.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling {scaling!r}: accepted {SCALINGS}")
    targets = [name for name, mod in model.named_modules() if _replaced(name, mod, keep)]
    for name in targets:
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        linear = getattr(parent, leaf)
        with torch.no_grad():
            setattr(parent, leaf, FP8Linear.from_linear(linear, scaling))
        del linear
    return len(targets)


def quantize_on_load(model: nn.Module, key: str, value: torch.Tensor, scaling: str,
                     keep: tuple[str, ...] = KEEP_PRECISION) -> bool:
    """Load-time FP8: if `key` names the weight of an nn.Linear that `quantize_linears` would
    replace, replace that linear now by an FP8Linear made from `value` and return True (the
    caller then drops `value`); otherwise change nothing and return False.

    A loader that calls this for every tensor it reads never holds the DiT's bf16 weights at
    once: the peak is the FP8 model plus one bf16 weight and its float32 copy, not the whole
    bf16 model (about 2x the FP8 one) as when quantising after the load. The result is the
    same, bit for bit: the same weight goes through the same `quantize`. A bias read before
    its weight is carried over; one read after lands on the FP8Linear's `bias` buffer.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling {scaling!r}: accepted {SCALINGS}")
    if not replaced_on_load(model, key, keep):
        return False
    owner = key.rpartition(".")[0]
    parent_name, _, name = owner.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, name)
    with torch.no_grad():
        q, scale = quantize(value, scaling)
        q, scale = _settled(q), _settled(scale)
    bias = None if linear.bias is None else linear.bias.detach()
    setattr(parent, name, FP8Linear(q, scale, bias, scaling))
    return True


def replaced_on_load(model: nn.Module, key: str, keep: tuple[str, ...] = KEEP_PRECISION) -> bool:
    """Whether `quantize_on_load` replaces the linear whose weight `key` names."""
    owner, _, leaf = key.rpartition(".")
    if leaf != "weight" or not owner:
        return False
    parent_name, _, name = owner.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return _replaced(owner, getattr(parent, name, None), keep)


_SCRATCH: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def scratch(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Make a weight's load-time temporaries (the bf16 weight read, its LoRA merge, the float32
    copy that is quantised) on a side CUDA stream, whose memory pool is the allocator's own:
    the e4m3 weights `quantize_on_load` keeps are copied to the default stream's pool, which
    then holds long-lived tensors only, packed. Made on one pool, each e4m3 weight sat between
    holes its temporaries left, and about 0.6 GiB of partly used pages could never be released
    (measured on a DiT rank, docs/bench.md). A no-op off CUDA or when not `enabled`."""
    dev = torch.device(device)
    if not enabled or dev.type != "cuda":
        yield
        return
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    side = _SCRATCH.get(dev)
    if side is None:
        side = _SCRATCH[dev] = torch.cuda.Stream(dev)
    main = torch.cuda.current_stream(dev)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def weight_scratch(model: nn.Module, key: str, device: torch.device | str,
                   scaling: str | None) -> contextlib.AbstractContextManager[None]:
    """`scratch` for reading tensor `key` when `quantize_on_load` (at `scaling`, None: off) will
    replace it: its copy on the device is then a temporary."""
    return scratch(device, scaling is not None and replaced_on_load(model, key))


def release_scratch(device: torch.device | str) -> None:
    """Give the memory of `scratch`'s temporaries back to the device once a model is loaded."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def _settled(t: torch.Tensor) -> torch.Tensor:
    """t itself, or inside `scratch` its copy made on the default stream's pool."""
    if not t.is_cuda:
        return t
    side, main = torch.cuda.current_stream(t.device), torch.cuda.default_stream(t.device)
    if side == main:
        return t
    main.wait_stream(side)
    with torch.cuda.stream(main):
        out = t.clone()
    side.wait_stream(main)  # t's memory is reused on `side` only after the copy
    return out


def _replaced(name: str, module: object, keep: tuple[str, ...]) -> bool:
    """Whether FP8 replaces this module: an nn.Linear outside the `keep` names."""
    return isinstance(module, nn.Linear) and not name.startswith(keep)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: its parameters and its FP8Linears' e4m3 weights, scales
    and biases (buffers, since e4m3 tensors take no part in autograd)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, FP8Linear):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
    return total


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, FP8Linear) for m in model.modules())
