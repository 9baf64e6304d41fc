"""The latency governor: pure, deterministic decisions from measurements. No I/O, no clock.

It keeps a conversation's latency bounded by trading picture for time, at two levels:

- `GenerationGovernor` (one per session) picks the generation tier, a rung of a ladder such as
  704x384 -> 576x320 -> 448x256 at 4 steps -> 448x256 at 3 steps, from each block's compute time
  against its budget (0.48 s of media per block, shared by the sessions of one engine), how late
  the block's frames were, and the measured latency. It steps down fast (after `down_blocks`
  bad blocks, or one block far over budget, straight to the first rung predicted to fit) and
  up slowly (after `up_blocks` good
  blocks, and only if the rung above is predicted to fit with margin). A step up that has to be
  undone within `probe_blocks` doubles the wait before that rung is tried again, so a noisy
  trace cannot make it oscillate. Changes take effect at a block boundary (a new size re-prefills
  the sink: the block that pays for it is reported with `setup=True` and not counted as cost).
- `OutputGovernor` (one per viewer) picks the output variant (encoder size, frame rate, bitrate)
  from the viewer's feedback: the bandwidth estimate (REMB or transport-wide CC), packet loss,
  RTT and the depth of its send queue, with the same hysteresis and back-off.
- `PlayoutDelay` turns the measured lateness of blocks into the playout delay a session should
  use: it grows at once when frames would miss their presentation time and shrinks slowly, and
  only where the caller can shrink without cutting audio (at a pause).

The cost of another rung is predicted from the current rung's measured cost through a cost model:
work proportional to steps x area ** `area_exponent` (1.0 by default: on an H200 the DiT step
and the VAE decode both scale about linearly with the area between 448x256 and 704x384). Where
the model is wrong, a failed probe up costs a few blocks and makes the next one rarer.
Everything here is a plain function of the samples fed in: the same trace gives the same
decisions, which is how it is tested (tests/stream/test_governor.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

BLOCK_SECONDS = 0.48  # 12 frames at 25 fps (engine.api.BLOCK_SECONDS; kept literal: no import)


# 1. Ladders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationTier:
    """One rung of the generation ladder: a pixel-area budget "W*H" and the denoising steps."""

    size: str
    steps: int

    @property
    def area(self) -> int:
        w, h = (int(p) for p in self.size.lower().replace("x", "*").split("*"))
        return w * h

    def work(self, area_exponent: float = 1.0) -> float:
        """Relative cost (the cost model): steps x pixel area ** exponent."""
        return float(self.steps * self.area ** area_exponent)

    def __str__(self) -> str:
        return f"{self.size.replace('*', 'x')}/{self.steps} steps"


@dataclass(frozen=True)
class OutputVariant:
    """One rung of the output ladder: what the encoder makes for a viewer."""

    width: int
    height: int
    fps: float
    bitrate_kbps: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}@{self.fps:g}"


DEFAULT_GENERATION_LADDER = (
    GenerationTier("704*384", 4), GenerationTier("576*320", 4), GenerationTier("448*256", 4),
    GenerationTier("448*256", 3))
DEFAULT_OUTPUT_LADDER = (
    OutputVariant(704, 384, 25, 1500), OutputVariant(512, 288, 25, 800),
    OutputVariant(352, 192, 25, 350), OutputVariant(352, 192, 12.5, 200))


def ladder_from(ladder: tuple[GenerationTier, ...], size: str,
                steps: int | None = None) -> tuple[GenerationTier, ...]:
    """The rungs below a session's requested tier (its first rung is the request): no larger
    area, no more steps, and not the request itself. `steps` None: the ladder's first."""
    start = GenerationTier(size, steps or (ladder[0].steps if ladder else 4))
    below = tuple(t for t in ladder if t.area <= start.area and t.steps <= start.steps
                  and (t.area, t.steps) != (start.area, start.steps))
    return (start, *below)


