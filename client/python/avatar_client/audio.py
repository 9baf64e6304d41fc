"""Audio helpers: decode any audio file to PCM s16le at a rate the server accepts, and cut PCM
into chunks. Decoding uses PyAV (imported only when a file is read)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

SAMPLE_RATES = (8000, 16000, 24000, 48000)


def read_pcm(path: str | Path, rate: int = 16000) -> bytes:
    """Any file FFmpeg reads (WAV, MP3, OGG, ...) -> mono PCM s16le at `rate` Hz."""
    if rate not in SAMPLE_RATES:
        raise ValueError(f"rate={rate}: the server accepts {SAMPLE_RATES}")
    import av

    parts: list[bytes] = []
    with av.open(str(path), "r") as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream in it")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(audio=0):
            parts.extend(bytes(f.planes[0])[: f.samples * 2] for f in resampler.resample(frame))
        parts.extend(bytes(f.planes[0])[: f.samples * 2] for f in resampler.resample(None))
    return b"".join(parts)


def chunks(pcm: bytes, rate: int, chunk_ms: float = 40.0, channels: int = 1) -> Iterator[bytes]:
    """`pcm` in pieces of `chunk_ms` (whole samples; the last one may be shorter)."""
    size = max(1, int(rate * chunk_ms / 1000)) * 2 * channels
    for i in range(0, len(pcm), size):
        yield pcm[i:i + size]
