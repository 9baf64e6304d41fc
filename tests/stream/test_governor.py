"""The governor on recorded traces: it steps down fast, back up after sustained headroom, and
does not oscillate on noise.

A trace is the per-block compute time an engine would report at each generation tier. The
engine here costs c0 x (area / area0)^1.1 x steps / 4 seconds per block (a little superlinear in
the area, so the governor's linear cost model is slightly wrong, as a real one would be), times
a slowness factor that changes over the trace, with log-normal noise from a fixed seed: the same
trace every run.
"""

from __future__ import annotations

import numpy as np
import pytest

from stream.governor import (
    DEFAULT_GENERATION_LADDER,
    DEFAULT_OUTPUT_LADDER,
    BlockReport,
    DelayConfig,
    GenerationConfig,
    GenerationGovernor,
    GenerationTier,
    OutputGovernor,
    PlayoutDelay,
    ViewerReport,
    ladder_from,
)

TOP = DEFAULT_GENERATION_LADDER[0]


def engine_cost(tier: GenerationTier, slowness: float) -> float:
    """Seconds per block: 0.48 s at the top tier when slowness is 1 (exactly real time)."""
    return 0.48 * slowness * (tier.area / TOP.area) ** 1.1 * tier.steps / 4


def run(gov: GenerationGovernor, slowness: list[float], noise: float = 0.0,
        seed: int = 0) -> list[int]:
    """Feed one report per block; returns the rung index each block ran at."""
    rng = np.random.default_rng(seed)
    rungs, setup = [], False
    for s in slowness:
        rungs.append(gov.index)
        cost = engine_cost(gov.tier, s) * float(rng.lognormal(0.0, noise)) if noise else \
            engine_cost(gov.tier, s)
        setup = gov.observe(BlockReport(cost, setup=setup)) is not None
    return rungs


def test_steps_down_within_two_blocks_to_a_rung_that_fits() -> None:
    gov = GenerationGovernor(DEFAULT_GENERATION_LADDER)
    rungs = run(gov, [2.0] * 60)  # the engine is 2x slower than real time at 704x384
    first = rungs.index(next(r for r in rungs if r != 0))
    assert first <= 2, rungs[:6]  # decided after block 1 (2 bad blocks), applied at block 2
    assert engine_cost(DEFAULT_GENERATION_LADDER[rungs[2]], 2.0) < 0.48  # real time at once
    # one jump down to the first rung predicted to fit; at most one careful step back up to a
    # rung that also fits; then it stays
    assert len(gov.changes) <= 2, [c.reason for c in gov.changes]
    assert all(engine_cost(DEFAULT_GENERATION_LADDER[r], 2.0) < 0.48 for r in rungs[2:])
    assert len(set(rungs[30:])) == 1


def test_steps_back_up_after_sustained_headroom() -> None:
    cfg = GenerationConfig()
    gov = GenerationGovernor(DEFAULT_GENERATION_LADDER, cfg)
    slow, fast = [2.0] * 50, [0.5] * 400  # a co-tenant leaves: the engine gets 4x faster
    rungs = run(gov, slow + fast)
    assert rungs[49] > 0
    assert rungs[-1] == 0, [c.reason for c in gov.changes]  # back at the top
    # each step up waited for sustained headroom
    ups = [i for i in range(51, len(rungs)) if rungs[i] < rungs[i - 1]]
    assert ups and all(b - a >= cfg.up_blocks for a, b in zip([50, *ups], ups, strict=False))
    # never went above what fits: the top rung is at load 0.5 in the fast phase
    assert all(engine_cost(DEFAULT_GENERATION_LADDER[r], 0.5) < 0.48 for r in rungs[60:])


def test_no_oscillation_on_a_noisy_trace() -> None:
    # the top rung is just too slow on average (load 1.05), the next one fits (0.95^...)
    gov = GenerationGovernor(DEFAULT_GENERATION_LADDER)
    rungs = run(gov, [1.05] * 1000, noise=0.15, seed=3)
    assert len(gov.changes) <= 3, [c.reason for c in gov.changes]
    assert rungs[-1] != 0
    # and a rung that fits with noise around it is kept for the whole trace
    gov = GenerationGovernor(DEFAULT_GENERATION_LADDER)
    rungs = run(gov, [0.75] * 1000, noise=0.15, seed=4)
    assert len(gov.changes) <= 2, [c.reason for c in gov.changes]