# 2. Generation tier -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """Thresholds of the generation governor (loads are compute / budget)."""

    latency_target_s: float = 1.5
    down_load: float = 0.95  # a block above this load is a bad block
    fit_load: float = 0.80  # a rung is predicted to fit below this load
    up_load: float = 0.65  # a good block: the current rung runs below this load
    late_s: float = 0.04  # frames later than this (one frame) make a block bad
    down_blocks: int = 2  # consecutive bad blocks before stepping down
    down_now_load: float = 1.5  # a block this far over budget steps down at once (not noise)
    up_blocks: int = 20  # consecutive good blocks before trying a rung up
    probe_blocks: int = 30  # a rung given up within this many blocks of reaching it failed
    max_backoff: int = 16  # the longest wait is up_blocks x this
    smoothing: float = 0.3  # EWMA weight of the newest cost sample
    area_exponent: float = 1.0  # of the cost model: cost ~ steps x area ** this

    def __post_init__(self) -> None:
        if not 0 < self.up_load < self.fit_load < self.down_load <= self.down_now_load:
            raise ValueError(f"need 0 < up_load ({self.up_load}) < fit_load ({self.fit_load}) "
                             f"< down_load ({self.down_load}) <= down_now_load "
                             f"({self.down_now_load})")
        if self.down_blocks < 1 or self.up_blocks < 1 or self.probe_blocks < 1:
            raise ValueError("down_blocks, up_blocks and probe_blocks must be >= 1")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing={self.smoothing}: accepted (0, 1]")


@dataclass(frozen=True)
class BlockReport:
    """What one generated block tells the governor.

    compute_s: engine time spent on the block; budget_s: the engine time this session may
    spend per block (0.48 s divided among the sessions sharing the engine); late_s: how late
    the block's first frame was for its presentation time (<= 0: on time); latency_s: measured
    audio-in to frame-presented latency, if known; setup: the block paid for a tier change
    (sink re-prefill), so its compute time is not a cost sample.
    """

    compute_s: float
    budget_s: float = BLOCK_SECONDS
    late_s: float = 0.0
    latency_s: float | None = None
    setup: bool = False


@dataclass(frozen=True)
class TierChange:
    """A decision: move from rung `old` to rung `new` (indices into the ladder), and why."""

    old: int
    new: int
    reason: str


@dataclass
class _Rung:
    cost: float | None = None  # EWMA of measured seconds per block, while here
    backoff: int = 1  # multiplier of up_blocks before trying this rung again


