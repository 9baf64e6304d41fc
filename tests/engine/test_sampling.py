"""The flow-matching schedule is derived from steps and shift, matching diffusers' values."""

from __future__ import annotations

import pytest

from engine.sampling import FlowSchedule


def test_four_steps_shift_three() -> None:
    s = FlowSchedule.make(4, 3.0)
    assert s.sigmas == pytest.approx([1.0, 0.85769, 0.60215, 0.00893, 0.0], abs=5e-6)
    assert [round(s.timestep(i), 2) for i in range(4)] == [1000.0, 857.69, 602.15, 8.93]


def test_three_steps_shift_three() -> None:
    assert FlowSchedule.make(3, 3.0).sigmas == pytest.approx([1.0, 0.75112, 0.00893, 0.0],
                                                             abs=5e-6)


def test_euler_deltas_telescope_to_minus_one() -> None:
    s = FlowSchedule.make(4, 3.0)
    assert sum(s.delta(i) for i in range(s.steps)) == pytest.approx(-1.0)


@pytest.mark.parametrize("steps, shift", [(0, 3.0), (4, 0.0)])
def test_bad_schedules(steps: int, shift: float) -> None:
    with pytest.raises(ValueError):
        FlowSchedule.make(steps, shift)
