"""`avatar render` writes an H.264 + AAC MP4 at 25 fps whose video lasts as long as the audio."""

from __future__ import annotations

from pathlib import Path

import av
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