class GenerationGovernor:
    """Per-session generation tier. Feed `observe` one report per block; apply what it returns
    at the next block boundary (then the next report should carry `setup=True`)."""

    def __init__(self, ladder: tuple[GenerationTier, ...],
                 config: GenerationConfig | None = None, start: int = 0):
        if not ladder:
            raise ValueError("the generation ladder is empty")
        self.ladder = ladder
        self.cfg = config or GenerationConfig()
        self.index = start
        self._rungs = [_Rung() for _ in ladder]
        self._bad = 0
        self._good = 0
        self._blocks_here = 0
        self._came_up = False
        self.changes: list[TierChange] = []

    @property
    def tier(self) -> GenerationTier:
        return self.ladder[self.index]

    def predicted_cost(self, j: int) -> float | None:
        """Seconds per block rung j would take now, from the current rung's measured cost."""
        here = self._rungs[self.index].cost
        if here is None:
            return None
        e = self.cfg.area_exponent
        return here * self.ladder[j].work(e) / self.ladder[self.index].work(e)

    def observe(self, r: BlockReport) -> TierChange | None:
        cfg = self.cfg
        rung = self._rungs[self.index]
        self._blocks_here += 1
        if not r.setup:
            rung.cost = r.compute_s if rung.cost is None else (
                cfg.smoothing * r.compute_s + (1 - cfg.smoothing) * rung.cost)
        if rung.cost is None:
            return None
        load = rung.cost / r.budget_s
        latency_bad = r.latency_s is not None and r.latency_s > cfg.latency_target_s
        bad = (not r.setup) and (load > cfg.down_load or r.late_s > cfg.late_s or latency_bad)
        good = (not r.setup) and load < cfg.up_load and r.late_s <= 0 and not latency_bad
        self._bad = self._bad + 1 if bad else 0
        self._good = self._good + 1 if good else 0
        at_once = bad and load > cfg.down_now_load
        if (self._bad >= cfg.down_blocks or at_once) and self.index < len(self.ladder) - 1:
            why = (f"load {load:.2f} over {cfg.down_load:.2f}" if at_once or not (
                latency_bad or r.late_s > cfg.late_s) else
                f"latency {r.latency_s:.2f} s over {cfg.latency_target_s:.2f} s"
                if latency_bad else f"frames {r.late_s * 1000:.0f} ms late")
            return self._step_down(r.budget_s, f"{why} for {self._bad} blocks")
        if self.index > 0 and self._good >= cfg.up_blocks * self._rungs[self.index - 1].backoff:
            above = self.predicted_cost(self.index - 1)
            if above is not None and above / r.budget_s < cfg.fit_load:
                return self._move(self.index - 1, f"headroom: load {load:.2f}, "
                                  f"{self.ladder[self.index - 1]} predicted at "
                                  f"{above / r.budget_s:.2f}")
        return None

    def _step_down(self, budget: float, reason: str) -> TierChange:
        if self._came_up and self._blocks_here <= self.cfg.probe_blocks:
            # the probe up failed: wait longer before trying this rung again
            self._rungs[self.index].backoff = min(self._rungs[self.index].backoff * 2,
                                                  self.cfg.max_backoff)
        target = len(self.ladder) - 1
        for j in range(self.index + 1, len(self.ladder)):
            cost = self.predicted_cost(j)
            if cost is not None and cost / budget < self.cfg.fit_load:
                target = j
                break
        return self._move(target, reason)

    def _move(self, j: int, reason: str) -> TierChange:
        change = TierChange(self.index, j, f"{self.ladder[self.index]} -> {self.ladder[j]}: "
                            f"{reason}")
        if j > self.index and self._blocks_here > self.cfg.probe_blocks:
            self._rungs[self.index].backoff = 1  # it held for a while: forgive the rung
        self._came_up = j < self.index
        self.index = j
        self._rungs[j].cost = None  # measured afresh: conditions may have changed since
        self._bad = self._good = self._blocks_here = 0
        self.changes.append(change)
        return change


# 3. Output variant ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputConfig:
    headroom: float = 0.85  # a variant fits if its bitrate <= estimate x headroom
    up_margin: float = 1.3  # ...and we go up only if the estimate is this much above it
    loss_down: float = 0.08  # loss fraction that makes a report bad
    loss_up: float = 0.02  # at most this loss for a good report
    queue_frames: int = 6  # a send queue deeper than this makes a report bad
    down_reports: int = 2
    up_reports: int = 10
    probe_reports: int = 15
    max_backoff: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.headroom <= 1 or self.up_margin < 1:
            raise ValueError("need 0 < headroom <= 1 and up_margin >= 1")
        if not 0 <= self.loss_up < self.loss_down <= 1:
            raise ValueError("need 0 <= loss_up < loss_down <= 1")


@dataclass(frozen=True)
class ViewerReport:
    """A viewer's feedback (one per RTCP report or stats tick)."""

    estimate_kbps: float | None = None  # REMB / TWCC bandwidth estimate
    loss: float = 0.0  # fraction lost since the last report
    rtt_s: float | None = None
    queue_frames: int = 0  # frames waiting in this viewer's send queue


