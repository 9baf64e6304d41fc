"""`avatar check-checkpoint`: a good tiny checkpoint passes; each kind of damage is named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from stream.cli import main
from tests.conftest import REPO

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def run_check(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    rc = main(["check-checkpoint", str(path), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("diffusion_pytorch_model-*.safetensors"))


def rewrite_shard(shard: Path, edit) -> None:
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_console_script_exit_codes(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("avatar")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stream.cli"]
    ckpt = tmp_path / "t"
    made = subprocess.run([*cmd, "make-tiny-checkpoint", str(ckpt)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    ok = subprocess.run([*cmd, "check-checkpoint", str(ckpt)], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "checkpoint OK" in ok.stdout
    shards(ckpt)[0].unlink()
    bad = subprocess.run([*cmd, "check-checkpoint", str(ckpt)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0


def test_good_checkpoint_passes(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc == 0, out
    for component in ("dit", "lora", "vae", "t5", "tokenizer", "wav2vec2"):
        assert f"[ok] {component}" in out


def test_deleted_shard_is_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = shards(tiny_ckpt)[1]
    victim.unlink()
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert victim.name in out and "missing shard" in out


def test_truncated_shard_is_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = shards(tiny_ckpt)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert victim.name in out and "truncated" in out


def test_lfs_pointer_shard_is_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = shards(tiny_ckpt)[1]
    victim.write_text("version https://git-lfs.github.com/spec/v1\n"
                      "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                      "size 9968245696\n")
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert victim.name in out and "Git-LFS pointer" in out and "git lfs pull" in out


def test_renamed_key_is_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = shards(tiny_ckpt)[0]
    with safe_open(str(shard), "pt") as f:
        key = sorted(f.keys())[3]
    rewrite_shard(shard, lambda t: {(k + "_renamed" if k == key else k): v for k, v in t.items()})
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert key in out and key + "_renamed" in out


def test_renamed_key_with_consistent_index(tiny_ckpt: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    key = "blocks.1.self_attn.q.weight"
    index = json.loads((tiny_ckpt / INDEX).read_text())
    shard = tiny_ckpt / index["weight_map"][key]
    rewrite_shard(shard, lambda t: {("blocks.1.self_attn.qq.weight" if k == key else k): v
                                    for k, v in t.items()})
    index["weight_map"]["blocks.1.self_attn.qq.weight"] = index["weight_map"].pop(key)
    (tiny_ckpt / INDEX).write_text(json.dumps(index))
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert "missing keys" in out and key in out
    assert "unexpected keys" in out and "blocks.1.self_attn.qq.weight" in out


def test_changed_shape_is_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "blocks.2.ffn.0.weight"
    index = json.loads((tiny_ckpt / INDEX).read_text())
    shard = tiny_ckpt / index["weight_map"][key]
    rewrite_shard(shard, lambda t: {k: (v[:-1].clone() if k == key else v) for k, v in t.items()})
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert f"{key}: expected [128, 64], file has [127, 64]" in out


def test_text_width_mismatch_between_components(tiny_ckpt: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # text_dim is read from text_embedding.0.weight; it must then fit the umT5 width
    key = "text_embedding.0.weight"
    index = json.loads((tiny_ckpt / INDEX).read_text())
    rewrite_shard(tiny_ckpt / index["weight_map"][key],
                  lambda t: {k: (v[:, :16].clone() if k == key else v) for k, v in t.items()})
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert key in out and "outputs 32" in out


def test_truncated_vae_and_lfs_t5(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vae = tiny_ckpt / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    t5 = tiny_ckpt / "models_t5_umt5-xxl-enc-bf16.pth"
    t5.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 11361920418\n")
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert "Wan2.1_VAE.pth" in out and "corrupt" in out
    assert "models_t5_umt5-xxl-enc-bf16.pth" in out and "Git-LFS pointer" in out


def test_missing_components(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny_ckpt / "google")
    shutil.rmtree(tiny_ckpt / "wav2vec2-large-xlsr-53-english")
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert "missing tokenizer folder" in out and "missing wav2vec2 folder" in out


def test_wrong_folder(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_check(tmp_path, capsys)
    assert rc == 2
    assert "not a Wan2.2-S2V-14B checkpoint folder" in out and str(tiny_ckpt) in out
    rc, out = run_check(tmp_path / "nope", capsys)
    assert rc == 2 and "not a directory" in out


def test_bad_lora_shapes_are_named(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lora = tiny_ckpt / "LiveAvatar" / "liveavatar.safetensors"
    key = "base_model.model.blocks.0.ffn.2.lora_A.default.weight"
    with safe_open(str(lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key][:, :-1].clone()
    del tensors["base_model.model.blocks.1.cross_attn.v.lora_B.default.weight"]
    save_file(tensors, str(lora))
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc != 0
    assert key in out
    assert "blocks.1.cross_attn.v.lora_A.default.weight: its pair lora_B/lora_up is missing" in out


def test_explicit_missing_lora(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_check(tiny_ckpt, capsys, "--lora", str(tiny_ckpt / "nope.safetensors"))
    assert rc != 0 and "nope.safetensors" in out and "missing" in out


def test_lora_beside_the_folder_is_found(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # LiveAvatar's own layout: ckpt/Wan2.2-S2V-14B and ckpt/LiveAvatar/liveavatar.safetensors
    shutil.move(tiny_ckpt / "LiveAvatar", tiny_ckpt.parent / "LiveAvatar")
    rc, out = run_check(tiny_ckpt, capsys)
    assert rc == 0, out
    assert str(tiny_ckpt.parent / "LiveAvatar" / "liveavatar.safetensors") in out
