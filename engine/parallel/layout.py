"""Pipeline layouts and rank roles: which rank runs which denoising steps, and where the VAE,
umT5 and wav2vec2 live. Torch-free.

A layout is `k` (k DiT ranks; the last one also decodes, on its own CUDA stream) or `k+vae`
(k DiT ranks and one more rank that only decodes). Rank 0 turns each block's audio features into
the DiT's audio tokens (the DiT's audio encoder) and draws its noise; the tokens ride with the
latents to the other DiT ranks. The features themselves (wav2vec2, 1.3 GB in float32) are
computed on the VAE rank when there is one, which has memory and time to spare (it holds the
0.5 GB VAE; a decode is about half a DiT step), so that every DiT rank holds the DiT and its
rings only (the 24 GB-card case). In a `k` layout of 3 or more DiT ranks they go to rank 1,
which holds neither the audio encoder (rank 0's) nor the VAE (the last rank's): no rank then
carries two of the three extras, in memory or in time (layout 4 on 24 GB cards; with 1 or 2
DiT ranks, rank 0 computes them). Features made away from rank 0 reach it through the server.
The VAE's rank also encodes every session's reference and motion latents and its prompt (umT5
lives there, on its GPU when the memory plan leaves room, else on its CPU).

Steps are split into contiguous shares, one per DiT rank, in step order. When `steps` is not a
multiple of `k` the shares differ by one step and the extra steps go to the last ranks (rank 0
already carries the audio tokens): the pipeline then runs at the pace of the ranks with more
steps. Every DiT rank needs at least one step, so a layout of k DiT ranks needs steps >= k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import ConfigError, InputError

_FORM = re.compile(r"^\s*(\d+)\s*(\+\s*vae)?\s*$", re.IGNORECASE)
MAX_RANKS = 64
DEFAULT_SESSIONS = 4  # sessions a group holds when max_sessions is 0 (fewer where memory says)


@dataclass(frozen=True)
class RankRole:
    """What one rank loads and runs."""

    rank: int
    dit: bool  # runs denoising steps (holds the DiT)
    tokens: bool  # DiT rank 0: the audio tokens (the DiT's audio encoder) and the noise
    features: bool  # computes the audio features (holds wav2vec2)
    decoder: bool  # decodes blocks and encodes avatars (holds the VAE and umT5)
    last_dit: bool  # the last DiT rank: hands each block's clean latents on

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts this rank loads: some of "dit", "vae", "text", "wav2vec"."""
        out = []
        if self.dit:
            out.append("dit")
        if self.decoder:
            out += ["vae", "text"]
        if self.features:
            out.append("wav2vec")
        return tuple(out)

    def describe(self, layout: Layout, steps: int) -> str:
        what = []
        if self.dit:
            share = layout.steps_of(self.rank, steps)
            what.append(f"DiT steps {share.start}-{share.stop - 1}" if len(share) > 1
                        else f"DiT step {share.start}")
        if self.tokens:
            what.append("audio tokens")
        if self.features:
            what.append("audio features")
        if self.decoder:
            what.append("VAE decode + avatar encode + umT5")
        return f"rank {self.rank}: " + ", ".join(what)


@dataclass(frozen=True)
class Layout:
    """`dit_ranks` DiT ranks, plus one VAE rank when `vae_rank`."""

    dit_ranks: int
    vae_rank: bool = False

    @classmethod
    def parse(cls, text: str, key: str = "engine.layout") -> Layout:
        m = _FORM.match(str(text))
        if m is None or not 1 <= int(m.group(1)) <= MAX_RANKS:
            raise ConfigError(f"{key}={text!r}: accepted \"k\" (k DiT ranks, 1..{MAX_RANKS}, the "
                              "last also decoding) or \"k+vae\" (and one more rank that only "
                              "decodes), e.g. \"1\", \"2\", \"4\", \"4+vae\"")
        return cls(int(m.group(1)), m.group(2) is not None)

    def __str__(self) -> str:
        return f"{self.dit_ranks}+vae" if self.vae_rank else str(self.dit_ranks)

    @property
    def world(self) -> int:
        """Processes in the group."""
        return self.dit_ranks + int(self.vae_rank)

    @property
    def single(self) -> bool:
        """One process does everything (the in-process engine, no group)."""
        return self.world == 1

    @property
    def decoder_rank(self) -> int:
        return self.dit_ranks if self.vae_rank else self.dit_ranks - 1

    @property
    def features_rank(self) -> int:
        """Where wav2vec2 runs: the VAE rank if any, else rank 1 of 3 or more DiT ranks (the
        one with neither the audio encoder nor the VAE), else rank 0."""
        if self.vae_rank:
            return self.dit_ranks
        return 1 if self.dit_ranks >= 3 else 0

    @property
    def last_dit_rank(self) -> int:
        return self.dit_ranks - 1

    @property
    def stages(self) -> int:
        """Ranks a block passes through one after another (its latency in stage times)."""
        return self.world

    def role(self, rank: int) -> RankRole:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside layout {self} (ranks 0..{self.world - 1})")
        dit = rank < self.dit_ranks
        return RankRole(rank, dit=dit, tokens=rank == 0, features=rank == self.features_rank,
                        decoder=rank == self.decoder_rank, last_dit=rank == self.last_dit_rank)

    def check_steps(self, steps: int, what: str = "steps") -> None:
        """Refuse a step count that would leave a DiT rank without a step."""
        if steps < self.dit_ranks:
            raise InputError(f"{what}={steps}: layout {self} gives each of its {self.dit_ranks} "
                             f"DiT ranks at least one step, so it needs {self.dit_ranks} or more "
                             "steps; use a layout with fewer DiT ranks for fewer steps")

    def steps_of(self, rank: int, steps: int) -> range:
        """The contiguous share of `steps` that DiT rank `rank` runs (empty for the VAE rank)."""
        if rank >= self.dit_ranks:
            return range(0)
        self.check_steps(steps)
        base, extra = divmod(steps, self.dit_ranks)
        first_long = self.dit_ranks - extra  # ranks from here on run base + 1 steps
        start = rank * base + max(0, rank - first_long)
        return range(start, start + base + (1 if rank >= first_long else 0))

    def max_share(self, steps: int) -> int:
        """Steps of the busiest DiT rank: the pipeline's pace in steps per block."""
        return -(-steps // self.dit_ranks)
