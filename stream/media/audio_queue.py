"""A bounded FIFO of PCM chunks that is never overwritten: a bot's audio before it enters the
session timeline.

Its bound is in seconds of audio, whatever the rate. A producer asks `has_room` first and waits
(`wait_for_room`) when there is none; nothing is ever dropped except by `clear` (an interrupt).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PcmChunk:
    """Interleaved int16 samples of `owner` (an utterance) at `rate` Hz with `channels`."""

    owner: Any
    samples: np.ndarray  # int16 [frames * channels]
    rate: int
    channels: int

    @property
    def frames(self) -> int:
        return len(self.samples) // self.channels

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


class AudioQueue:
    def __init__(self, capacity_s: float):
        self.capacity_s = capacity_s
        self._chunks: deque[PcmChunk] = deque()
        self._seconds = 0.0
        self._room = asyncio.Event()

    @property
    def seconds(self) -> float:
        """Audio waiting, in seconds."""
        return max(0.0, self._seconds)

    def __len__(self) -> int:
        return len(self._chunks)

    def has_room(self, seconds: float) -> bool:
        """May `seconds` more be queued? An empty queue takes any message, so a message longer
        than the whole bound still gets in (alone) and nothing can wait forever."""
        return not self._chunks or self._seconds + seconds <= self.capacity_s + 1e-9

    async def wait_for_room(self, seconds: float) -> None:
        while not self.has_room(seconds):
            self._room.clear()
            await self._room.wait()

    def put(self, chunk: PcmChunk) -> None:
        if chunk.frames:
            self._chunks.append(chunk)
            self._seconds += chunk.seconds

    def peek(self) -> PcmChunk | None:
        return self._chunks[0] if self._chunks else None

    def pop(self, max_frames: int) -> PcmChunk:
        """The first chunk, or its first `max_frames` frames (the rest stays queued)."""
        head = self._chunks[0]
        if head.frames <= max_frames:
            self._chunks.popleft()
            out = head
        else:
            cut = max_frames * head.channels
            out = PcmChunk(head.owner, head.samples[:cut], head.rate, head.channels)
            self._chunks[0] = PcmChunk(head.owner, head.samples[cut:], head.rate, head.channels)
        self._seconds -= out.seconds
        if not self._chunks:
            self._seconds = 0.0  # no float dust left behind
        self._room.set()
        return out

    def clear(self) -> list[PcmChunk]:
        """Drop everything queued (an interrupt); returns what was dropped."""
        dropped = list(self._chunks)
        self._chunks.clear()
        self._seconds = 0.0
        self._room.set()
        return dropped