def test_failed_probes_back_off() -> None:
    # a rung whose cost the model under-predicts: every probe up fails, and probes get rarer
    cfg = GenerationConfig(up_blocks=10)
    ladder = (GenerationTier("704*384", 4), GenerationTier("576*320", 4))
    gov = GenerationGovernor(ladder, cfg, start=1)

    def cost(tier: GenerationTier) -> float:
        return 0.25 if tier == ladder[1] else 0.6  # the top costs 2.4x, the model says 1.47x

    setup, probe_times = False, []
    for block in range(600):
        change = gov.observe(BlockReport(cost(gov.tier), setup=setup))
        setup = change is not None
        if change is not None and change.new < change.old:
            probe_times.append(block)
    assert len(probe_times) >= 3 and len(gov.changes) <= 2 * len(probe_times)
    # the waits between probes double, up to the cap (600 blocks hold 6 of them, not 50)
    gaps = [b - a for a, b in zip(probe_times, probe_times[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] >= 6 * gaps[0], gaps
    assert gaps[-1] <= cfg.up_blocks * cfg.max_backoff + 10, gaps


def test_latency_over_target_steps_down() -> None:
    # the engine keeps up (load 0.63) but frames reach the viewer too late: step down anyway
    gov = GenerationGovernor(DEFAULT_GENERATION_LADDER, GenerationConfig(latency_target_s=1.0))
    changes = [gov.observe(BlockReport(0.3, latency_s=1.4)) for _ in range(2)]
    assert changes[0] is None and changes[1] is not None and gov.index > 0
    assert "latency" in changes[1].reason


def test_ladder_starts_at_the_requested_size() -> None:
    rungs = ladder_from(DEFAULT_GENERATION_LADDER, "576*320")
    assert [str(t) for t in rungs] == ["576x320/4 steps", "448x256/4 steps", "448x256/3 steps"]
    with pytest.raises(ValueError):
        GenerationConfig(up_load=0.9, fit_load=0.8)


def feed(gov: OutputGovernor, estimates: list[float], loss: float = 0.0) -> list[int]:
    out = []
    for e in estimates:
        out.append(gov.index)
        gov.observe(ViewerReport(estimate_kbps=e, loss=loss))
    return out


def test_output_variant_follows_the_viewers_path() -> None:
    limited = OutputGovernor(DEFAULT_OUTPUT_LADDER)
    rungs = feed(limited, [500.0] * 30)  # a 500 kbit/s path
    assert rungs.index(next(r for r in rungs if r)) <= 2
    assert limited.variant.bitrate_kbps <= 500 * 0.85
    assert limited.variant == DEFAULT_OUTPUT_LADDER[2]
    clean = OutputGovernor(DEFAULT_OUTPUT_LADDER)
    feed(clean, [5000.0] * 30)
    assert clean.index == 0 and not clean.changes
    lossy = OutputGovernor(DEFAULT_OUTPUT_LADDER)
    feed(lossy, [5000.0] * 5, loss=0.2)
    assert lossy.index > 0


def test_output_variant_does_not_oscillate_and_recovers() -> None:
    rng = np.random.default_rng(7)
    gov = OutputGovernor(DEFAULT_OUTPUT_LADDER)
    noisy = list(1100 + 250 * rng.standard_normal(400))  # around the top rung's need
    feed(gov, noisy)
    assert len(gov.changes) <= 4, [c.reason for c in gov.changes]
    feed(gov, [6000.0] * 200)
    assert gov.index == 0


def test_playout_delay_grows_at_once_and_shrinks_only_at_pauses() -> None:
    d = PlayoutDelay(0.6, DelayConfig(min_s=0.3, max_s=2.0, margin_s=0.1))
    assert d.observe(0.4, can_shrink=False) == pytest.approx(0.6)
    assert d.observe(1.1, can_shrink=False) == pytest.approx(1.2)  # a slow block: at once
    assert d.observe(0.9, can_shrink=False) == pytest.approx(1.2)  # no shrinking mid-word
    for _ in range(30):
        d.observe(0.3, can_shrink=False)
    assert d.delay_s == pytest.approx(1.2)
    steps = [d.observe(0.3, can_shrink=True) for _ in range(40)]
    assert all(a - b <= 0.02 + 1e-9 for a, b in zip([1.2, *steps], steps, strict=False))
    assert steps[-1] == pytest.approx(0.4)  # the lag plus margin, not below
    assert d.observe(5.0, can_shrink=False) == pytest.approx(2.0)  # bounded
