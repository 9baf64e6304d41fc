"""Decode user media with PyAV: a reference image to RGB, an audio file to 16 kHz mono float32.

Errors name the file and say which formats are accepted; nothing here imports torch.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

from engine.api import SAMPLE_RATE


class MediaError(ValueError):
    """A file or upload that cannot be decoded as what it should be."""


MAX_IMAGE_SIDE = 8192  # refused above this, before decoding
MAX_ASPECT = 4.0  # the video takes the picture's aspect: a 1:10 strip would make a 64x4224 video
FIT_SIDE = 2048  # larger images are scaled down to this on decode (the model uses <= 1280)
IMAGE_CODECS = {"mjpeg", "png", "webp", "bmp", "gif", "tiff", "jpeg2000", "jpegls", "ppm",
                "pgm", "pgmyuv", "pbm", "pam", "qoi", "targa"}


def read_image(source: str | Path | bytes, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """JPEG/PNG/WebP/BMP/... -> uint8 [H, W, 3] RGB: a still image, at most `max_side` pixels a
    side (checked from the header, before decoding) and at most 4:1.

    CPU-heavy for big pictures: call it off the event loop.
    """
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                     "r") as c:
            if not c.streams.video:
                raise MediaError(f"{name}: no image in it; send a JPEG, PNG or WebP picture")
            ctx = c.streams.video[0].codec_context
            if ctx.name not in IMAGE_CODECS:  # a video or anything else FFmpeg happens to open
                raise MediaError(f"{name}: a {ctx.name} stream is not a still image; send a "
                                 "JPEG, PNG or WebP picture")
            _check_side(name, ctx.width, ctx.height, max_side)  # from the header: not decoded
            frame = next(c.decode(video=0))
            _check_side(name, frame.width, frame.height, max_side)
            if max(frame.width, frame.height) > FIT_SIDE:
                scale = FIT_SIDE / max(frame.width, frame.height)
                frame = frame.reformat(width=max(1, round(frame.width * scale)),
                                       height=max(1, round(frame.height * scale)),
                                       format="rgb24", interpolation="AREA")
            return frame.to_ndarray(format="rgb24")
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{name}: no such file") from None
    except (av.error.FFmpegError, StopIteration, ValueError) as exc:
        raise MediaError(f"{name}: not a readable image ({exc}); send a JPEG, PNG or WebP "
                         "picture") from None


def _check_side(name: str, width: int, height: int, max_side: int) -> None:
    if max(width, height) > max_side:
        raise MediaError(f"{name}: {width}x{height} is too large (at most {max_side} "
                         "pixels a side); scale it down first")
    if width and height and max(width, height) > MAX_ASPECT * min(width, height):
        raise MediaError(f"{name}: {width}x{height} is too elongated for an avatar (at most "
                         f"{MAX_ASPECT:g}:1); crop it around the face first")


def read_audio(source: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio file PyAV reads -> float32 mono samples at `rate` Hz in [-1, 1]."""
    name = str(source)
    try:
        with av.open(name, "r") as c:
            if not c.streams.audio:
                raise MediaError(f"{name}: no audio stream; send a WAV, MP3, OGG or M4A file")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            parts: list[np.ndarray] = []
            for frame in c.decode(audio=0):
                parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            parts.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"{name}: no such file") from None
    except av.error.FFmpegError as exc:
        raise MediaError(f"{name}: not a readable audio file ({exc})") from None
    if not parts:
        raise MediaError(f"{name}: the audio stream is empty")
    return np.clip(np.concatenate(parts).astype(np.float32), -1.0, 1.0)
