"""Reading checkpoint files without loading their weights: safetensors headers, .pth metadata.

Every failure is a `CheckpointError` that names the file and says what to do: a Git-LFS pointer
instead of the weights, a truncated download, a missing file, a corrupt header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import CheckpointError
from engine.progress import human_bytes

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor: shape and dtype (no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def require_file(path: Path, what: str) -> Path:
    """The path must be an existing regular file that is not a Git-LFS pointer."""
    if not path.exists():
        raise CheckpointError(f"{path}: missing ({what}). Download it into the checkpoint folder "
                              "(for example `huggingface-cli download Wan-AI/Wan2.2-S2V-14B "
                              "--local-dir <folder>`).")
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a file ({what}), found a directory")
    with path.open("rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise CheckpointError(
            f"{path}: is a Git-LFS pointer ({path.stat().st_size} bytes), not the {what}. The "
            "repository was cloned without LFS: run `git lfs install && git lfs pull` in the "
            "folder, or download with `huggingface-cli download`.")
    return path


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a .safetensors header and check the file holds all the data it announces."""
    require_file(path, "safetensors weights")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, not a safetensors file "
                                  "(truncated download?): download it again")
        (n,) = struct.unpack("<Q", raw_len)
        if n > 100_000_000 or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit in the {size}-byte "
                                  "file: the file is truncated or not safetensors; download it "
                                  "again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); download it "
                                  "again") from None
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has an unreadable header entry "
                                  f"{meta!r}") from None
        info = TensorInfo(shape, dtype, path)
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {key!r} announces {end - begin} bytes but "
                                  f"shape {shape} {meta['dtype']} needs {info.nbytes}")
        data_end = max(data_end, end)
        out[key] = info
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: the header announces {human_bytes(8 + n + data_end)} but the "
            f"file has {human_bytes(size)}. The download was interrupted: download it again.")
    return out


def read_pth_header(path: Path, what: str) -> dict[str, TensorInfo]:
    """Keys, shapes and dtypes of a flat state-dict .pth, read onto the meta device (no data)."""
    require_file(path, what)
    try:
        sd = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError variously
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({exc}). It is "
                              "probably truncated or corrupt: download it again.") from None
    return _flat_tensors(sd, path)


def load_pth_mmap(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Memory-map a flat state-dict .pth: tensors are paged in only when used."""
    require_file(path, what)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({exc}); "
                              "download it again.") from None
    _flat_tensors(sd, path)
    return sd


def _flat_tensors(sd: object, path: Path) -> dict[str, TensorInfo]:
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict), found "
                              f"{type(sd).__name__}")
    return {k: TensorInfo(tuple(v.shape), v.dtype, path) for k, v in sd.items()}


def read_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        with path.open() as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
