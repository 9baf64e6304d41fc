"""The preview engine: the mouth follows the loudness of each frame's own audio."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import AudioChunk, SessionParams
from engine.preview import MOUTH_COLOR, PreviewEngine, mouth_box, mouth_opening


def tone(seconds: float, amp: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (amp * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def mouth_pixels(frame: np.ndarray) -> int:
    x0, y0, x1, y1 = mouth_box(frame.shape[1], frame.shape[0])
    return int((frame[y0:y1, x0:x1] == MOUTH_COLOR).all(axis=2).sum())


def test_opening_maps_loudness() -> None:
    assert mouth_opening(np.zeros(640, np.float32)) == 0.0
    assert mouth_opening(tone(0.04, 0.5)) == 1.0
    quiet, loud = mouth_opening(tone(0.04, 0.01)), mouth_opening(tone(0.04, 0.1))
    assert 0 < quiet < loud < 1


def test_mouth_follows_each_frames_audio() -> None:
    session = PreviewEngine().open_session(SessionParams(size="256*128"))
    assert session.size == (256, 128)
    audio = np.concatenate([tone(0.2, 0.0), tone(0.24, 0.5), tone(0.04, 0.0)])  # 12 frames
    session.push_audio(AudioChunk(audio, 0))
    assert session.ready()
    block = session.next_block()
    sizes = [mouth_pixels(f) for f in block.frames]
    assert sizes[:5] == [sizes[0]] * 5 and max(sizes[:5]) < min(sizes[5:11])
    assert sizes[11] == sizes[0]
    assert block.first_frame == 0 and block.frames.shape == (12, 128, 256, 3)


def test_silence_and_deadline_padding() -> None:
    session = PreviewEngine().open_session(SessionParams(size="256*128"))
    assert not session.ready()
    with pytest.raises(RuntimeError):
        session.next_block()
    block = session.next_block(pad_silence=True)
    assert block.silent_samples == 7680 and block.first_frame == 0
    session.seek(10)
    assert session.next_block(pad_silence=True).first_frame == 120


def test_uploaded_image_and_label() -> None:
    image = np.full((300, 200, 3), 200, np.uint8)  # portrait
    session = PreviewEngine().open_session(SessionParams(image=image, size="256*256"))
    assert session.size[0] < session.size[1]
    frame = session.next_block(pad_silence=True).frames[0]
    assert (frame[:4, :4] < 100).all()  # the PREVIEW mark's dark box in the corner
    assert (frame[frame.shape[0] // 3, 5] == 200).all()  # the image itself


def test_capacity_from_config() -> None:
    from engine.config import EngineConfig

    assert PreviewEngine().max_sessions == 8
    assert PreviewEngine(EngineConfig(max_sessions=3)).max_sessions == 3
