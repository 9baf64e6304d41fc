"""Request-rate limits: how many sessions one client may create per minute.

A client is its API key (or, in development mode, its address). The window slides: a client
that made its `per_minute` sessions in the last 60 s waits until the oldest of them is a minute
old, and is told how long (HTTP 429 + Retry-After). Memory is bounded: clients idle for a
minute are forgotten.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable

from stream.errors import ApiError

WINDOW_S = 60.0


class CreationLimit:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    @staticmethod
    def client(api_key: str | None, address: str | None) -> str:
        """The key a client is counted under (a digest: no key is kept in memory as such)."""
        if api_key:
            return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
        return f"addr:{address or '?'}"

    def check(self, client: str) -> None:
        """Count one creation for `client`, or raise 429 if it is over its limit."""
        now = self.clock()
        if len(self._seen) > 10_000:  # forget clients idle for a whole window
            self._seen = {c: q for c, q in self._seen.items() if q and now - q[-1] < WINDOW_S}
        times = self._seen.setdefault(client, deque())
        while times and now - times[0] >= WINDOW_S:
            times.popleft()
        if len(times) >= self.per_minute:
            wait = max(1, math.ceil(WINDOW_S - (now - times[0])))
            raise ApiError(429, "rate_limited", f"more than {self.per_minute} sessions created "
                           "in a minute by this client ([server] "
                           f"max_session_creations_per_minute); retry in {wait} s",
                           retryable=True, headers={"Retry-After": str(wait)})
        times.append(now)
