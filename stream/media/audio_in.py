"""Incoming session audio (a WebRTC mic track, or PCM) -> the engine and the playout store.

Any rate and channel layout is resampled with `av.AudioResampler` twice: to 16 kHz for the engine
and to 48 kHz for playout; channels are then averaged (FFmpeg's own downmix would add 3 dB to a
stereo microphone whose channels are equal, and clip loud speech). Both are stamped on the session clock: the
first chunk lands at the media time it arrives and later chunks follow contiguously. A source
that falls more than `resync_s` behind real time (it paused, or packets were lost) is re-anchored
at the present: the gap is silence. A source ahead of real time (a burst after a stall) stays
contiguous: its audio is played when its time comes. Audio is never dropped here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import av
import numpy as np

from engine.api import SAMPLE_RATE, AudioChunk
from stream.media.timeline import PLAYOUT_RATE, MediaClock, PlayoutAudio

log = logging.getLogger(__name__)


class AudioInput:
    def __init__(self, clock: MediaClock, to_engine: Callable[[AudioChunk], None],
                 playout: PlayoutAudio, resync_s: float = 0.3):
        self.clock = clock
        self.to_engine = to_engine
        self.playout = playout
        self.resync = int(resync_s * SAMPLE_RATE)
        self._layout: str | None = None
        self._engine_rs: av.AudioResampler | None = None
        self._playout_rs: av.AudioResampler | None = None
        self._next: int | None = None  # next engine sample index (16 kHz)
        self._next_playout = 0  # next playout sample index (48 kHz)
        self.samples_in = 0  # engine samples received
        self.resyncs = 0

    @staticmethod
    def _mono(resampler: av.AudioResampler, frame: av.AudioFrame) -> np.ndarray:
        parts = [f.to_ndarray() for f in resampler.resample(frame)]  # planar: [channels, n]
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts, axis=1).mean(axis=0).astype(np.float32)

    def push_frame(self, frame: av.AudioFrame) -> None:
        layout = frame.layout.name
        if layout != self._layout or self._engine_rs is None or self._playout_rs is None:
            self._layout = layout
            self._engine_rs = av.AudioResampler(format="fltp", layout=layout, rate=SAMPLE_RATE)
            self._playout_rs = av.AudioResampler(format="fltp", layout=layout, rate=PLAYOUT_RATE)
        engine = self._mono(self._engine_rs, frame)
        playout = self._mono(self._playout_rs, frame)
        pcm = (np.clip(playout, -1.0, 1.0) * 32767).round().astype(np.int16)
        self._emit(engine, pcm)

    def push_pcm(self, pcm: bytes, rate: int, channels: int = 1) -> None:
        """Interleaved s16le PCM at `rate` Hz."""
        data = np.frombuffer(pcm, dtype="<i2")
        if channels > 1:
            data = data[: len(data) - len(data) % channels].reshape(-1, channels)
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16",
                                           layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        self.push_frame(frame)

    def _emit(self, engine: np.ndarray, playout: np.ndarray) -> None:
        now = self.clock.engine_samples_now()
        if self._next is None or now - self._next > self.resync:
            if self._next is not None:
                self.resyncs += 1
                log.info("audio input fell %.2f s behind real time; re-anchored (gap = silence)",
                         (now - self._next) / SAMPLE_RATE)
            self._next = now
            self._next_playout = now * (PLAYOUT_RATE // SAMPLE_RATE)
        if len(engine):
            self.to_engine(AudioChunk(engine, self._next))
            self._next += len(engine)
            self.samples_in += len(engine)
        if len(playout):
            self.playout.write(self._next_playout, playout)
            self._next_playout += len(playout)
