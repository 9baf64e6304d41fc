"""The per-avatar cache: a second session with the same image, size and prompt gives identical
frames without running the VAE encoder, the text encoder, the prefill or the decoder warm-up
again; the cache is bounded and evicts the least recently used avatar."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from engine.api import AudioChunk, SessionParams
from engine.avatar_cache import AvatarCache, AvatarKey, AvatarState
from engine.config import EngineConfig
from engine.models.dit import SinkKV, TextKV
from engine.wan_engine import WanEngine


def counting(calls: Counter, name: str, fn):  # noqa: ANN001, ANN201
    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("overlap", [False, True])
def test_second_session_with_the_same_avatar_skips_the_set_up(
        tiny_models, example_image, example_audio, monkeypatch, overlap: bool) -> None:  # noqa: ANN001
    calls: Counter = Counter()
    for obj, name in ((tiny_models.vae, "encode"), (tiny_models.vae, "decode"),
                      (tiny_models.dit, "prefill_sink"), (tiny_models.text, "encode")):
        monkeypatch.setattr(obj, name, counting(calls, f"{type(obj).__name__}.{name}",
                                                getattr(obj, name)))
    engine = WanEngine(tiny_models, EngineConfig(avatar_cache_mb=64, vae_overlap=overlap))

    def session_frames(seed: int = 1) -> tuple[list[np.ndarray], bool]:
        s = engine.open_session(SessionParams(image=example_image, size="64*64", seed=seed))
        s.push_audio(AudioChunk(example_audio[:16000 * 3], 0))
        frames = [s.next_block().frames for _ in range(5)]  # block 4 refreshes the sink
        hit = s.generator.avatar_cache_hit
        s.close()
        return frames, hit

    try:
        first, hit = session_frames()
        assert not hit
        after_first = Counter(calls)
        second, hit = session_frames()
        assert hit
        again = {k: calls[k] - after_first[k] for k in calls}
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
        assert again["WanVAE.encode"] == 0 and again["TextEncoder.encode"] == 0
        # the sink refresh at block 4 is the session's own prefill; the set-up one is skipped
        assert after_first["WanS2VDiT.prefill_sink"] == 2 and again["WanS2VDiT.prefill_sink"] == 1
        # 5 blocks x 3 latent frames, and no 7-latent decoder warm-up
        assert after_first["WanVAE.decode"] == 15 + 7 and again["WanVAE.decode"] == 15
        # another prompt is another avatar, but its image latents are recomputed (key = all)
        s = engine.open_session(SessionParams(image=example_image, size="64*64", prompt="x"))
        assert not s.generator.avatar_cache_hit
        s.close()
        assert engine.speed.avatars is not None and engine.speed.avatars.hits == 1
    finally:
        engine.close()


def state(mb: float) -> AvatarState:
    n = int(mb * (1 << 20)) // 8  # float32 keys + values
    sink = SinkKV(torch.zeros(n), torch.zeros(n), 1, np.zeros((1, 3), np.int64))
    return AvatarState(torch.zeros(1), torch.zeros(1), TextKV(), sink)


def test_the_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = AvatarCache(max_bytes=10 << 20)
    keys = [AvatarKey.of(np.full((4, 4, 3), i, np.uint8), 64, 64, "p") for i in range(3)]
    assert len(set(keys)) == 3
    cache.put(keys[0], state(4))
    cache.put(keys[1], state(4))
    assert cache.get(keys[0]) is not None  # 0 is now the most recent
    cache.put(keys[2], state(4))  # over 10 MB: 1 goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert cache.get(keys[2]) is not None and cache.evictions == 1
    assert cache.nbytes <= 10 << 20
    cache.put(AvatarKey("big", 1, 1, ""), state(11))  # larger than the budget: not kept
    assert cache.get(AvatarKey("big", 1, 1, "")) is None and len(cache) == 2


def test_keys_depend_on_pixels_size_and_prompt() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    other = img.copy()
    other[0, 0, 0] = 1
    base = AvatarKey.of(img, 64, 64, "p")
    assert AvatarKey.of(img.copy(), 64, 64, "p") == base
    assert AvatarKey.of(other, 64, 64, "p") != base
    assert AvatarKey.of(img, 64, 128, "p") != base
    assert AvatarKey.of(img, 64, 64, "q") != base
    assert AvatarKey.of(img.reshape(4, 16, 3), 64, 64, "p") != base
