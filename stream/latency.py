"""A session's latency controller: the governor's decisions applied, the playout delay steered,
and every block's latency accounted for. The decisions are pure (stream/governor.py); this
module feeds them measurements and carries them out. Runs on the event loop; never blocks.

Per block the engine delivers (`on_block`), with `now` the moment its frames reached the server:

- its **generation report**: compute time (the engine's critical path, `BlockTimings.busy`;
  a tier change's set-up is not counted), the budget (0.48 s shared by the sessions of the
  engine), how late its first frame is for the presentation time the playout delay is heading
  for (lateness the delay cannot absorb: it is capped), and the latency it needs (audio
  received -> frames here, plus the margin). A change the `GenerationGovernor` decides is sent
  to the engine (applied at the next block boundary), counted in /metrics
  (`avatar_tier_changes_total{kind="generation"}`) and announced (`on_change`: the session's
  sockets get `tier.changed`, the call page's overlay shows it). Blocks still in flight at the
  old tier are not counted for the new one.
- its **ready lag** (frames here - its media start) into `PlayoutDelay`, whose delay the pacer
  follows at pauses (stream/media/pacer.py); the delay in force goes to the engine runtime,
  which skips blocks that would be done only after their frames' presentation time.
- a **latency record**: audio received -> block started -> block decoded, completed when the
  block's first frame is sent to a viewer (`frame_sent`: -> encoded -> sent). Each stage is
  observed in /metrics (`avatar_latency_seconds{stage}`) and summarised for `stats` events,
  the session info and the call page (`figures`).

"Audio received" is when the audio of the block's first frame entered the session, or its media
time if that is later (audio sent ahead of time, a bot's, waits for its time anyway; silence
generated for missing audio counts from its media time).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.api import BLOCK_SECONDS, FPS, FRAMES_PER_BLOCK, SAMPLES_PER_FRAME, FrameBlock
from engine.api import parse_area as area_of
from stream.config import LatencyConfig
from stream.governor import (
    BlockReport,
    DelayConfig,
    GenerationConfig,
    GenerationGovernor,
    GenerationTier,
    PlayoutDelay,
    TierChange,
    ladder_from,
)
from stream.media.audio_in import Arrivals
from stream.media.consumer import MediaPacket
from stream.media.pacer import FramePacer
from stream.media.timeline import MediaClock
from stream.metrics import Metrics

log = logging.getLogger(__name__)

STAGES = ("wait", "compute", "buffer", "send", "total")
RECENT_BLOCKS = 25  # the figures summarise this many recent blocks (12 s)


class EngineControl(Protocol):
    """The engine runtime, as one session's controller sees it (stream/sessions.py binds it)."""

    def set_tier(self, size: str | None, steps: int | None,
                 on_done: Callable[[BaseException | None], None]) -> None: ...

    def set_playout_delay(self, seconds: float) -> None: ...

    def sharing(self) -> int:
        """Sessions sharing the engine now (this one included)."""
        ...


@dataclass
class _Record:
    """One block's way through the server (time.monotonic() stamps)."""

    index: int
    started: float
    decoded: float


