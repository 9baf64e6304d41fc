"""The load report: per component, what is missing, unexpected or mis-shaped, and why it matters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoint.files import TensorInfo
from engine.progress import human_bytes


@dataclass
class ComponentReport:
    name: str
    source: str = ""
    tensors: int = 0
    params: int = 0
    nbytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.errors)

    def compare(self, expected: Mapping[str, tuple[int, ...]],
                found: Mapping[str, TensorInfo], ignore: tuple[str, ...] = ()) -> None:
        """Strict key/shape comparison; keys starting with an `ignore` prefix are only noted."""
        ignored = sorted(k for k in found if k not in expected and k.startswith(ignore))
        if ignored:
            self.notes.append(f"{len(ignored)} tensors not used at inference ignored "
                              f"({', '.join(sorted({k.split('.')[0] for k in ignored}))})")
        self.missing += sorted(set(expected) - set(found))
        self.unexpected += sorted(k for k in set(found) - set(expected) if k not in ignored)
        for key in sorted(set(expected) & set(found)):
            if tuple(expected[key]) != found[key].shape:
                self.mismatched.append((key, tuple(expected[key]), found[key].shape))
        used = [found[k] for k in expected if k in found]
        self.tensors = len(used)
        self.params = sum(t.numel for t in used)
        self.nbytes = sum(t.nbytes for t in used)
        for t in used:
            name = str(t.dtype).removeprefix("torch.")
            self.dtypes[name] = self.dtypes.get(name, 0) + 1

    def format(self, max_keys: int = 12) -> str:
        status = "ok" if self.ok else "PROBLEMS"
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(self.dtypes.items()))
        head = f"[{status}] {self.name}"
        if self.tensors:
            head += f": {self.tensors} tensors, {self.params:,} params"
        if self.nbytes:
            head += f", {human_bytes(self.nbytes)}"
        if dtypes:
            head += f" ({dtypes})"
        lines = [head]
        if self.source:
            lines.append(f"    from {self.source}")

        def listing(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"    {title} ({len(items)}):")
            lines.extend(f"      {item}" for item in items[:max_keys])
            if len(items) > max_keys:
                lines.append(f"      ... and {len(items) - max_keys} more")

        listing("errors", self.errors)
        listing("missing keys", self.missing)
        listing("unexpected keys", self.unexpected)
        listing("mis-shaped keys", [f"{k}: expected {list(e)}, file has {list(f)}"
                                    for k, e, f in self.mismatched])
        listing("notes", self.notes)
        return "\n".join(lines)


@dataclass
class LoadReport:
    root: Path
    components: list[ComponentReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components)

    def component(self, name: str) -> ComponentReport:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def format(self, max_keys: int = 12) -> str:
        body = "\n".join(c.format(max_keys) for c in self.components)
        verdict = "checkpoint OK" if self.ok else "checkpoint has problems (see above)"
        return f"checkpoint {self.root}\n{body}\n{verdict}"
