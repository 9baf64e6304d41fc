"""What each block of a session does to the session's state: one rule for seeks, generation-tier
changes and the sink refresh, shared by the single-process generator and every rank of a pipeline
(`engine.parallel`). Torch-free: it decides, the generator and the ranks compute.

The state of a session, and what a block may do to it:

- the **rings** (one K/V ring per denoising step) hold the keys of the last blocks at their true
  positions and at their step's noise level. They are emptied when the timeline jumps (a seek:
  the model never saw a gap inside its window), when the size changes (other tokens) and when the
  step count changes (other noise levels). They are never carried across either.
- the **decoder cache** (the causal VAE's history) follows the video: it is kept across a step
  change (the latents still follow each other in time) and made afresh, primed on the motion
  latents exactly as at the session start, after a seek or a size change.
- the **sink** is the avatar's identity, not a moment of time: a seek and a step change keep it.
  A size change re-makes it from the reference image at the new size.
- the **sink refresh** (Live-Avatar's re-anchoring on the first generated frame) is "the first
  block at or after `segment start + refresh_after`", never an exact block index, so no seek can
  jump over it. A *segment* starts at block 0, at each seek and at each size change. Until the
  session's sink has been refreshed, each segment keeps the first clean latent of its own first
  block and refreshes from it; once refreshed, the sink stays for the session's life (a size
  change, which must re-make the sink anyway, starts over).

So the state after a seek to block N (or a size change at N) is, by construction, the state of a
fresh session started at N, except for what the rule keeps: the sink, and whether it was
refreshed. A fresh session "started at N" is `seek(N)` before its first block.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.api import FRAMES_PER_BLOCK
from engine.sizing import parse_area


@dataclass(frozen=True)
class Tier:
    """A generation tier: a pixel-area budget (the aspect follows the image) and a step count."""

    size: str
    steps: int

    def same_size(self, other: Tier) -> bool:
        return parse_area(self.size) == parse_area(other.size)


@dataclass(frozen=True)
class BlockPlan:
    """What block `index` does before and after its denoising steps (see the module docstring)."""

    index: int
    tier: Tier
    generation: int  # counts size changes: which conditioning (reference, sink) is current
    resize: bool = False  # first block at a new size: conditioning, sink, rings, decoder afresh
    cut: bool = False  # first block after a seek: rings emptied, decoder primed afresh
    new_steps: bool = False  # first block with a new step count: rings emptied
    capture: bool = False  # keep this block's first clean latent frame for the sink refresh
    refresh_from: int | None = None  # re-prefill the sink from the latent kept at that block

    @property
    def first_frame(self) -> int:
        return self.index * FRAMES_PER_BLOCK

    @property
    def empties_rings(self) -> bool:
        return self.cut or self.resize or self.new_steps


class SessionSchedule:
    """The block-boundary bookkeeping of one session: which block comes next, at which tier, and
    what it must do to the session's state. Not thread-safe: the engine thread drives it."""

    def __init__(self, tier: Tier, refresh_after: int):
        if refresh_after < 0:
            raise ValueError(f"refresh_after={refresh_after}: accepted 0 (never) or more blocks")
        self.tier = tier
        self.refresh_after = refresh_after
        self.next_block = 0
        self.generation = 0
        self.segment_start = 0
        self.captured: int | None = None  # the block whose first latent is kept
        self.refreshed = False
        self._resize = self._cut = self._new_steps = False

    def seek(self, block: int) -> None:
        """Continue at `block` (>= the next block): a cut in the timeline."""
        if block < self.next_block:
            raise ValueError(f"cannot seek back from block {self.next_block} to {block}")
        if block == self.next_block:
            return
        self.next_block = block
        self._cut = True
        self._start_segment()

    def set_tier(self, size: str | None = None, steps: int | None = None) -> bool:
        """Generate the next block at this size and step count (None: unchanged). Returns
        whether anything changed."""
        new = Tier(self.tier.size if size is None else size,
                   self.tier.steps if steps is None else steps)
        if new.steps < 1:
            raise ValueError(f"steps={new.steps}: accepted 1 or more")
        resize = not new.same_size(self.tier)
        if resize:
            self.generation += 1
            self._resize = True
            self.refreshed = False  # the sink is re-made at the new size: it may refresh again
            self._start_segment()
        steps_changed = new.steps != self.tier.steps
        self._new_steps |= steps_changed
        self.tier = Tier(new.size if resize else self.tier.size, new.steps)
        return resize or steps_changed

    def _start_segment(self) -> None:
        self.segment_start = self.next_block
        if not self.refreshed:
            self.captured = None

    def plan(self) -> BlockPlan:
        """The next block's plan; advances to the block after it."""
        b = self.next_block
        capture, refresh_from = False, None
        if self.refresh_after and not self.refreshed:
            if self.captured is None:
                capture, self.captured = True, b
            elif b >= self.segment_start + self.refresh_after:
                refresh_from, self.refreshed = self.captured, True
        plan = BlockPlan(b, self.tier, self.generation, resize=self._resize, cut=self._cut,
                         new_steps=self._new_steps, capture=capture, refresh_from=refresh_from)
        self._resize = self._cut = self._new_steps = False
        self.next_block = b + 1
        return plan
