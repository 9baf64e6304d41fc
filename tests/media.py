"""Test media the tests make themselves, so that a clone of the repository tests itself.

- speech: espeak-ng (a Debian package that `.ci/install` installs) reading an English paragraph,
  for the tests that feed speech through wav2vec2, the browser's fake microphone and `render`;
- a synthetic voiced signal (pulse train through formant resonators, with syllables and pauses)
  where a test needs only speech-like loudness and spectrum, without any external program;
- faces drawn by the project (the preview engine's cartoon face), in landscape and portrait,
  and written as JPEG/PNG/WAV files through PyAV where a test needs a file on disk;
- for the face detector, shaded faces, synthetic "photos" and landscapes come from
  `engine.synthetic_face` (shared with `avatar preview-bench`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np

# About 22 s at 165 words per minute, with sentence pauses in between.
PARAGRAPH = (
    "Good morning, and thank you for joining the call. Today we will look at the new avatar "
    "server, which turns live speech into video, one block at a time. First, the microphone "
    "audio arrives in small chunks. Then the model draws twelve frames for every half second. "
    "Finally, the frames are encoded and sent back, in sync with the voice. Any questions?"
)


class MediaToolMissing(RuntimeError):
    pass


def espeak_wav(path: Path, text: str = PARAGRAPH, voice: str = "en-us", speed: int = 165) -> Path:
    """Synthesise `text` with espeak-ng into a 16-bit PCM WAV (22.05 kHz mono)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MediaToolMissing("espeak-ng is not installed; run .ci/install (it installs "
                               "Debian's espeak-ng) or apt-get install espeak-ng")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True, timeout=60)
    return path


def synthetic_voice(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A speech-like float32 signal in [-1, 1]: voiced syllables at ~4 Hz with pauses.

    A glottal pulse train (pitch gliding around 120 Hz) through three formant resonators whose
    frequencies change per syllable, under a syllable envelope; every few syllables a pause.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    pitch = 120.0 + 15.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(pitch / rate)
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    out = np.zeros(n)
    syllable = int(0.25 * rate)
    for start in range(0, n, syllable):
        seg = source[start:start + syllable]
        if rng.random() < 0.2:  # a pause
            continue
        f1, f2, f3 = rng.uniform(300, 800), rng.uniform(900, 2200), rng.uniform(2400, 3200)
        y = np.zeros(len(seg))
        for f, bw in ((f1, 80.0), (f2, 120.0), (f3, 160.0)):
            r = np.exp(-np.pi * bw / rate)
            a1, a2 = 2 * r * np.cos(2 * np.pi * f / rate), -r * r
            y1 = y2 = 0.0
            res = np.empty(len(seg))
            for i, x in enumerate(seg):
                y0 = x + a1 * y1 + a2 * y2
                res[i] = y0
                y2, y1 = y1, y0
            y += res / max(np.abs(res).max(), 1e-9)
        env = np.sin(np.pi * np.arange(len(seg)) / len(seg)) ** 2
        out[start:start + len(seg)] = y * env
    out /= max(np.abs(out).max(), 1e-9)
    return (0.5 * out).astype(np.float32)


def drawn_face(width: int, height: int) -> np.ndarray:
    """The project's own drawn face as a uint8 RGB picture of width x height."""
    from engine.preview import draw_default_face

    return draw_default_face(width, height)


def textured_face(width: int, height: int, noise: float = 20.0, seed: int = 5) -> np.ndarray:
    """The drawn face under a fixed grain: a picture that keeps video encoders at their nominal
    bitrates (a flat drawing lets them idle far below)."""
    rng = np.random.default_rng(seed)
    grain = rng.normal(0.0, noise, (height, width, 3))
    return np.clip(drawn_face(width, height) + grain, 0, 255).astype(np.uint8)


def png_base64(rgb: np.ndarray, tmp: Path) -> str:
    """`rgb` as a base64 PNG (the JSON form of a session's uploaded picture)."""
    import base64

    return base64.b64encode(write_image(tmp / "picture.png", rgb).read_bytes()).decode()


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """Write uint8 [H, W, 3] RGB as a JPEG (.jpg/.jpeg) or PNG (.png) through PyAV."""
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    h, w = rgb.shape[:2]
    with av.open(str(path), "w", format="image2") as c:
        stream = c.add_stream("mjpeg" if jpeg else "png", rate=1)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if jpeg else "rgb24"
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in stream.encode(frame.reformat(format=stream.pix_fmt)):
            c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1] as 16-bit PCM mono WAV (what browsers' fake capture reads)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()
    header = (b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVEfmt "
              + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
              + rate.to_bytes(4, "little") + (2 * rate).to_bytes(4, "little")
              + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
              + b"data" + len(pcm).to_bytes(4, "little"))
    path.write_bytes(header + pcm)
    return path
