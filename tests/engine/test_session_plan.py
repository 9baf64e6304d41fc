"""The block-boundary rule (engine.session_plan): seeks, tier changes and the sink refresh."""

from __future__ import annotations

import pytest

from engine.session_plan import SessionSchedule, Tier


def plans(s: SessionSchedule, n: int) -> list:
    return [s.plan() for _ in range(n)]


def test_a_plain_session_refreshes_at_block_4_and_never_again() -> None:
    s = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    out = plans(s, 12)
    assert [p.index for p in out] == list(range(12))
    assert [p.index for p in out if p.capture] == [0]
    assert [(p.index, p.refresh_from) for p in out if p.refresh_from is not None] == [(4, 0)]
    assert not any(p.cut or p.resize or p.new_steps for p in out)


def test_a_seek_over_the_refresh_block_does_not_lose_the_refresh() -> None:
    s = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    plans(s, 3)  # blocks 0-2; block 0's latent is kept
    s.seek(10)  # jumps over block 4: a new segment, which keeps its own first latent
    out = plans(s, 6)
    assert out[0].index == 10 and out[0].cut and out[0].capture
    assert [(p.index, p.refresh_from) for p in out if p.refresh_from is not None] == [(14, 10)]
    assert not any(p.cut for p in out[1:])


def test_once_refreshed_a_seek_keeps_the_sink() -> None:
    s = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    plans(s, 6)
    s.seek(20)
    out = plans(s, 8)
    assert out[0].cut and not any(p.capture or p.refresh_from is not None for p in out)


def test_a_fresh_session_started_at_n_is_a_seek_before_the_first_block() -> None:
    a = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    plans(a, 2)
    a.seek(9)
    b = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    b.seek(9)
    assert plans(a, 7) == plans(b, 7)


def test_tier_changes() -> None:
    s = SessionSchedule(Tier("704*384", 4), refresh_after=4)
    plans(s, 6)  # refreshed at 4
    assert s.set_tier(steps=3)
    p = s.plan()
    assert p.new_steps and not p.resize and not p.cut and p.tier == Tier("704*384", 3)
    assert p.generation == 0 and p.refresh_from is None and not p.capture  # the sink stays
    assert not s.set_tier(size="704x384")  # the same area is the same size
    assert s.set_tier(size="448*256", steps=4)
    p = s.plan()
    assert p.resize and p.new_steps and p.generation == 1 and p.capture  # re-made: refreshes
    out = plans(s, 4)
    assert [(q.index, q.refresh_from) for q in out if q.refresh_from is not None] == [(11, 7)]
    assert not s.set_tier()


def test_refresh_off_and_bad_moves() -> None:
    s = SessionSchedule(Tier("704*384", 4), refresh_after=0)
    assert not any(p.capture or p.refresh_from is not None for p in plans(s, 10))
    with pytest.raises(ValueError, match="cannot seek back"):
        s.seek(3)
    s.seek(10)  # the next block already: nothing happens
    assert not s.plan().cut
    with pytest.raises(ValueError, match="steps=-1"):
        s.set_tier(steps=-1)
