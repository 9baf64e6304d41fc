"""Incoming session audio (a WebRTC mic track, or PCM) -> the engine and the playout store.

Any rate and channel layout is resampled with `av.AudioResampler` twice: to 16 kHz for the engine
and to 48 kHz for playout; channels are then averaged (FFmpeg's own downmix would add 3 dB to a
stereo microphone whose channels are equal, and clip loud speech). Both are stamped on the session
clock: the first chunk lands at the media time it arrives and later chunks follow contiguously. A
source that falls more than `resync_s` behind real time (it paused, or packets were lost) is
re-anchored at the present: the gap is silence. `resync_s` is the runtime's grace for late
audio ([latency] late_audio_s, one setting): audio up to that late is still waited for by its
block, so it keeps its place; later audio would find its block made as silence, and starts
afresh at the present instead (never speech played over a silent block). A source ahead of real
time (a burst after a stall) stays contiguous: its audio is played when its time comes. Audio
is never dropped here. When each chunk arrived is kept for a while (`arrived`): the latency
accounting starts there.

A resampler holds back a millisecond or so of its input (its filter delay). A source that stops
(a bot's utterance ends) calls `flush`, which emits that tail where it belongs; `engine_end` and
`playout_end` say where the audio given so far ends once flushed, exactly, whatever is held back.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

from engine.api import SAMPLE_RATE, AudioChunk
from stream.media.timeline import PLAYOUT_RATE, MediaClock, PlayoutAudio

log = logging.getLogger(__name__)

PLAYOUT_PER_ENGINE = PLAYOUT_RATE // SAMPLE_RATE  # 3
ARRIVALS_KEPT = 1024  # chunks whose arrival time is kept (20 s of 20 ms packets)


class Arrivals:
    """When the audio of each engine sample reached the server: (start sample, time) of the
    chunks given, in order, the newest ARRIVALS_KEPT of them."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._times: list[float] = []

    def record(self, start: int, count: int, when: float) -> None:
        if self._starts and start < self._ends[-1]:
            return  # (never happens: input audio only moves forward)
        self._starts.append(start)
        self._ends.append(start + count)
        self._times.append(when)
        if len(self._starts) > 2 * ARRIVALS_KEPT:
            del self._starts[:ARRIVALS_KEPT], self._ends[:ARRIVALS_KEPT]
            del self._times[:ARRIVALS_KEPT]

    def at(self, sample: int) -> float | None:
        """When engine sample `sample` arrived (None: it never did, or too long ago)."""
        i = bisect.bisect_right(self._starts, sample) - 1
        if i < 0 or sample >= self._ends[i]:
            return None
        return self._times[i]


@dataclass
class _Run:
    """One stretch of contiguous input through one pair of resamplers."""

    layout: str
    rate: int
    engine_rs: av.AudioResampler
    playout_rs: av.AudioResampler
    engine0: int  # engine sample where the run started
    playout0: int  # playout sample where the run started
    samples_in: int = 0  # input samples (per channel) given to the run


