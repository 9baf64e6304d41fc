"""The per-session streaming generator on the tiny checkpoint (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.api import SessionParams
from engine.errors import InputError
from engine.generator import StreamGenerator


def run_blocks(models, image, audio, blocks: int, **params) -> list[np.ndarray]:
    gen = StreamGenerator(models, SessionParams(image=image, size="64*64", **params))
    gen.push_audio(audio)
    return [gen.next_block().frames for _ in range(blocks)]


def test_blocks_are_12_uint8_frames_with_consecutive_indices(tiny_models, example_image,
                                                             example_audio) -> None:
    gen = StreamGenerator(tiny_models, SessionParams(image=example_image, size="128*64"))
    gen.push_audio(example_audio[:16000 * 2])
    blocks = [gen.next_block() for _ in range(3)]
    assert [b.first_frame for b in blocks] == [0, 12, 24]
    for b in blocks:
        assert b.frames.shape == (12, 64, 128, 3) and b.frames.dtype == np.uint8
        assert b.size == (128, 64) and b.silent_samples == 0
        assert b.timings.total >= b.timings.denoise > 0
    assert (gen.width, gen.height) == (128, 64)


def test_same_seed_and_input_give_identical_frames(tiny_models, example_image,
                                                   example_audio) -> None:
    audio = example_audio[:16000 * 3]
    a = run_blocks(tiny_models, example_image, audio, 5, seed=3)
    b = run_blocks(tiny_models, example_image, audio, 5, seed=3)
    c = run_blocks(tiny_models, example_image, audio, 5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[4], c[4])


def test_missing_audio_is_generated_as_silence_after_the_deadline(tiny_models,
                                                                  example_image) -> None:
    gen = StreamGenerator(tiny_models, SessionParams(image=example_image, size="64*64"))
    assert not gen.ready()
    with pytest.raises(RuntimeError, match="has not arrived"):
        gen.next_block()
    block = gen.next_block(pad_silence=True)
    assert block.silent_samples > 0 and block.frames.shape[0] == 12
    # audio that arrives late for the padded span does not shift the timeline
    gen.push_audio(np.zeros(16000, np.float32), at=0)
    gen.push_audio(np.zeros(16000, np.float32))  # contiguous after the first second
    assert gen.audio.buffer.end == 32000
    assert gen.ready() and gen.next_block().first_frame == 12


def test_sink_is_refreshed_from_the_first_generated_frame(tiny_models, example_image,
                                                          example_audio) -> None:
    gen = StreamGenerator(tiny_models, SessionParams(image=example_image, size="64*64"))
    gen.push_audio(example_audio[:16000 * 3])
    original = gen.cond.sink
    for _ in range(4):
        gen.next_block()
    assert gen.cond.sink is original
    gen.next_block()  # block 4: the sink is re-anchored before it is denoised
    assert gen.cond.sink is not original
    assert all(s.cond is gen.cond for s in gen.stages)
    assert not torch.equal(gen.cond.sink.keys[0], original.keys[0])


def test_portrait_image_gives_portrait_video(tiny_models, examples) -> None:
    from stream.media.decode import read_image

    image = read_image(examples["portrait"].image)  # 400x720
    gen = StreamGenerator(tiny_models, SessionParams(image=image, size="64*128"))
    assert (gen.width, gen.height) == (64, 128)


@pytest.mark.parametrize("image, message", [
    (None, "needs a reference image"),
    (np.zeros((8, 8, 3), np.uint8), "too small"),
    (np.zeros((64, 64), np.float32), "uint8"),
])
def test_bad_images_are_refused(tiny_models, image, message) -> None:
    with pytest.raises(InputError, match=message):
        StreamGenerator(tiny_models, SessionParams(image=image, size="64*64"))


def test_bad_size_is_refused(tiny_models, example_image) -> None:
    with pytest.raises(InputError, match="WIDTH\\*HEIGHT"):
        StreamGenerator(tiny_models, SessionParams(image=example_image, size="big"))


@pytest.mark.slow
def test_sixteen_minutes_cross_the_rope_table_in_flat_memory(tiny_models, example_image,
                                                             example_audio) -> None:
    """2,000 blocks (16 min of media) run past Wan's 1024-row RoPE table; state bytes stay
    constant and the process does not grow after warm-up."""

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 1e6

    gen = StreamGenerator(tiny_models, SessionParams(image=example_image, size="64*64", seed=5))
    pos, chunk = 0, 1600
    state, rss = {}, {}
    for b in range(2000):
        while not gen.ready():
            start = pos % len(example_audio)
            part = example_audio[start:start + chunk]
            gen.push_audio(part)
            pos += len(part)
        block = gen.next_block()
        assert block.first_frame == 12 * b
        if b in (100, 1999):
            state[b], rss[b] = gen.state_nbytes(), rss_mb()
    assert gen.stages[0].kv.written == 6000  # latent frames: past 1024 (and wrapping the ring)
    assert abs(state[1999] - state[100]) <= 4 * chunk * 4  # audio buffer jitter only
    assert rss[1999] - rss[100] < 10.0, rss
