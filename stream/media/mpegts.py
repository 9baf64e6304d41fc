"""MPEG-TS (H.264 + AAC) muxed in memory, for GET /v1/sessions/{id}/stream.ts.

OBS's Media Source and ffmpeg read it over plain HTTP. Both elementary streams carry the session's
media time as PTS, so the player keeps them in sync. One muxer per HTTP reader; its output is
handed to the response chunk by chunk.
"""

from __future__ import annotations

import threading
from fractions import Fraction

import av
import numpy as np

from stream.config import MediaConfig
from stream.media.encoder import VIDEO_TIME_BASE
from stream.media.timeline import PLAYOUT_RATE


class _Sink:
    """A write-only file object that hands out what was written since the last take."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class TsMuxer:
    """Feed (frame, audio slice) pairs in media order; get TS bytes back.

    Calls are serialised by a lock, so `close` (from a cancelled reader) waits for an `add` still
    running on an encoder thread instead of tearing the codec down under it.
    """

    def __init__(self, width: int, height: int, cfg: MediaConfig):
        self._lock = threading.Lock()
        self._closed = False
        self.sink = _Sink()
        self.container = av.open(self.sink, "w", format="mpegts")
        keyint = max(1, round(cfg.keyframe_interval_s * 25))
        video = self.container.add_stream(cfg.encoder, rate=25)
        assert isinstance(video, av.VideoStream)
        self.video = video
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        self.video.time_base = VIDEO_TIME_BASE
        self.video.bit_rate = cfg.bitrate_kbps * 1000
        self.video.options = {"preset": cfg.preset, "tune": cfg.tune,
                              "x264-params": f"keyint={keyint}:scenecut=0:repeat-headers=1"}
        audio = self.container.add_stream("aac", rate=PLAYOUT_RATE, layout="mono")
        assert isinstance(audio, av.AudioStream)
        self.audio = audio
        self.audio.time_base = Fraction(1, PLAYOUT_RATE)
        self.size = (width, height)

    def add(self, rgb: np.ndarray, index: int, audio: np.ndarray, audio_start: int) -> bytes:
        """Frame `index` and int16 samples starting at 48 kHz index `audio_start`."""
        with self._lock:
            if self._closed:
                return b""
            return self._add(rgb, index, audio, audio_start)

    def _add(self, rgb: np.ndarray, index: int, audio: np.ndarray, audio_start: int) -> bytes:
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        frame.time_base = VIDEO_TIME_BASE
        self.container.mux(self.video.encode(frame))
        sound = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="s16", layout="mono")
        sound.sample_rate = PLAYOUT_RATE
        sound.pts = audio_start
        sound.time_base = Fraction(1, PLAYOUT_RATE)
        self.container.mux(self.audio.encode(sound))
        return self.sink.take()

    def close(self) -> bytes:
        with self._lock:
            if self._closed:
                return b""
            self._closed = True
            try:
                self.container.mux(self.video.encode(None))
                self.container.mux(self.audio.encode(None))
                self.container.close()
            except (av.error.FFmpegError, ValueError):
                pass
            return self.sink.take()
