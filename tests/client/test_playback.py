"""PlaybackTracker: segments (what a framework calls one piece of speech) against the server's
utterance events, in the orders the server really produces them (stream/media/utterances.py)."""

from __future__ import annotations

from typing import Any

from avatar_client import InputAudioCleared, UtteranceEnded, UtteranceStarted, parse_event
from avatar_client.playback import PlaybackFinished, PlaybackStarted, PlaybackTracker


def started(n: int, pts: int) -> UtteranceStarted:
    return _event("utterance.started", pts, utterance_id=f"utt_{n}", t_first_frame_ms=1000)


def ended(n: int, pts: int, played: int, interrupted: bool = False) -> UtteranceEnded:
    return _event("utterance.ended", pts, utterance_id=f"utt_{n}", played_ms=played,
                  interrupted=interrupted)


def cleared(pts: int, played: int, n: int | None) -> InputAudioCleared:
    return _event("input_audio.cleared", pts, utterance_id=f"utt_{n}" if n else None,
                  played_ms=played, dropped_ms=0, client_event_id="interrupt-1")


def _event(kind: str, pts: int, **fields: Any) -> Any:
    return parse_event({"type": kind, "event_id": "e", "seq": 1, "pts": pts, **fields})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_segment_one_utterance() -> None:
    t = PlaybackTracker()
    t.sent(1000)
    t.sent(500)
    assert t.end() == []
    assert t.on_event(started(1, 2000)) == [PlaybackStarted(1)]
    assert t.pending
    assert t.on_event(ended(1, 3500, 1500)) == [PlaybackFinished(1, 1500, False)]
    assert not t.pending


def test_a_segment_split_by_an_under_run_finishes_after_its_last_part() -> None:
    # the bot sent 700 ms, paused so long the avatar fell silent (utt_1 ends), then 800 ms more
    t = PlaybackTracker()
    t.sent(700)
    assert t.on_event(started(1, 1000)) == [PlaybackStarted(1)]
    assert t.on_event(ended(1, 1700, 700)) == []  # not ended by the bot: more may come
    t.sent(800)
    assert t.end() == []
    assert t.on_event(started(2, 4000)) == []  # a later part of the same segment
    assert t.on_event(ended(2, 4800, 800)) == [PlaybackFinished(1, 1500, False)]


def test_back_to_back_segments_where_the_next_start_comes_first() -> None:
    t = PlaybackTracker()
    t.sent(1000)
    t.end()
    t.sent(500)
    t.end()
    assert t.on_event(started(1, 1000)) == [PlaybackStarted(1)]
    # the same tick: utt_2 starts at utt_1's end and its started event is emitted first
    assert t.on_event(started(2, 2000)) == []
    assert t.on_event(ended(1, 2000, 1000)) == [PlaybackFinished(1, 1000, False),
                                                PlaybackStarted(2)]
    assert t.on_event(ended(2, 2500, 500)) == [PlaybackFinished(2, 500, False)]


def test_the_end_may_come_after_the_server_played_everything() -> None:
    t = PlaybackTracker()
    t.sent(400)
    t.on_event(started(1, 0))
    assert t.on_event(ended(1, 400, 400)) == []  # the bot's end is still on its way
    assert t.end() == [PlaybackFinished(1, 400, False)]


def test_an_interrupt_finishes_at_the_cleared_event_and_later_events_are_ignored() -> None:
    t = PlaybackTracker()
    t.sent(6000)
    t.on_event(started(1, 1000))
    t.interrupted()
    t.sent(300)  # the next reply, sent before the cut was placed: a new segment
    assert t.on_event(cleared(2600, 1600, 1)) == [PlaybackFinished(1, 1600, True)]
    # the cut utterance ends when its cut is played: already reported
    assert t.on_event(ended(1, 2600, 1600, interrupted=True)) == []
    t.end()
    assert t.on_event(started(2, 2600)) == [PlaybackStarted(2)]
    assert t.on_event(ended(2, 2900, 300)) == [PlaybackFinished(2, 300, False)]


def test_an_interrupt_with_queued_segments_and_one_with_nothing_playing() -> None:
    t = PlaybackTracker()
    t.sent(2000)
    t.end()
    t.sent(1000)  # queued behind the first
    t.on_event(started(1, 0))
    t.interrupted()
    assert t.on_event(cleared(900, 900, 1)) == [PlaybackFinished(1, 900, True),
                                                 PlaybackFinished(2, 0, True)]
    t.interrupted()  # nothing pending: the server acknowledges at once
    assert t.on_event(cleared(950, 0, None)) == []
    assert not t.pending


def test_a_lost_interrupt_answer_is_settled_by_the_caller() -> None:
    t = PlaybackTracker()
    t.sent(1000)
    t.on_event(started(1, 0))
    t.interrupted()
    assert t.finish_cut() == [PlaybackFinished(1, 0, True)]


def test_events_of_audio_this_bot_did_not_send_are_ignored() -> None:
    t = PlaybackTracker()
    assert t.on_event(started(7, 0)) == [] and t.on_event(ended(7, 900, 900)) == []
    assert not t.pending


def test_the_overdue_safety_net_needs_silence_for_overdue_s() -> None:
    clock = Clock()
    t = PlaybackTracker(overdue_s=5.0, clock=clock)
    t.sent(1000)
    t.end()
    t.on_event(started(1, 0))
    assert t.on_event(ended(1, 990, 990)) == []  # 10 ms short of what was sent
    clock.now = 4.0
    assert t.overdue() == []
    t.on_event(started(2, 3000))  # another part plays: never while one is playing
    clock.now = 20.0
    assert t.overdue() == []
    t.on_event(ended(2, 3005, 5))
    clock.now = 26.0
    assert t.overdue() == [PlaybackFinished(1, 995, False)]
