"""Capacity from the engine's measured block cost: what a session will cost, and how many fit.

The engine times a block when it starts (`engine.api.engine_block_cost`: the preview's cost
model, or a warm-up session of the Wan engine at max_size). Any other tier's cost is predicted
from it with the governor's cost model (steps x area, stream/governor.py). A session costs, as a
share of real time, its tier's block time / 0.48 s; with the generation governor on, a session
may go down to its ladder's cheapest rung, so that is what admission counts (the governor then
finds the best rung that fits the load). Admission stops at the runtime's `max_load` of real
time; the first session is refused too when even its cheapest rung does not fit.
"""

from __future__ import annotations

from typing import Any

from engine.api import BLOCK_SECONDS, BlockCost
from stream.governor import GenerationTier, ladder_from


def predicted_seconds(cost: BlockCost, tier: GenerationTier) -> float:
    """Seconds a block takes at `tier`, from the measured `cost`."""
    return cost.seconds * tier.work() / GenerationTier(cost.size, cost.steps).work()


def session_ladder(ladder: tuple[GenerationTier, ...], size: str, steps: int,
                   governed: bool) -> tuple[GenerationTier, ...]:
    """The rungs a session asking for `size` at `steps` may run at."""
    rungs = ladder_from(ladder, size, steps)
    return rungs if governed else rungs[:1]


def session_load(cost: BlockCost, rungs: tuple[GenerationTier, ...]) -> float:
    """The share of real time a session costs at the cheapest of its rungs."""
    return predicted_seconds(cost, rungs[-1]) / BLOCK_SECONDS


def capacity(cost: BlockCost | None, rungs: tuple[GenerationTier, ...], load: float,
             max_load: float, free_slots: int) -> dict[str, Any]:
    """/readyz's account: per rung, its predicted block time and how many more sessions at that
    rung fit beside the load running now; `sessions`: how many more can be admitted (at the
    cheapest rung), None when the engine measured nothing (then only the slots count)."""
    if cost is None:
        return {"sessions": free_slots, "measured": None, "tiers": []}
    tiers = []
    for tier in rungs:
        seconds = predicted_seconds(cost, tier)
        fit = int(max(0.0, max_load - load) // (seconds / BLOCK_SECONDS)) if seconds > 0 \
            else free_slots
        tiers.append({"tier": str(tier), "block_ms": round(seconds * 1000),
                      "load": round(seconds / BLOCK_SECONDS, 3), "sessions": min(fit, free_slots)})
    return {"sessions": tiers[-1]["sessions"] if tiers else free_slots,
            "measured": {"tier": str(GenerationTier(cost.size, cost.steps)),
                         "block_ms": round(cost.seconds * 1000), "source": cost.source},
            "tiers": tiers}
