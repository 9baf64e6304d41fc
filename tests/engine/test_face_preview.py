"""The preview animates the face in the picture: found where it is drawn, at any place and size;
the mouth opens on that face (differences in the lower third of its box, not at a fixed place);
nothing moves and a mark says so when the picture has no face; same audio, same frames."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import AudioChunk, SessionParams
from engine.face_animate import FaceRig, blink_amount
from engine.face_detect import FaceDetector
from engine.preview import NO_FACE_MARK, DrawnFace, PreviewEngine, PreviewSession, draw_label
from engine.synthetic_face import draw_face, landscape, portrait_photo, textured_background
from tests.media import synthetic_voice

# (frame width, height, face centre x, y as fractions, face width as a fraction of the width)
PLACES = [(704, 384, 0.30, 0.40, 0.15), (704, 384, 0.72, 0.50, 0.20),
          (384, 704, 0.50, 0.35, 0.30), (704, 384, 0.15, 0.30, 0.08),
          (256, 128, 0.60, 0.50, 0.15)]


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def engine() -> PreviewEngine:
    return PreviewEngine()


@pytest.fixture(scope="module")
def voice() -> np.ndarray:
    return synthetic_voice(4.8, seed=1)  # 120 frames, a blink at frames 83..86


def inside(box: tuple[int, int, int, int], point: tuple[float, float]) -> bool:
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def frames_of(session: PreviewSession, audio: np.ndarray, chunk: int = 0) -> np.ndarray:
    """All whole blocks of `audio` (pushed at once, or in `chunk`-sample pieces)."""
    step = chunk or len(audio)
    for start in range(0, len(audio), step):
        session.push_audio(AudioChunk(audio[start:start + step], start))
    blocks = []
    while session.ready():
        blocks.append(session.next_block().frames)
    return np.concatenate(blocks)


def lower_third(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    x, y, w, h = box
    return slice(y + 2 * h // 3, y + h), slice(x, x + w)


def share_in(diff: np.ndarray, region: tuple[slice, slice]) -> float:
    """Share of a [n, H, W] or [H, W] difference's total inside `region`."""
    total = diff.reshape(-1, *diff.shape[-2:]).sum(axis=0)
    return float(total[region].sum() / max(1, total.sum()))


# 1. detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "cx", "cy", "fw"), PLACES)
def test_the_drawn_face_is_found_where_it_is(detector, width, height, cx, cy, fw) -> None:
    img, face = portrait_photo(width, height, cx, cy, fw, seed=2)
    found = detector.find(img)
    assert found is not None, f"no face found at {face}"
    assert found.view == "frontal"
    x, y, w, h = found.box
    for point in (*face.eyes, face.mouth):
        assert inside(found.box, point), (found.box, point)
    assert 0.8 * face.width < w < 1.5 * face.width
    assert abs(x + w / 2 - face.cx) < 0.1 * face.width
    # the features the preview animates are on the drawn ones
    assert abs(found.mouth[0] - face.mouth[0]) < 0.05 * face.width + 1  # 1 px: the grid
    assert abs(found.mouth[1] - face.mouth[1]) < 0.05 * face.height + 1
    for eye, drawn in zip(sorted(found.eyes, key=lambda e: e.cx), face.eyes, strict=True):
        assert abs(eye.cx - drawn[0]) < 0.06 * face.width + 1
        assert abs(eye.cy - drawn[1]) < 0.05 * face.height + 1