@dataclass(frozen=True)
class GenerationChange:
    """A generation-tier change, as announced: rungs before and after, why, and when."""

    previous: GenerationTier
    tier: GenerationTier
    reason: str
    at: float  # time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        return {"from": str(self.previous), "to": str(self.tier), "reason": self.reason,
                "age_s": round(time.monotonic() - self.at, 1)}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class LatencyController:
    def __init__(self, sid: str, cfg: LatencyConfig, clock: MediaClock, pacer: FramePacer,
                 arrivals: Arrivals, engine: EngineControl, metrics: Metrics | None,
                 size: str, steps: int, margin_s: float,
                 on_change: Callable[[GenerationChange], None] | None = None):
        self.sid = sid
        self.cfg = cfg
        self.clock = clock
        self.pacer = pacer
        self.arrivals = arrivals
        self.engine = engine
        self.metrics = metrics
        self.margin_s = margin_s
        self.on_change = on_change
        self.ladder = ladder_from(cfg.generation_ladder, size, steps)
        self.governor: GenerationGovernor | None = GenerationGovernor(
            self.ladder, GenerationConfig(latency_target_s=cfg.target_s,
                                          down_blocks=cfg.down_blocks,
                                          up_blocks=cfg.up_blocks)) if cfg.governor else None
        self.tier = self.ladder[0]  # what the engine generates now (after the last change)
        self.delay = PlayoutDelay(clock.delay, DelayConfig(
            min_s=min(cfg.delay_min_s, clock.delay),
            max_s=max(cfg.longest_delay_s(margin_s), clock.delay),
            margin_s=margin_s, window=max(1, round(cfg.delay_window_s / BLOCK_SECONDS)),
            shrink_per_block_s=cfg.delay_shrink_s)) if cfg.adaptive_delay else None
        self.frame_size: tuple[int, int] | None = None
        self.changes: list[GenerationChange] = []
        self.late_blocks = 0  # blocks whose first frame was late for its presentation
        self.skipped_blocks = 0  # blocks the engine skipped to stay on time
        self._last_index = -1
        self._told_delay: float | None = None
        self._records: dict[int, _Record] = {}
        self._recent: deque[dict[str, float]] = deque(maxlen=RECENT_BLOCKS)
        self._needed: deque[float] = deque(maxlen=RECENT_BLOCKS)
        self.tell_delay()

    # 1. blocks -------------------------------------------------------------------------------

    def audio_at(self, frame: int) -> float:
        """When the audio of video frame `frame` was received and due (see the module doc)."""
        due = self.clock.t0 + frame / FPS
        arrived = self.arrivals.at(frame * SAMPLES_PER_FRAME)
        return due if arrived is None else max(arrived, due)

    def on_block(self, block: FrameBlock, now: float) -> None:
        if block.index > self._last_index + 1 and self._last_index >= 0:
            self.skipped_blocks += block.index - self._last_index - 1
        self._last_index = max(self._last_index, block.index)
        self.frame_size = block.size
        media_start = block.first_frame / FPS
        heard = self.audio_at(block.first_frame)
        late = now - self.clock.wall_for(media_start)
        self.late_blocks += late > 0
        started = now - block.timings.total if block.timings.total > 0 else now
        self._records[block.index] = _Record(block.index, started, now)
        for old in [i for i in self._records if i < block.index - 2 * RECENT_BLOCKS]:
            del self._records[old]  # never sent (nobody watching): forget
        needed = now - heard + self.margin_s  # the latency this block needs
        self._needed.append(needed)
        # a block made at the tier before the last change, or paying for the change, says
        # nothing about the pipeline from now on
        current = not block.timings.setup and self._at_current_tier(block)
        if self.delay is not None and current:
            target = self.delay.observe(now - self.clock.t0 - media_start, self.pacer.at_pause())
            self.pacer.set_target_delay(target)
        self.tell_delay()
        if self.governor is not None and self._at_current_tier(block):
            self._govern(block, now, media_start, needed)

    def _at_current_tier(self, block: FrameBlock) -> bool:
        return block.tier is None or (area_of(block.tier[0]) == self.tier.area
                                      and block.tier[1] == self.tier.steps)

    def tell_delay(self) -> None:
        """The engine runtime skips by the delay in force: tell it when it changed."""
        if self._told_delay is None or abs(self.clock.delay - self._told_delay) > 1e-6:
            self._told_delay = self.clock.delay
            self.engine.set_playout_delay(self.clock.delay)

    def _govern(self, block: FrameBlock, now: float, media_start: float, needed: float) -> None:
        governor = self.governor
        assert governor is not None
        compute = block.timings.busy or block.timings.total
        if compute <= 0:
            return  # an engine that times nothing cannot be governed
        target = self.pacer.target_delay if self.pacer.target_delay is not None else \
            self.clock.delay
        report = BlockReport(compute, BLOCK_SECONDS / max(1, self.engine.sharing()),
                             late_s=now - (self.clock.t0 + target + media_start),
                             latency_s=needed, setup=block.timings.setup > 0)
        change = governor.observe(report)
        if change is not None:
            self._apply(change)

    def _apply(self, change: TierChange) -> None:
        previous, tier = self.ladder[change.old], self.ladder[change.new]
        size = tier.size if tier.area != previous.area else None
        steps = tier.steps if tier.steps != previous.steps else None
        log.info("session %s: generation tier %s", self.sid, change.reason)
        self.tier = tier
        if self.delay is not None:
            self.delay.forget()
        event = GenerationChange(previous, tier, change.reason, time.monotonic())
        self.changes.append(event)
        self.engine.set_tier(size, steps, self._applied)
        if self.metrics is not None:
            self.metrics.inc("avatar_tier_changes_total", kind="generation", reason="governor")
        if self.on_change is not None:
            self.on_change(event)

    def _applied(self, error: BaseException | None) -> None:
        if error is None:
            return
        # the engine cannot follow (no tier changes, or it refused this one): govern no more
        level = logging.INFO if isinstance(error, NotImplementedError) else logging.WARNING
        log.log(level, "session %s: the engine did not change tier (%s); the generation "
                "governor stops for this session", self.sid, error)
        self.governor = None

    # 2. frames sent --------------------------------------------------------------------------

    def frame_sent(self, packet: MediaPacket, now: float | None = None) -> None:
        """A viewer was handed video frame `packet.index`: the first frame of its block sent
        completes that block's record."""
        record = self._records.pop(packet.index // FRAMES_PER_BLOCK, None)
        if record is None:
            return
        now = time.monotonic() if now is None else now
        heard = self.audio_at(packet.index)
        encoded = packet.encoded_at or now
        stages = {"wait": record.started - heard, "compute": record.decoded - record.started,
                  "buffer": encoded - record.decoded, "send": now - encoded,
                  "total": now - heard}
        stages = {k: max(0.0, v) for k, v in stages.items()}  # (clock rounding)
        self._recent.append(stages)
        if self.metrics is not None:
            for stage, seconds in stages.items():
                self.metrics.observe("avatar_latency_seconds", seconds, stage=stage)

    # 3. figures ------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """`latency` and `generation` of the session's info and `stats` events (ms, ints)."""
        recent = list(self._recent)
        stages = {s: round(1000 * _median([r[s] for r in recent])) if recent else None
                  for s in STAGES}
        target = self.pacer.target_delay
        latency = {
            "target_ms": round(self.cfg.target_s * 1000),
            "target_delay_ms": round(1000 * (self.clock.delay if target is None else target)),
            "audio_to_frame_ms": round(1000 * recent[-1]["total"]) if recent else None,
            "needed_ms": round(1000 * _median(list(self._needed))) if self._needed else None,
            "stages_ms": stages,
            "late_blocks": self.late_blocks, "skipped_blocks": self.skipped_blocks,
            "delay_inserted_ms": self.pacer.inserted * 1000 // FPS,
            "delay_dropped_ms": self.pacer.dropped * 1000 // FPS,
        }
        w, h = self.frame_size or (0, 0)
        last = self.changes[-1].as_dict() if self.changes else None
        generation = {
            "size": self.tier.size, "steps": self.tier.steps, "width": w, "height": h,
            "rung": self.ladder.index(self.tier), "ladder": [str(t) for t in self.ladder],
            "governor": self.governor is not None, "changes": len(self.changes),
            "last_change": last,
        }
        return {"latency": latency, "generation": generation}
