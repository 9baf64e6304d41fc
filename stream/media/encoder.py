"""Encoders, each run on the dedicated encoding executor (never on the event loop): video as
H.264 (libx264, ultrafast/zerolatency by default), VP8 (libvpx, realtime) or JPEG, each scaling
to its own size on the way in; audio as Opus (WebRTC) or AAC-LC in ADTS frames (MPEG-TS).

One encoder serves every viewer of a session's output variant (stream/media/variant.py), so its
packets go to aiortc pre-encoded (`av.Packet`). aiortc's own keyframe requests do not reach a
pre-encoded source; the variant asks for keyframes itself (`keyframe=True`): on a viewer's PLI or
FIR, a consumer joining, and periodically (`keyframe_interval_s`, parameter sets repeated on
each). aiortc's own H.264 encoder is libx264 at its default preset (9-14 ms a frame on these
CPUs); ultrafast/zerolatency costs 1-2 ms at 704x384, VP8 realtime about 2.5 ms.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import NamedTuple, Protocol

import av
import numpy as np
from av.video.frame import PictureType

from engine.api import FPS
from stream.config import MediaConfig
from stream.media.timeline import PLAYOUT_RATE

VIDEO_TIME_BASE = Fraction(1, FPS)
AUDIO_TIME_BASE = Fraction(1, PLAYOUT_RATE)
OPUS_FRAME_MS = 40  # one Opus packet per 40 ms pacer tick (WebRTC decoders take any length)
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000,
                    11025, 8000, 7350)  # ADTS sampling_frequency_index order


def make_executor(cfg: MediaConfig) -> ThreadPoolExecutor:
    """The dedicated encoding pool (never the loop's default executor)."""
    return ThreadPoolExecutor(max_workers=cfg.encoder_threads, thread_name_prefix="encode")


class Encoded(NamedTuple):
    data: bytes
    keyframe: bool


class VideoEncoder(Protocol):
    size: tuple[int, int]

    def encode(self, rgb: np.ndarray, index: int, keyframe: bool = False) -> Encoded | None:
        """Frame `index` (any size: scaled to the encoder's) -> one access unit, or None."""
        ...


# 1. Video --------------------------------------------------------------------------------------


class H264Encoder:
    """rgb24 frames -> Annex-B H.264 access units (constrained baseline, one per frame).

    Not thread-safe: a variant's frames are encoded one after another.
    """

    def __init__(self, width: int, height: int, cfg: MediaConfig,
                 bitrate_kbps: int | None = None, fps: float = FPS):
        kbps = bitrate_kbps or cfg.bitrate_kbps
        keyint = max(1, round(cfg.keyframe_interval_s * fps))
        ctx = av.CodecContext.create(cfg.encoder, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        self.ctx = ctx
        self.ctx.width, self.ctx.height = width, height
        self.ctx.pix_fmt = "yuv420p"
        self.ctx.time_base = VIDEO_TIME_BASE
        self.ctx.framerate = Fraction(FPS, 1)
        self.ctx.bit_rate = kbps * 1000
        self.ctx.options = {
            "preset": cfg.preset, "tune": cfg.tune, "profile": "baseline", "level": "31",
            "forced-idr": "1",  # a requested keyframe must be an IDR: decoders restart there
            "x264-params": (f"keyint={keyint}:min-keyint={keyint}:scenecut=0:repeat-headers=1:"
                            f"vbv-maxrate={kbps}:vbv-bufsize={max(1, kbps // 2)}"),
        }
        self.size = (width, height)

    def encode(self, rgb: np.ndarray, index: int, keyframe: bool = False) -> Encoded | None:
        packets = self.ctx.encode(_frame(rgb, self.size, "yuv420p", index, keyframe))
        if not packets:
            return None
        return Encoded(b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets))


class Vp8Encoder:
    """rgb24 frames -> VP8 frames (libvpx realtime, one thread: its threading costs more than
    it saves at these sizes)."""

    def __init__(self, width: int, height: int, cfg: MediaConfig, bitrate_kbps: int,
                 fps: float = FPS):
        ctx = av.CodecContext.create("libvpx", "w")
        assert isinstance(ctx, av.VideoCodecContext)
        self.ctx = ctx
        self.ctx.width, self.ctx.height = width, height
        self.ctx.pix_fmt = "yuv420p"
        self.ctx.time_base = VIDEO_TIME_BASE
        self.ctx.framerate = Fraction(FPS, 1)
        self.ctx.bit_rate = bitrate_kbps * 1000
        self.ctx.gop_size = max(1, round(cfg.keyframe_interval_s * fps))
        self.ctx.qmin, self.ctx.qmax = 2, 56
        self.ctx.thread_count = 1
        self.ctx.options = {
            "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
            "error-resilient": "1", "static-thresh": "1", "undershoot-pct": "100",
            "overshoot-pct": "15", "maxrate": str(bitrate_kbps * 1000),
            "bufsize": str(bitrate_kbps * 1000 // 2),
        }
        self.size = (width, height)

    def encode(self, rgb: np.ndarray, index: int, keyframe: bool = False) -> Encoded | None:
        packets = self.ctx.encode(_frame(rgb, self.size, "yuv420p", index, keyframe))
        if not packets:
            return None
        return Encoded(b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets))


class JpegEncoder:
    """rgb24 frames -> baseline JPEG images (every frame stands alone). `qscale` 2 (best) - 31."""

    def __init__(self, width: int, height: int, qscale: int = 3):
        ctx = av.CodecContext.create("mjpeg", "w")
        assert isinstance(ctx, av.VideoCodecContext)
        self.ctx = ctx
        self.ctx.width, self.ctx.height = width, height
        self.ctx.pix_fmt = "yuvj420p"
        self.ctx.time_base = VIDEO_TIME_BASE
        self.ctx.qmin = self.ctx.qmax = qscale
        self.size = (width, height)

    def encode(self, rgb: np.ndarray, index: int, keyframe: bool = False) -> Encoded | None:
        data = b"".join(bytes(p) for p in self.ctx.encode(
            _frame(rgb, self.size, "yuvj420p", index, False)))
        return Encoded(data, True) if data else None


def _frame(rgb: np.ndarray, size: tuple[int, int], pix_fmt: str, index: int,
           keyframe: bool) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if (frame.width, frame.height) == size:
        frame = frame.reformat(format=pix_fmt)
    else:
        frame = frame.reformat(width=size[0], height=size[1], format=pix_fmt,
                               interpolation="AREA")
    frame.pts = index
    frame.time_base = VIDEO_TIME_BASE
    if keyframe:
        frame.pict_type = PictureType.I
    return frame


# 2. Audio --------------------------------------------------------------------------------------


class EncodedAudio(NamedTuple):
    data: bytes
    sample: int  # 48 kHz index of its first sample
    samples: int  # how many it covers


class AudioEncoder(Protocol):
    def encode(self, samples: np.ndarray, start: int) -> EncodedAudio | None:
        """int16 mono 48 kHz samples from sample index `start` -> what the encoder made of
        them, or None while it fills its first frame."""
        ...


def _audio_frame(samples: np.ndarray, start: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = PLAYOUT_RATE
    frame.pts = start
    frame.time_base = AUDIO_TIME_BASE
    return frame


def _audio_context(codec: str, sample_format: str, bitrate_kbps: int) -> av.AudioCodecContext:
    """A mono 48 kHz encoder context on the playout clock (both audio encoders start so)."""
    ctx = av.CodecContext.create(codec, "w")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate = PLAYOUT_RATE
    ctx.layout = "mono"
    ctx.format = sample_format
    ctx.bit_rate = bitrate_kbps * 1000
    ctx.time_base = AUDIO_TIME_BASE
    return ctx


class OpusEncoder:
    """40 ms slices -> one 40 ms Opus packet each, stamped with the slice's own first sample
    (libopus's 6.5 ms look-ahead is left to the decoder, as aiortc's own encoder does)."""

    def __init__(self, bitrate_kbps: int):
        self.ctx = _audio_context("libopus", "s16", bitrate_kbps)
        self.ctx.options = {"application": "voip", "frame_duration": str(OPUS_FRAME_MS)}

    def encode(self, samples: np.ndarray, start: int) -> EncodedAudio | None:
        packets = self.ctx.encode(_audio_frame(samples, start))
        if not packets:
            return None
        return EncodedAudio(b"".join(bytes(p) for p in packets), start, len(samples))


class AacEncoder:
    """Samples -> AAC-LC frames of 1024 samples, each behind its 7-byte ADTS header (what
    MPEG-TS carries), stamped with the encoder's own timestamps (which account for its
    1024-sample priming, so the decoded audio lands on the media time it came from)."""

    def __init__(self, bitrate_kbps: int):
        self.ctx = _audio_context("aac", "fltp", bitrate_kbps)
        # the fast coder: a quarter of the default's CPU (20 ms per second of audio on these
        # cores), no audible difference on speech at these bitrates
        self.ctx.options = {"aac_coder": "fast"}
        self._rate_index = AAC_SAMPLE_RATES.index(PLAYOUT_RATE)

    def encode(self, samples: np.ndarray, start: int) -> EncodedAudio | None:
        packets = self.ctx.encode(_audio_frame(samples, start))
        if not packets:
            return None
        return EncodedAudio(b"".join(self._adts(bytes(p)) for p in packets),
                            int(packets[0].pts or 0), sum(p.duration or 1024 for p in packets))

    def _adts(self, raw: bytes) -> bytes:
        """ISO 14496-3 ADTS header: MPEG-4, no CRC, AAC-LC, mono, one raw data block."""
        n = len(raw) + 7
        return bytes((0xFF, 0xF1, (1 << 6) | (self._rate_index << 2), (1 << 6) | (n >> 11),
                      (n >> 3) & 0xFF, ((n & 7) << 5) | 0x1F, 0xFC)) + raw