def test_the_largest_of_two_faces_wins(detector) -> None:
    img = textured_background(704, 384, seed=3)
    draw_face(img, 150, 150, 60)
    big = draw_face(img, 480, 190, 140)
    found = detector.find(img)
    assert found is not None and inside(found.box, big.mouth) and inside(found.box, big.eyes[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_face_in_landscapes_and_textures(detector, seed) -> None:
    assert detector.find(landscape(704, 384, seed)) is None
    assert detector.find(textured_background(704, 384, seed)) is None


def test_a_face_turned_right_is_found_on_the_mirror_image_and_placed_back(detector,
                                                                         monkeypatch) -> None:
    """OpenCV's profile cascade knows faces turned left only. Its find on the mirror image
    (standing in here: no drawn profile passes the cascade) must come back mirrored, as a face
    turned right whose mouth and near eye lie towards the side it faces."""
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 230  # bright on the right: bright on the left once mirrored

    def largest(name: str, gray: np.ndarray) -> tuple[int, int, int, int] | None:
        mirrored = gray[0, 0] > 128
        return (40, 50, 100, 100) if name == "profileface" and mirrored else None

    monkeypatch.setattr(detector, "_largest", largest)
    found = detector.find(img)
    assert found is not None and found.view == "profile-right"
    assert found.box == (260, 50, 100, 100)
    assert 300 < found.mouth[0] < 340 and 100 < found.mouth[1] < 130
    assert len(found.eyes) == 1 and 300 < found.eyes[0].cx < 330


# 2. animation on the face --------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "cx", "cy", "fw"), PLACES)
def test_speech_moves_the_lower_third_of_the_face_box(engine, voice, width, height, cx, cy,
                                                      fw) -> None:
    img, face = portrait_photo(width, height, cx, cy, fw, seed=2)
    size = f"{width}*{height}"
    talking = engine.open_session(SessionParams(image=img, size=size))
    box = tuple(talking.info["face"]["box"])
    talk = frames_of(talking, voice).astype(np.int16)
    mute = frames_of(engine.open_session(SessionParams(image=img, size=size)),
                     np.zeros_like(voice)).astype(np.int16)
    # what the audio changes (same frame numbers, so the same idle motion): the lower face
    by_audio = np.abs(talk - mute).sum(axis=3)
    assert by_audio.sum() > 0
    assert share_in(by_audio, lower_third(box)) >= 0.9
    # on this face's mouth and jaw, not at a fixed place of the frame: from under the nose
    # to just past the chin, centred on the mouth
    ys, xs = np.nonzero(by_audio.sum(axis=0))
    assert abs(xs.mean() - face.mouth[0]) < 0.05 * face.width
    assert face.cy + 0.1 * face.height < ys.min() < face.mouth[1] < ys.max()
    assert ys.max() < face.cy + 0.65 * face.height
    # what a viewer sees change from frame to frame, idle motion included (differences above 4
    # of 255: sub-pixel sway flickers many pixels by a level or two, below what H.264 keeps)
    step = np.abs(np.diff(talk, axis=0)).max(axis=3)
    assert share_in(np.where(step > 4, step, 0), lower_third(box)) >= 0.75
    # and the mouth really opens: the gap is dark when loud
    loud = int(np.argmax(by_audio.sum(axis=(1, 2))))
    mx, my = round(face.mouth[0]), round(face.mouth[1])
    assert talk[loud, my - 2:my + 6, mx - 2:mx + 3].max(axis=2).min() < 90


def test_the_animated_region_moves_with_the_face(engine, voice) -> None:
    centres = []
    for cx in (0.25, 0.5, 0.75):
        img, face = portrait_photo(704, 384, cx, 0.42, 0.15, seed=5)
        talk = frames_of(engine.open_session(SessionParams(image=img)), voice[:16000])
        mute = frames_of(engine.open_session(SessionParams(image=img)),
                         np.zeros(16000, np.float32))
        diff = np.abs(talk.astype(np.int16) - mute).sum(axis=(0, 3))
        ys, xs = np.nonzero(diff)
        centres.append(xs.mean() - face.mouth[0])
        assert xs.min() > face.box[0] and xs.max() < face.box[2]
    assert max(np.abs(centres)) < 0.05 * 0.15 * 704  # each time on the mouth it was drawn with


def test_silence_still_looks_alive(engine) -> None:
    """Blinks and a slight sway with no audio; nothing outside the head region changes."""
    img, face = portrait_photo(704, 384, 0.4, 0.4, 0.15, seed=6)
    session = engine.open_session(SessionParams(image=img))
    frames = frames_of(session, np.zeros(16000 * 4, np.float32)).astype(np.int16)
    rig = session.animator
    assert isinstance(rig, FaceRig)
    outside = np.ones(frames.shape[1:3], bool)
    outside[rig.y0:rig.y1, rig.x0:rig.x1] = False
    assert (frames[:, outside] == frames[0, outside]).all()
    sway = np.abs(frames[40] - frames[0]).max(axis=2)
    assert sway.max() > 8 and (sway > 8).mean() < 0.02  # it moves, but only a little
    open_eyes, shut = 80, next(n for n in range(100) if blink_amount(n) == 1.0)
    (lx, ly), _ = face.eyes
    ex, ey = round(lx), round(ly)
    eye = (slice(ey - 2, ey + 3), slice(ex - 3, ex + 4))
    # the pupil (dark) is covered by the lid (skin) during a blink
    assert frames[open_eyes][eye].sum(axis=2).min() < 200
    assert frames[shut][eye].sum(axis=2).mean() > frames[open_eyes][eye].sum(axis=2).mean() + 60


# 3. a picture without a face; determinism; the drawn face ------------------------------------


def test_a_picture_without_a_face_is_shown_still_and_marked(engine, voice) -> None:
    img = landscape(704, 384, seed=1)
    session = engine.open_session(SessionParams(image=img))
    assert session.info["face"] == {"found": False}
    assert session.info["animation"] == [] and "no face" in str(session.info["note"])
    frames = frames_of(session, voice[:16000 * 2])
    assert (frames == frames[0]).all()  # nothing moves, loud or quiet
    marked = session.base.copy()
    marked[:] = img  # the same size: the landscape fills the 704x384 frame exactly
    draw_label(marked, "PREVIEW", NO_FACE_MARK)
    assert (frames[0] == marked).all()


def test_same_audio_gives_the_same_frames_however_it_arrives(engine, voice) -> None:
    img, _ = portrait_photo(704, 384, 0.35, 0.4, 0.15, seed=7)
    whole = frames_of(engine.open_session(SessionParams(image=img)), voice[:16000 * 3])
    chunked = frames_of(engine.open_session(SessionParams(image=img)), voice[:16000 * 3], 1600)
    assert whole.shape[0] == 72 and (whole == chunked).all()


def test_the_preview_mark_stays_on_top_of_a_face_in_the_corner(engine, voice) -> None:
    img, _ = portrait_photo(704, 384, 0.12, 0.28, 0.2, seed=8)
    session = engine.open_session(SessionParams(image=img))
    assert session.info["face"]["found"]
    w, h = session.label
    frames = frames_of(session, voice[:16000])
    assert w > 0 and (frames[:, :h, :w] == session.base[:h, :w]).all()


def test_the_drawn_default_face_is_described_and_unchanged(engine) -> None:
    session = engine.open_session(SessionParams(size="256*128"))
    assert session.info["source"] == "drawn" and session.info["face"]["found"]
    assert isinstance(session.animator, DrawnFace)
    x, y, w, h = session.info["face"]["box"]
    assert x + w / 2 == pytest.approx(128, abs=1) and 0 < y < 64 and h > w


def test_preview_bench_prints_its_figures(capsys) -> None:
    """`avatar preview-bench` runs and reports every case (the speed itself is not asserted)."""
    import json

    from stream.cli import main

    assert main(["preview-bench", "--seconds", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in results] == ["photo", "close-up photo", "drawn face",
                                            "no face (still)"]
    assert results[0]["face_box"] and results[1]["face_box"] and results[3]["face_box"] is None
    assert all(r["frame_size"] == "704x384" and r["realtime_factor"] > 0 for r in results)


def test_the_face_is_found_once_per_avatar() -> None:
    detector = FaceDetector()
    photo, _ = portrait_photo(704, 384, 0.3, 0.45, 0.15, seed=1)
    calls = []
    search = detector._search
    detector._search = lambda rgb: calls.append(1) or search(rgb)  # type: ignore[method-assign]
    first = detector.find(photo)
    assert first is not None
    assert detector.find(photo.copy()) == first and len(calls) == 1  # same pixels: remembered
    other, _ = portrait_photo(704, 384, 0.6, 0.45, 0.15, seed=1)
    assert detector.find(other) != first and len(calls) == 2
