"""Which of a bot's speech segments the avatar has played, worked out from the server's events.

Voice frameworks think in segments: one reply's audio, closed by a flush (LiveKit) or a
`TTSStoppedFrame` (Pipecat), and they want to hear when each one started playing and when it
finished, with how much was played. The server thinks in utterances (`utt_1`, `utt_2`, ...). One
segment is one utterance, except when the bot under-ran so long that the avatar fell silent: the
server then closes the utterance and the rest of the segment becomes the next one. The tracker
therefore matches by the amount of audio, which the server reports exactly (`played_ms`):

- a segment **starts** with the first `utterance.started` while every older segment is done; a
  start that comes while an older segment still plays (back-to-back segments: the next one may
  start a tick before the older one's `utterance.ended`) is held until that segment finishes and
  given to the next segment if it lies at or after the older one's end;
- a segment **finishes** when its end was sent and the `utterance.ended` events since it began
  account for all the audio sent for it (to the rounding of whole milliseconds);
- an **interrupt** finishes every segment it cut as soon as `input_audio.cleared` arrives (well
  before the cut is played: frameworks time out waiting otherwise), the oldest with what the
  server says was played, later ones with nothing; events about the cut utterances that follow
  (at or before the cut's media time) are then ignored;
- a safety net: an ended segment whose audio is not all accounted for, with nothing of it
  playing, finishes `overdue_s` after its last event, with what was played.

Pure bookkeeping, no I/O: feed it what the bot sent (`sent`, `end`, `interrupted`) and what the
server said (`on_event`); each call returns the changes to report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from avatar_client.events import Event, InputAudioCleared, UtteranceEnded, UtteranceStarted

ROUNDING_MS = 2.0  # per utterance.ended counted (played_ms is whole milliseconds)
OVERDUE_S = 5.0


@dataclass
class Segment:
    number: int  # 1, 2, 3, ... in the order the bot sent them
    sent_ms: float = 0.0  # audio sent for it
    played_ms: float = 0.0  # of which the server reported played
    ended: bool = False  # its end was sent: no more audio joins it
    started: bool = False  # PlaybackStarted reported
    parts: int = 0  # utterance.ended events counted for it
    playing: int = 0  # its utterances started and not yet ended
    cut_by: int = 0  # the interrupt (1, 2, ...) that cut it; 0: none
    last_event_at: float = 0.0

    def accounted(self) -> bool:
        return self.played_ms >= self.sent_ms - ROUNDING_MS * max(1, self.parts)


@dataclass(frozen=True)
class PlaybackStarted:
    segment: int


@dataclass(frozen=True)
class PlaybackFinished:
    segment: int
    played_ms: float
    interrupted: bool


Change = PlaybackStarted | PlaybackFinished


class PlaybackTracker:
    def __init__(self, overdue_s: float = OVERDUE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.overdue_s = overdue_s
        self.clock = clock
        self._segments: list[Segment] = []  # not finished, oldest first
        self._count = 0
        self._interrupts = 0  # utterance.interrupt sent
        self._cleared = 0  # input_audio.cleared received
        self._cut_pts = -1  # media time (ms) of the latest cut
        self._held: list[int] = []  # utterance.started pts waiting for an older segment

    # 1. what the bot did --------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Is any segment not finished yet?"""
        return bool(self._segments)

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    def sent(self, ms: float) -> None:
        """`ms` of audio went out for the open segment (one starts if none is open)."""
        seg = self._segments[-1] if self._segments and not self._segments[-1].ended else None
        if seg is None:
            self._count += 1
            seg = Segment(self._count, last_event_at=self.clock())
            self._segments.append(seg)
        seg.sent_ms += ms

    def end(self) -> list[Change]:
        """The open segment is complete (the bot sent `utterance.end`)."""
        seg = self._segments[-1] if self._segments and not self._segments[-1].ended else None
        if seg is None:
            return []
        seg.ended = True
        seg.last_event_at = self.clock()
        if seg.parts and seg.accounted() and seg is self._segments[0]:
            return self._finish(seg, seg.played_ms, interrupted=False)
        return []

    def interrupted(self) -> None:
        """The bot sent `utterance.interrupt`: every segment so far is cut by it (audio sent
        after this belongs to a new segment)."""
        self._interrupts += 1
        for seg in self._segments:
            seg.ended = True
            if not seg.cut_by:
                seg.cut_by = self._interrupts

    def finish_cut(self) -> list[Change]:
        """No `input_audio.cleared` came for the interrupts sent: settle what they cut."""
        self._cleared = self._interrupts
        out: list[Change] = []
        for seg in [s for s in self._segments if s.cut_by]:
            out += self._finish(seg, seg.played_ms, interrupted=True)
        return out

    # 2. what the server said ----------------------------------------------------------------

    def on_event(self, event: Event) -> list[Change]:
        if isinstance(event, InputAudioCleared):
            out = self._on_cleared(event)
        elif isinstance(event, UtteranceStarted):
            out = self._on_started(event)
        elif isinstance(event, UtteranceEnded):
            out = self._on_ended(event)
        else:
            out = []
        return out + self.overdue()

    def _on_started(self, event: UtteranceStarted) -> list[Change]:
        if event.pts < self._cut_pts:
            return []  # an utterance from before the cut: its segment is settled
        head = self._segments[0] if self._segments else None
        if head is None:
            return []  # not this bot's audio (sent before it connected)
        head.last_event_at = self.clock()
        if not head.started:
            head.started = True
            head.playing += 1
            return [PlaybackStarted(head.number)]
        head.playing += 1  # a later part of the head, or the next segment's start: hold it
        if len(self._segments) > 1:
            self._held.append(event.pts)
        return []

    def _on_ended(self, event: UtteranceEnded) -> list[Change]:
        if event.pts <= self._cut_pts:
            return []
        head = self._segments[0] if self._segments else None
        if head is None:
            return []
        out: list[Change] = []
        if not head.started:  # its start came before this bot could see it
            head.started = True
            out.append(PlaybackStarted(head.number))
        head.played_ms += event.played_ms
        head.parts += 1
        head.playing = max(0, head.playing - 1)
        head.last_event_at = self.clock()
        self._held = [pts for pts in self._held if pts >= event.pts]  # earlier ones were its own
        if event.interrupted or (head.ended and head.accounted()):
            out += self._finish(head, head.played_ms, event.interrupted)
        return out

    def _on_cleared(self, event: InputAudioCleared) -> list[Change]:
        self._cleared += 1
        self._cut_pts = max(self._cut_pts, event.pts)
        self._held.clear()
        cut = [s for s in self._segments if s.cut_by and s.cut_by <= self._cleared]
        out: list[Change] = []
        for i, seg in enumerate(cut):
            # the server reports the utterance that was playing (or next): the oldest one cut
            played = seg.played_ms + (event.played_ms if i == 0 and event.utterance_id else 0)
            if played > 0 and not seg.started:
                seg.started = True
                out.append(PlaybackStarted(seg.number))
            out += self._finish(seg, played, interrupted=True)
        return out

    def overdue(self) -> list[Change]:
        """The safety net (see the module); `on_event` runs it on every event."""
        head = self._segments[0] if self._segments else None
        if (head is None or not head.ended or not head.parts or head.playing or head.cut_by
                or self.clock() - head.last_event_at < self.overdue_s):
            return []
        return self._finish(head, head.played_ms, interrupted=False)

    def _finish(self, seg: Segment, played_ms: float, interrupted: bool) -> list[Change]:
        self._segments.remove(seg)
        out: list[Change] = [PlaybackFinished(seg.number, played_ms, interrupted)]
        head = self._segments[0] if self._segments else None
        if head is not None and not head.started and self._held:
            head.started = True  # a held start at or after the finished one's end is its
            head.playing += 1
            head.last_event_at = self.clock()
            out.append(PlaybackStarted(head.number))
        self._held.clear()
        return out
