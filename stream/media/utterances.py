"""A bot's speech as the audio source of a session: utterances, paced release, interruption.

The bot may send audio far faster than real time. It waits in an `AudioQueue` (bounded, never
overwritten) and is released into the session timeline (`AudioInput` -> engine + playout store)
only while the audio already released reaches less than `release_ahead_s` past the present, so
the engine never sees more than that ahead and the playout ring is never asked to hold audio it
has no room for. Audio that follows a gap (the queue ran dry) starts at the present, never in the
past, so every sample reaches the engine before its block's deadline: lip sync holds for bots.

Utterances. Audio after `end_utterance` (or after the previous utterance has been played out with
nothing more queued: the avatar fell silent) starts a new utterance. Each one is a list of
playout spans (48 kHz samples; gaps appear only where the bot under-ran). Events, in order:

- `utterance.started {t_first_frame_ms}` once the frame carrying its first sample is presented;
  t_first_frame_ms runs from the server receiving its first audio to that frame's presentation
  time on the session clock (later if the frame itself arrived late);
- `utterance.ended {played_ms, interrupted}` once its last sample (or its cut) has been played.

Interrupt. The queue is dropped at once. The released part is cut at the first sample that no
started engine block has read (the runtime decides, see engine/runtime.py `cut_audio`), but never
before what viewers may already have fetched (the play position + one frame). The engine's audio
and the playout audio from the cut on become silence, so no frame made from speech is shown
without its sound, and nothing after the cut is speech: the avatar is idle from the cut on.
`input_audio.cleared {played_ms}` then reports exactly how much of the utterance is played.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from engine.api import FPS
from stream.media.audio_in import PLAYOUT_PER_ENGINE, AudioInput
from stream.media.audio_queue import AudioQueue, PcmChunk
from stream.media.timeline import (
    PLAYOUT_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    FrameStore,
    MediaClock,
    PlayoutAudio,
)

log = logging.getLogger(__name__)

TICK_S = 0.02  # progress checks; events are timed from the clock, not from the tick
LEVEL_EVERY_S = 0.25  # buffer.level at most this often while the level changes
MIN_RELEASE_S = 0.01  # release in pieces of at least this much (unless the chunk is shorter)

Listener = Callable[[str, int, dict[str, Any]], None]  # (event type, pts in ms, fields)
CutEngine = Callable[[int, int, Callable[[int], None]], None]  # (start, end, on_cut) 16 kHz


def _ms(samples: int) -> int:
    """48 kHz samples -> whole milliseconds (media time)."""
    return samples // (PLAYOUT_RATE // 1000)


@dataclass
class Utterance:
    id: str
    received_at: float  # time.monotonic() the server received its first audio
    received_s: float = 0.0  # seconds of audio the bot sent for it
    queued_s: float = 0.0  # of which still in the queue
    spans: list[list[int]] = field(default_factory=list)  # released [start, end) playout samples
    closed: bool = False  # no more audio joins it (utterance.end, interrupt, or played out)
    cut: int | None = None  # interrupt cut (playout sample)
    interrupted: bool = False
    t_first_frame_ms: int | None = None
    started: bool = False  # utterance.started sent
    ended: bool = False  # utterance.ended sent

    def played_samples(self) -> int:
        stop = math.inf if self.cut is None else self.cut
        return int(sum(max(0, min(e, stop) - s) for s, e in self.spans))

    def end_sample(self) -> int | None:
        """Where its playback ends, once nothing more can join it (else None)."""
        if not self.closed or self.queued_s > 0:
            return None
        end = self.spans[-1][1] if self.spans else 0
        if self.cut is not None:
            end = min(end, self.cut) if self.spans and self.spans[0][0] < self.cut else self.cut
        return end


class SpeechSource:
    """The socket's audio source of one session. Owned by the session; outlives a socket (a bot
    that sends its audio and hangs up is still played out in full)."""

    def __init__(self, clock: MediaClock, frames: FrameStore, audio_in: AudioInput,
                 playout: PlayoutAudio, cut_engine: CutEngine, max_queued_s: float,
                 release_ahead_s: float, name: str = "speech"):
        self.clock = clock
        self.frames = frames
        self.audio_in = audio_in
        self.playout = playout
        self.cut_engine = cut_engine
        self.release_ahead_s = release_ahead_s
        self.queue = AudioQueue(max_queued_s)
        self.listener: Listener | None = None
        self.name = name
        self._utterances: list[Utterance] = []  # not yet ended, in order
        self._count = 0
        self._last_released: Utterance | None = None
        self._cuts_in_flight = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._level_sent: tuple[float, int] | None = None  # (when, queued ms)
        # figures for stats
        self.released_s = 0.0
        self.dropped_s = 0.0
        self.utterance_total = 0
        self.last_t_first_frame_ms: int | None = None

    # 1. the producer side (the socket) ------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    @property
    def queued_ms(self) -> int:
        return round(self.queue.seconds * 1000)

    def has_room(self, seconds: float) -> bool:
        return self.queue.has_room(seconds)

    async def wait_for_room(self, seconds: float) -> None:
        await self.queue.wait_for_room(seconds)

    def push(self, samples: np.ndarray, rate: int, channels: int) -> Utterance:
        """Queue interleaved int16 samples (the caller checked `has_room`)."""
        utt = self._utterances[-1] if self._utterances else None
        if utt is None or utt.closed:
            self._count += 1
            self.utterance_total += 1
            utt = Utterance(f"utt_{self._count}", time.monotonic())
            self._utterances.append(utt)
        chunk = PcmChunk(utt, samples, rate, channels)
        utt.received_s += chunk.seconds
        utt.queued_s += chunk.seconds
        self.queue.put(chunk)
        self._wake.set()
        return utt

    def end_utterance(self) -> Utterance | None:
        """No more audio joins the current utterance; None if there is none open."""
        utt = self._utterances[-1] if self._utterances else None
        if utt is None or utt.closed:
            return None
        utt.closed = True
        self._wake.set()
        return utt

    def interrupt(self) -> None:
        """Drop the queue now and cut what was released; `input_audio.cleared` follows as soon
        as the engine says where the cut fell (within one block's compute time)."""
        dropped = Fraction(0)  # exact: the report's milliseconds must add up (see _on_cut)
        for chunk in self.queue.clear():
            chunk.owner.queued_s = 0.0
            dropped += Fraction(chunk.frames, chunk.rate)
        self.dropped_s += float(dropped)
        pending = [u for u in self._utterances if not u.ended]
        if not pending:
            self._emit("input_audio.cleared", _ms(self.playout.play_position()),
                       {"utterance_id": None, "played_ms": 0, "dropped_ms": 0})
            return
        was_open = {u.id for u in pending if not u.closed}
        for utt in pending:
            utt.closed = True
        self.audio_in.flush()  # the resamplers' tails must land before the cut is made
        # viewers fetch up to one frame ahead of the play position: never cut before that
        start = self.playout.play_position() + SAMPLES_PER_VIDEO_FRAME
        start16 = -(-start // PLAYOUT_PER_ENGINE)
        self._cuts_in_flight += 1
        self.cut_engine(start16, max(start16, self.audio_in.engine_end),
                        lambda cut16: self._on_cut(cut16 * PLAYOUT_PER_ENGINE, pending,
                                                   was_open, dropped))

    def _on_cut(self, cut: int, pending: list[Utterance], was_open: set[str],
                dropped: Fraction) -> None:
        self._cuts_in_flight -= 1
        if self._task is None:
            return  # closed meanwhile
        released_end = self.audio_in.playout_end
        if cut < released_end:
            self.playout.silence(cut, released_end)
        report: Utterance | None = None
        silenced = 0  # the utterances' own samples after the cut (not the gaps between them)
        for utt in pending:
            if utt.ended:
                continue
            silenced += sum(max(0, e - max(s, cut)) for s, e in utt.spans)
            released_s = sum(e - s for s, e in utt.spans) / PLAYOUT_RATE
            utt.interrupted = (utt.id in was_open or not utt.spans
                               or any(e > cut for _, e in utt.spans)
                               or utt.received_s > released_s + 1e-6)
            if utt.interrupted:
                utt.cut = cut
                report = report or utt
        self._emit("input_audio.cleared", _ms(cut), {
            "utterance_id": report.id if report else None,
            "played_ms": _ms(report.played_samples()) if report else 0,
            # played_ms rounds down, dropped_ms up (queued and cut off together, exactly): for
            # audio of whole milliseconds the two add up to what was received (soak.py checks)
            "dropped_ms": math.ceil((dropped + Fraction(silenced, PLAYOUT_RATE)) * 1000)})
        self._wake.set()

    # 2. the loop: release, progress, level ----------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self._release()
                self._progress()
                self._report_level()
            except Exception:  # one bad step must not end the session's audio
                log.exception("%s: speech source step failed", self.name)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    def _release(self) -> None:
        if self._cuts_in_flight:
            return  # the cut must land first: nothing new enters until then
        while (chunk := self.queue.peek()) is not None:
            ahead = self.audio_in.ahead_s()
            if ahead >= self.release_ahead_s:
                break
            utt: Utterance = chunk.owner
            room = max(self.release_ahead_s - ahead, MIN_RELEASE_S)
            piece = self.queue.pop(max(1, math.ceil(room * chunk.rate)))
            head = self.queue.peek()
            # FIFO: an utterance's chunks are contiguous, so exactly zero once its last left
            utt.queued_s = utt.queued_s - piece.seconds if head and head.owner is utt else 0.0
            if ahead < 0:
                self.audio_in.continue_at_present()  # after a gap: start at the present
            start = self.audio_in.playout_end
            self.audio_in.push_pcm(piece.samples.tobytes(), piece.rate, piece.channels)
            end = self.audio_in.playout_end
            if utt.spans and utt.spans[-1][1] == start and self._last_released is utt:
                utt.spans[-1][1] = end
            else:
                utt.spans.append([start, end])
            self._last_released = utt
            self.released_s += piece.seconds
            if utt.closed and utt.queued_s == 0:
                self.audio_in.flush()  # its last sample is written now, not with the next audio
        if self.queue.peek() is None and self.audio_in.ahead_s() < 2 * TICK_S:
            self.audio_in.flush()  # running dry: the held-back tail must not wait for more

    def _progress(self) -> None:
        position = self.playout.play_position()
        for utt in self._utterances:
            if not utt.started and utt.played_samples() > 0:
                self._maybe_started(utt)
        last = self._utterances[-1] if self._utterances else None
        if (last is not None and not last.closed and last.queued_s == 0 and last.spans
                and position >= last.spans[-1][1]):
            last.closed = True  # played out with nothing more queued: the avatar fell silent
        while self._utterances and not self._cuts_in_flight:
            utt = self._utterances[0]  # they end in order
            end = utt.end_sample()
            if end is None or position < end or (not utt.started and utt.played_samples()):
                break
            utt.ended = True
            self._utterances.pop(0)
            self._emit("utterance.ended", _ms(end), {
                "utterance_id": utt.id, "played_ms": _ms(utt.played_samples()),
                "interrupted": utt.interrupted})

    def _maybe_started(self, utt: Utterance) -> None:
        first = utt.spans[0][0]
        n = first // SAMPLES_PER_VIDEO_FRAME
        if self.clock.playing_now() < n / FPS:
            return  # its first frame is not presented yet
        arrived = self.frames.arrived(n)
        if arrived is None and self.frames.newest < n:
            return  # not generated yet: it will be shown when it arrives
        presented = max(self.clock.wall_for(n / FPS), arrived or 0.0)
        utt.started = True
        utt.t_first_frame_ms = max(0, round((presented - utt.received_at) * 1000))
        self.last_t_first_frame_ms = utt.t_first_frame_ms
        self._emit("utterance.started", _ms(first), {
            "utterance_id": utt.id, "t_first_frame_ms": utt.t_first_frame_ms})

    def _report_level(self) -> None:
        """buffer.level whenever the level changed, at most every LEVEL_EVERY_S, and at once
        when the queue has drained."""
        queued, last = self.queued_ms, self._level_sent
        if last is None and queued == 0:
            return  # nothing was ever queued: nothing to say
        if last is not None and (last[1] == queued or (
                queued and time.monotonic() - last[0] < LEVEL_EVERY_S)):
            return
        self.buffer_level()

    def buffer_level(self) -> None:
        """Send `buffer.level` now (the socket does before it reports a full buffer)."""
        self._level_sent = (time.monotonic(), self.queued_ms)
        self._emit("buffer.level", _ms(self.playout.play_position()), {
            "queued_ms": self.queued_ms, "max_queued_ms": round(self.queue.capacity_s * 1000),
            "ahead_ms": max(0, round(self.audio_in.ahead_s() * 1000))})

    def _emit(self, kind: str, pts_ms: int, fields: dict[str, Any]) -> None:
        if self.listener is not None:
            self.listener(kind, pts_ms, fields)

    # 3. figures and shutdown ----------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        return {"queued_ms": self.queued_ms,
                "ahead_ms": max(0, round(self.audio_in.ahead_s() * 1000)),
                "released_ms": round(self.released_s * 1000),
                "dropped_ms": round(self.dropped_s * 1000),
                "utterances": self.utterance_total,
                "t_first_frame_ms": self.last_t_first_frame_ms}

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.queue.clear()
