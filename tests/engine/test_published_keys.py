"""The models at their full published configs, built on the meta device, have exactly the key and
shape lists of the released files (tests/data/keys/, whose README says where they come from)."""

from __future__ import annotations

import pytest
import torch

from engine.models import dit, text, vae
from tests.conftest import DATA

KEYS = DATA / "keys"


def read_tsv(name: str) -> dict[str, tuple[int, ...]]:
    path = KEYS / name
    if not path.exists():
        pytest.fail(f"reference key list {path} is missing")
    out = {}
    for line in path.read_text().splitlines():
        key, shape, *_ = line.split("\t")
        out[key] = tuple(int(d) for d in shape.split("x"))
    return out


def test_dit_14b_matches_published_keys() -> None:
    expected = read_tsv("dit-14b.tsv")
    got = dit.expected_state_dict_shapes(dit.DiTConfig())
    assert len(expected) == 1260
    assert got == expected


def test_dit_14b_param_count() -> None:
    got = dit.expected_state_dict_shapes(dit.DiTConfig())
    total = 0
    for shape in got.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    assert total == 16_295_755_609


def test_vae_matches_published_keys() -> None:
    assert vae.expected_state_dict_shapes(vae.VAEConfig()) == read_tsv("vae-wan2.1.tsv")


def test_umt5_matches_published_keys() -> None:
    assert text.expected_state_dict_shapes(text.UMT5Dims()) == read_tsv("umt5-xxl-encoder.tsv")


def test_umt5_key_map_matches_published_rename() -> None:
    rows = [line.split("\t") for line in (KEYS / "umt5-to-transformers.tsv").read_text().splitlines()]
    assert len(rows) == 242
    for wan_key, hf_key, _ in rows:
        assert text.wan_to_hf_key(wan_key) == hf_key
        assert text.hf_to_wan_key(hf_key) == wan_key


def test_lora_targets_match_published_list() -> None:
    rows = [line.split("\t") for line in (KEYS / "lora-targets.txt").read_text().splitlines()]
    with torch.device("meta"):
        model = dit.WanS2VDiT(dit.DiTConfig())
    targets = dit.lora_target_modules(model)
    assert sorted(targets) == sorted(r[0] for r in rows)
    for name, in_f, out_f in rows:
        lin = model.get_submodule(name)
        assert (lin.in_features, lin.out_features) == (int(in_f), int(out_f))
