"""Where each component lives in a `Wan-AI/Wan2.2-S2V-14B` folder (plus the Live-Avatar LoRA).

    config.json                                      DiT hyper-parameters (diffusers JSON)
    diffusion_pytorch_model-0000N-of-0000M.safetensors + ...safetensors.index.json   DiT
    Wan2.1_VAE.pth                                   VAE state dict
    models_t5_umt5-xxl-enc-bf16.pth                  umT5-XXL encoder state dict
    google/umt5-xxl/                                 tokenizer
    wav2vec2-large-xlsr-53-english/                  wav2vec2 (CTC) folder
    LiveAvatar/liveavatar.safetensors                LoRA (also looked for beside the folder)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint.files import TensorInfo, read_json, read_safetensors_header
from engine.errors import CheckpointError

CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
VAE = "Wan2.1_VAE.pth"
T5 = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER = "google/umt5-xxl"
WAV2VEC = "wav2vec2-large-xlsr-53-english"
LORA = "LiveAvatar/liveavatar.safetensors"


@dataclass(frozen=True)
class CheckpointLayout:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> CheckpointLayout:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory. Point --ckpt at the folder that holds "
                                  f"{CONFIG}, the DiT shards, {VAE} and {T5}.")
        if not (path / CONFIG).exists() and not (path / DIT_INDEX).exists():
            hint = ""
            nested = sorted(p.parent for p in path.glob(f"*/{CONFIG}"))
            if nested:
                hint = f" Did you mean {nested[0]}?"
            raise CheckpointError(f"{path}: no {CONFIG} or {DIT_INDEX} here; this is not a "
                                  f"Wan2.2-S2V-14B checkpoint folder.{hint}")
        return cls(path)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def vae(self) -> Path:
        return self.root / VAE

    @property
    def t5(self) -> Path:
        return self.root / T5

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def wav2vec(self) -> Path:
        return self.root / WAV2VEC

    def lora(self, explicit: str | Path | None = None) -> Path | None:
        """The LoRA file: `explicit` if given, else LiveAvatar/ inside or beside the folder."""
        if explicit is not None:
            return Path(explicit).expanduser()
        for candidate in (self.root / LORA, self.root.parent / LORA):
            if candidate.exists():
                return candidate
        return None

    def dit_shards(self) -> dict[str, Path]:
        """Key -> shard path from the index, or every key of the single-file fallback."""
        index = self.root / DIT_INDEX
        if index.exists():
            data = read_json(index, "DiT shard index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: has no 'weight_map'; download it again")
            return {k: self.root / v for k, v in weight_map.items()}
        single = self.root / DIT_SINGLE
        if single.exists():
            return {k: single for k in read_safetensors_header(single)}
        raise CheckpointError(f"{self.root}: neither {DIT_INDEX} nor {DIT_SINGLE} exists; the DiT "
                              "weights are missing")

    def dit_tensors(self) -> tuple[dict[str, TensorInfo], list[str], set[str]]:
        """Headers of every DiT tensor across the shards, problems, and keys of broken shards.

        Problems (a missing or unreadable shard, a key in the index but not in its shard, a key
        in a shard but not in the index) are messages naming the file and the key.
        """
        key_to_file = self.dit_shards()
        problems: list[str] = []
        broken: set[str] = set()
        tensors: dict[str, TensorInfo] = {}
        by_file: dict[Path, list[str]] = {}
        for key, path in key_to_file.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in sorted(by_file.items()):
            if not path.exists():
                problems.append(f"{path}: missing shard (the index maps {len(keys)} tensors to it, "
                                f"e.g. {keys[0]}); download it again")
                broken.update(keys)
                continue
            try:
                header = read_safetensors_header(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                broken.update(keys)
                continue
            for key in keys:
                if key in header:
                    tensors[key] = header[key]
                else:
                    problems.append(f"{path}: tensor {key} is listed in the index but not in "
                                    "this shard")
            for key in sorted(set(header) - set(keys)):
                if key_to_file.get(key) is None:
                    problems.append(f"{path}: tensor {key} is in this shard but not in the index")
        return tensors, problems, broken
