"""Video encoders off the event loop: H.264 with PyAV's libx264 (ultrafast/zerolatency by default).

aiortc's own H.264 encoder is libx264 at its default preset (9-14 ms a frame on these CPUs);
ultrafast/zerolatency costs 1-2 ms. Encoded packets go to aiortc as pre-encoded `av.Packet`s;
because aiortc's keyframe requests do not reach a pre-encoded source, keyframes are periodic
(`keyframe_interval_s`) with the parameter sets repeated on each.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np

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

    def encode(self, rgb: np.ndarray, index: int) -> av.Packet | None:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        frame.time_base = VIDEO_TIME_BASE
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
