"""Host -> device copies that never make the host wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory synchronises with the GPU, which
stops the engine thread from running ahead of the GPU and serialises everything queued behind
it. Staging the data in pinned memory and copying with non_blocking=True returns at once; the
caching host allocator keeps the pinned buffer alive until the copy has run. On the CPU this is
a no-op conversion.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` on `device` (as `dtype`), copied asynchronously when `device` is a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
