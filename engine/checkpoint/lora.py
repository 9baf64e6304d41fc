"""The Live-Avatar LoRA: parse its keys, check them against the DiT, merge W += (alpha/r)·B·A once.

Accepted key forms (any of the prefixes `base_model.model.`, `model.`, `diffusion_model.`):
`<module>.lora_A[.default].weight` / `lora_B`, and kohya-style `lora_down` / `lora_up` with an
optional per-module `<module>.alpha`. The rank comes from lora_A's first dim; alpha is not stored
in the released file (64 by default, configurable). Any non-LoRA tensor in the file overrides the
base weight of the same name, as upstream's non-strict load does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from engine.checkpoint.files import TensorInfo
from engine.checkpoint.report import ComponentReport

PREFIXES = ("base_model.model.", "model.", "diffusion_model.")
_PATTERNS = (
    (re.compile(r"(.+)\.lora_A(?:\.default)?\.weight"), "A"),
    (re.compile(r"(.+)\.lora_B(?:\.default)?\.weight"), "B"),
    (re.compile(r"(.+)\.lora_down\.weight"), "A"),
    (re.compile(r"(.+)\.lora_up\.weight"), "B"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
)


def strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def classify(key: str) -> tuple[str, str]:
    """File key -> (module or base key, role in {'A', 'B', 'alpha', 'full'})."""
    k = strip_prefix(key)
    for pattern, role in _PATTERNS:
        m = pattern.fullmatch(k)
        if m:
            return m.group(1), role
    return k, "full"


@dataclass
class LoraPlan:
    """What merging this file does: file keys per target module, and full-tensor overrides."""

    pairs: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> role -> file key
    overrides: dict[str, str] = field(default_factory=dict)  # base key -> file key

    def ranks(self, tensors: Mapping[str, TensorInfo]) -> set[int]:
        return {tensors[p["A"]].shape[0] for p in self.pairs.values() if "A" in p}


def plan_lora(tensors: Mapping[str, TensorInfo], base: Mapping[str, tuple[int, ...]],
              report: ComponentReport, alpha: float) -> LoraPlan:
    """Check every LoRA tensor against the DiT's shapes; problems go to `report`."""
    plan = LoraPlan()
    for key in sorted(tensors):
        module, role = classify(key)
        if role == "full":
            if module not in base:
                report.unexpected.append(f"{key} (not a LoRA tensor and not a DiT key)")
            elif tensors[key].shape != tuple(base[module]):
                report.mismatched.append((key, tuple(base[module]), tensors[key].shape))
            else:
                plan.overrides[module] = key
            continue
        plan.pairs.setdefault(module, {})[role] = key
    for module, roles in sorted(plan.pairs.items()):
        weight = base.get(module + ".weight")
        if weight is None or len(weight) != 2:
            report.unexpected.append(f"{roles.get('A') or roles.get('B')} (no Linear {module} "
                                     "in the DiT)")
            continue
        if "A" not in roles or "B" not in roles:
            have = next(iter(roles.values()))
            lacking = "lora_B/lora_up" if "A" in roles else "lora_A/lora_down"
            report.errors.append(f"{have}: its pair {lacking} is missing")
            continue
        out_f, in_f = weight
        a, b = tensors[roles["A"]].shape, tensors[roles["B"]].shape
        r = a[0]
        if a != (r, in_f):
            report.mismatched.append((roles["A"], (r, in_f), a))
        if b != (out_f, r):
            report.mismatched.append((roles["B"], (out_f, r), b))
    if not report.mismatched and not report.errors:
        ranks = sorted(plan.ranks(tensors))
        report.notes.append(f"{len(plan.pairs)} target modules, rank {'/'.join(map(str, ranks))}, "
                            f"alpha {alpha:g} (scale {alpha / ranks[0]:g})" if ranks else
                            "no LoRA modules in the file")
        if plan.overrides:
            report.notes.append(f"{len(plan.overrides)} full tensors override base DiT weights")
    report.tensors = len(tensors)
    report.params = sum(t.numel for t in tensors.values())
    report.nbytes = sum(t.nbytes for t in tensors.values())
    return plan


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  alpha: float | torch.Tensor) -> torch.Tensor:
    """W + (alpha/r)·(B @ A), computed in float32 on W's device, returned in W's dtype."""
    r = lora_a.shape[0]
    alpha_f = float(alpha.float().item()) if isinstance(alpha, torch.Tensor) else float(alpha)
    delta = lora_b.to(weight.device, torch.float32) @ lora_a.to(weight.device, torch.float32)
    return (weight.float() + (alpha_f / r) * delta).to(weight.dtype)
