"""Video encoders off the event loop: H.264 with PyAV's libx264 (ultrafast/zerolatency by default)
and JPEG (mjpeg), both scaling to their own size on the way in.

aiortc's own H.264 encoder is libx264 at its default preset (9-14 ms a frame on these CPUs);
ultrafast/zerolatency costs 1-2 ms. Encoded packets go to aiortc as pre-encoded `av.Packet`s;
because aiortc's keyframe requests do not reach a pre-encoded source, keyframes are periodic
(`keyframe_interval_s`) with the parameter sets repeated on each; a caller may also ask for one
(`keyframe=True`: a consumer joining a shared encoder).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np
from av.video.frame import PictureType

from engine.api import FPS
from stream.config import MediaConfig

VIDEO_TIME_BASE = Fraction(1, FPS)


def make_executor(cfg: MediaConfig) -> ThreadPoolExecutor:
    """The dedicated encoding pool (never the loop's default executor)."""
    return ThreadPoolExecutor(max_workers=cfg.encoder_threads, thread_name_prefix="encode")


class H264Encoder:
    """rgb24 frames -> Annex-B H.264 packets (constrained baseline, one packet per frame).

    Not thread-safe: one viewer's frames are encoded one after another.
    """

    def __init__(self, width: int, height: int, cfg: MediaConfig):
        keyint = max(1, round(cfg.keyframe_interval_s * FPS))
        ctx = av.CodecContext.create(cfg.encoder, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        self.ctx = ctx
        self.ctx.width, self.ctx.height = width, height
        self.ctx.pix_fmt = "yuv420p"
        self.ctx.time_base = VIDEO_TIME_BASE
        self.ctx.framerate = Fraction(FPS, 1)
        self.ctx.bit_rate = cfg.bitrate_kbps * 1000
        self.ctx.options = {
            "preset": cfg.preset, "tune": cfg.tune, "profile": "baseline", "level": "31",
            "x264-params": (f"keyint={keyint}:min-keyint={keyint}:scenecut=0:repeat-headers=1:"
                            f"vbv-maxrate={cfg.bitrate_kbps}:vbv-bufsize={cfg.bitrate_kbps // 2}"),
        }
        self.size = (width, height)

    def encode(self, rgb: np.ndarray, index: int, keyframe: bool = False) -> av.Packet | None:
        """Frame `index` (any size: scaled to the encoder's) -> one access unit, or None."""
        frame = _yuv(rgb, self.size, "yuv420p")
        frame.pts = index
        frame.time_base = VIDEO_TIME_BASE
        if keyframe:
            frame.pict_type = PictureType.I
        packets = self.ctx.encode(frame)
        if not packets:
            return None
        if len(packets) == 1:
            packet = packets[0]
        else:  # Annex-B access units concatenate
            packet = av.Packet(b"".join(bytes(p) for p in packets))
            packet.pts = index
        packet.time_base = VIDEO_TIME_BASE
        return packet


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

    def encode(self, rgb: np.ndarray, index: int) -> bytes:
        frame = _yuv(rgb, self.size, "yuvj420p")
        frame.pts = index
        frame.time_base = VIDEO_TIME_BASE
        return b"".join(bytes(p) for p in self.ctx.encode(frame))


def _yuv(rgb: np.ndarray, size: tuple[int, int], pix_fmt: str) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if (frame.width, frame.height) == size:
        return frame.reformat(format=pix_fmt)
    return frame.reformat(width=size[0], height=size[1], format=pix_fmt, interpolation="AREA")