class OutputGovernor:
    """Per-viewer output variant: the highest rung that fits the viewer's path."""

    def __init__(self, ladder: tuple[OutputVariant, ...], config: OutputConfig | None = None,
                 start: int = 0):
        if not ladder:
            raise ValueError("the output ladder is empty")
        self.ladder = ladder
        self.cfg = config or OutputConfig()
        self.index = start
        self._bad = self._good = self._here = 0
        self._came_up = False
        self._backoff = [1] * len(ladder)
        self.changes: list[TierChange] = []

    @property
    def variant(self) -> OutputVariant:
        return self.ladder[self.index]

    def _fits(self, j: int, estimate: float | None, margin: float = 1.0) -> bool:
        if estimate is None:
            return True
        return self.ladder[j].bitrate_kbps * margin <= estimate * self.cfg.headroom

    def observe(self, r: ViewerReport) -> TierChange | None:
        cfg = self.cfg
        self._here += 1
        bad = (not self._fits(self.index, r.estimate_kbps) or r.loss > cfg.loss_down
               or r.queue_frames > cfg.queue_frames)
        good = (r.loss <= cfg.loss_up and r.queue_frames <= cfg.queue_frames // 2
                and self.index > 0 and self._fits(self.index - 1, r.estimate_kbps,
                                                  cfg.up_margin))
        self._bad = self._bad + 1 if bad else 0
        self._good = self._good + 1 if good else 0
        if self._bad >= cfg.down_reports and self.index < len(self.ladder) - 1:
            if self._came_up and self._here <= cfg.probe_reports:
                self._backoff[self.index] = min(self._backoff[self.index] * 2, cfg.max_backoff)
            target = next((j for j in range(self.index + 1, len(self.ladder))
                           if self._fits(j, r.estimate_kbps)), len(self.ladder) - 1)
            why = (f"estimate {r.estimate_kbps:.0f} kbit/s" if r.estimate_kbps is not None
                   else "no estimate")
            return self._move(target, f"{why}, loss {r.loss:.0%}, queue {r.queue_frames}")
        if self.index > 0 and self._good >= cfg.up_reports * self._backoff[self.index - 1]:
            return self._move(self.index - 1, f"estimate {r.estimate_kbps} kbit/s fits "
                              f"{self.ladder[self.index - 1].name} with margin")
        return None

    def _move(self, j: int, reason: str) -> TierChange:
        change = TierChange(self.index, j, f"{self.ladder[self.index].name} -> "
                            f"{self.ladder[j].name}: {reason}")
        if j > self.index and self._here > self.cfg.probe_reports:
            self._backoff[self.index] = 1
        self._came_up = j < self.index
        self.index = j
        self._bad = self._good = self._here = 0
        self.changes.append(change)
        return change


# 4. Playout delay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DelayConfig:
    min_s: float = 0.3
    max_s: float = 3.0
    margin_s: float = 0.1  # kept above the worst recent lateness
    window: int = 25  # blocks of history (12 s)
    shrink_per_block_s: float = 0.02  # at most this much shorter per block, and only at pauses

    def __post_init__(self) -> None:
        if not 0 <= self.min_s <= self.max_s:
            raise ValueError(f"need 0 <= min_s ({self.min_s}) <= max_s ({self.max_s})")


@dataclass
class PlayoutDelay:
    """The playout delay a session should use, from how late its blocks are ready.

    `ready_lag_s` of a block: the time from its media start to the moment its frames exist
    (frames of media time t are shown at t0 + delay + t, so any lag above delay is a freeze).
    Grows at once to the worst recent lag plus margin; shrinks by at most
    `shrink_per_block_s` per block, and only when `can_shrink` (the audio is at a pause).
    """

    delay_s: float
    cfg: DelayConfig = field(default_factory=DelayConfig)
    _lags: deque[float] = field(default_factory=deque)

    def forget(self) -> None:
        """The pipeline changed (a new generation tier): the lags measured before it say
        nothing of what comes; the delay stays where it is until new ones come in."""
        self._lags.clear()

    def observe(self, ready_lag_s: float, can_shrink: bool) -> float:
        self._lags.append(ready_lag_s)
        while len(self._lags) > self.cfg.window:
            self._lags.popleft()
        want = min(self.cfg.max_s, max(self.cfg.min_s, max(self._lags) + self.cfg.margin_s))
        if want > self.delay_s:
            self.delay_s = want
        elif can_shrink and want < self.delay_s:
            self.delay_s = max(want, self.delay_s - self.cfg.shrink_per_block_s)
        return self.delay_s
