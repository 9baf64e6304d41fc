"""`avatar render` writes an H.264 + AAC MP4 at 25 fps whose video lasts as long as the audio."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from stream.cli import main


@pytest.mark.parametrize("name", ["landscape", "portrait"])
def test_render_cli(tiny_ckpt_master: Path, examples: dict, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str], name: str) -> None:
    out = tmp_path / f"{name}.mp4"
    example = examples[name]
    rc = main(["render", "--ckpt", str(tiny_ckpt_master), "--image", str(example.image),
               "--audio", str(example.audio), "--out", str(out), "--size", "128*64",
               "--seed", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "rendering: block" in captured.err  # progress
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert video.average_rate == 25
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(out)) as c:
        audio_seconds = float(sum(f.samples for f in c.decode(audio=0))) / c.streams.audio[0].rate
    with av.open(str(example.audio)) as c:
        source_seconds = float(c.duration) / av.time_base
    video_seconds = frames / 25
    assert abs(video_seconds - source_seconds) <= 1 / 25
    assert abs(audio_seconds - source_seconds) <= 0.05  # AAC priming/padding only
    portrait = name == "portrait"
    assert (video.width < video.height) == portrait


def test_render_bad_inputs(tiny_ckpt_master: Path, examples: dict, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    image, audio = str(examples["portrait"].image), str(examples["portrait"].audio)
    args = ["render", "--ckpt", str(tiny_ckpt_master), "--out", str(tmp_path / "x.mp4")]
    rc = main([*args, "--image", audio, "--audio", audio])
    assert rc == 2 and "no image in it" in capsys.readouterr().err
    rc = main([*args, "--image", image, "--audio", str(tmp_path / "missing.wav")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main([*args[:1], "--ckpt", str(tmp_path), "--out", str(tmp_path / "x.mp4"),
               "--image", image, "--audio", audio])
    assert rc == 2 and "not a Wan2.2-S2V-14B checkpoint folder" in capsys.readouterr().err


def test_render_with_the_preview_moves_the_mouth_of_the_face_in_a_photo(
        examples: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No checkpoint: the preview engine. The face sits off-centre in a 400x720 "photo" (where
    the old fixed mouth place, 50% across and 68% down, is on the chest): what moves in the MP4
    is the mouth of that face."""
    from engine.preview import mouth_opening
    from engine.synthetic_face import portrait_photo
    from stream.media.decode import read_audio
    from tests.media import write_image

    photo, face = portrait_photo(400, 720, 0.36, 0.24, 0.3, seed=9)
    image = write_image(tmp_path / "photo.jpg", photo)
    out = tmp_path / "preview.mp4"
    rc = main(["render", "--image", str(image), "--audio", str(examples["portrait"].audio),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "avatar: animating the face found at" in err
    with av.open(str(out)) as c:
        luma = np.stack([f.to_ndarray(format="gray").astype(np.float32)
                         for f in c.decode(video=0)])
    assert luma.shape[1:] == (704, 384)
    # the photo is scaled by 704/720 to cover 384x704 and centre-cropped by 3 columns
    scale = 704 / 720
    mx, my = face.mouth[0] * scale - 3, face.mouth[1] * scale
    # pixels that visibly change and whose brightness follows the voice's loudness frame by
    # frame: the opening mouth, and nothing far from it
    audio = read_audio(examples["portrait"].audio)
    loud = np.array([mouth_opening(audio[640 * n:640 * (n + 1)]) for n in range(len(luma))])
    dev = luma - luma.mean(axis=0)
    corr = (dev * (loud - loud.mean())[:, None, None]).mean(axis=0) / (
        dev.std(axis=0) * loud.std() + 1e-6)
    ys, xs = np.nonzero((np.abs(corr) > 0.6) & (dev.std(axis=0) > 3.0))  # not codec noise
    assert len(xs) > 50
    assert abs(np.median(xs) - mx) < 0.05 * face.width * scale
    assert abs(np.median(ys) - my) < 0.1 * face.height * scale
    near = (np.abs(ys - my) < 0.25 * face.height * scale) & (np.abs(xs - mx) < 0.25 * face.width)
    assert near.mean() > 0.9
    fy, fx = round(0.68 * 704), round(0.5 * 384)  # the old fixed mouth place: now still
    assert luma[:, fy - 20:fy + 20, fx - 30:fx + 30].std(axis=0).max() < 2.0


def test_render_with_the_preview_says_when_a_picture_has_no_face(
        examples: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.synthetic_face import landscape
    from tests.media import write_image

    image = write_image(tmp_path / "hills.png", landscape(720, 400))
    rc = main(["render", "--image", str(image), "--audio", str(examples["portrait"].audio),
               "--out", str(tmp_path / "still.mp4")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "avatar: no face was found in the avatar picture" in err


def test_render_on_a_pipeline_gives_the_frames_of_one_process(
        tiny_ckpt_master: Path, examples: dict, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--layout 4+vae` (5 rank processes, gloo) and `--layout 1` decode to the same frames."""
    example = examples["portrait"]

    def frames(layout: str) -> np.ndarray:
        out = tmp_path / f"layout-{layout}.mp4"
        rc = main(["render", "--ckpt", str(tiny_ckpt_master), "--image", str(example.image),
                   "--audio", str(example.audio), "--out", str(out), "--size", "64*64",
                   "--seed", "3", "--layout", layout])
        assert rc == 0, capsys.readouterr().err
        with av.open(str(out)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    one, pipeline = frames("1"), frames("4+vae")
    assert one.shape == pipeline.shape and one.shape[0] > 24
    assert np.array_equal(one, pipeline)