class AudioInput:
    def __init__(self, clock: MediaClock, to_engine: Callable[[AudioChunk], None],
                 playout: PlayoutAudio, resync_s: float = 0.3):
        self.clock = clock
        self.to_engine = to_engine
        self.playout = playout
        self.resync = int(resync_s * SAMPLE_RATE)
        self._run: _Run | None = None
        self._next: int | None = None  # next engine sample index (16 kHz)
        self._next_playout = 0  # next playout sample index (48 kHz)
        self.samples_in = 0  # engine samples received
        self.resyncs = 0
        self.arrived = Arrivals()

    # 1. where the audio is -------------------------------------------------------------------

    @property
    def engine_end(self) -> int:
        """One past the last engine sample (16 kHz) of the audio given so far, once flushed."""
        if self._run is None:
            return self._next or 0
        return self._run.engine0 + round(self._run.samples_in * SAMPLE_RATE / self._run.rate)

    @property
    def playout_end(self) -> int:
        """One past the last playout sample (48 kHz) of the audio given so far, once flushed."""
        if self._run is None:
            return self._next_playout
        return self._run.playout0 + round(self._run.samples_in * PLAYOUT_RATE / self._run.rate)

    def ahead_s(self) -> float:
        """How far the audio given so far reaches past the present (negative: behind)."""
        return self.playout_end / PLAYOUT_RATE - self.clock.media_now()

    # 2. feeding -------------------------------------------------------------------------------

    @staticmethod
    def _mono(parts: list[av.AudioFrame]) -> np.ndarray:
        arrays = [f.to_ndarray() for f in parts]  # planar: [channels, n]
        if not arrays:
            return np.zeros(0, np.float32)
        return np.concatenate(arrays, axis=1).mean(axis=0).astype(np.float32)

    def push_frame(self, frame: av.AudioFrame) -> None:
        layout, rate = frame.layout.name, frame.sample_rate
        run = self._run
        behind = (self._next is not None
                  and self.clock.engine_samples_now() - self.engine_end > self.resync)
        if run is None or run.layout != layout or run.rate != rate or behind:
            self.flush()  # the old resamplers' tails go where they belong
            self._anchor()
            run = self._run = _Run(
                layout, rate,
                av.AudioResampler(format="fltp", layout=layout, rate=SAMPLE_RATE),
                av.AudioResampler(format="fltp", layout=layout, rate=PLAYOUT_RATE),
                self._next or 0, self._next_playout)
        run.samples_in += frame.samples
        self._emit(self._mono(run.engine_rs.resample(frame)),
                   self._mono(run.playout_rs.resample(frame)))

    def push_pcm(self, pcm: bytes, rate: int, channels: int = 1) -> None:
        """Interleaved s16le PCM at `rate` Hz."""
        data = np.frombuffer(pcm, dtype="<i2")
        if channels > 1:
            data = data[: len(data) - len(data) % channels].reshape(-1, channels)
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16",
                                           layout="mono" if channels == 1 else "stereo")
        frame.sample_rate = rate
        self.push_frame(frame)

    def flush(self) -> None:
        """Emit what the resamplers hold back; the next audio starts a fresh run."""
        run, self._run = self._run, None
        if run is None:
            return
        self._emit(self._mono(run.engine_rs.resample(None)),
                   self._mono(run.playout_rs.resample(None)))
        # the run's exact end, whatever the resamplers rounded
        self._next = run.engine0 + round(run.samples_in * SAMPLE_RATE / run.rate)
        self._next_playout = run.playout0 + round(run.samples_in * PLAYOUT_RATE / run.rate)

    def continue_at_present(self) -> None:
        """The source paused (or is about to start): flush, and continue at the present if the
        audio so far ends before it. Sources that pace themselves (a bot) call this before
        audio that follows a gap, so their audio is never stamped in the past."""
        self.flush()
        now = self.clock.engine_samples_now()
        if self._next is None or self._next < now:
            self._next = now
            self._next_playout = now * PLAYOUT_PER_ENGINE

    def _anchor(self) -> None:
        now = self.clock.engine_samples_now()
        if self._next is None or now - self._next > self.resync:
            if self._next is not None:
                self.resyncs += 1
                log.info("audio input fell %.2f s behind real time; re-anchored (gap = silence)",
                         (now - self._next) / SAMPLE_RATE)
            self._next = now
            self._next_playout = now * PLAYOUT_PER_ENGINE

    def _emit(self, engine: np.ndarray, playout: np.ndarray) -> None:
        assert self._next is not None, "anchored before the first emit"
        if len(engine):
            self.arrived.record(self._next, len(engine), time.monotonic())
            self.to_engine(AudioChunk(engine, self._next))
            self._next += len(engine)
            self.samples_in += len(engine)
        if len(playout):
            # x32768 (not 32767): s16 input comes back bit-exact through the float resampler
            pcm = np.clip(np.round(playout * 32768.0), -32768, 32767).astype(np.int16)
            self.playout.write(self._next_playout, pcm)
            self._next_playout += len(playout)
