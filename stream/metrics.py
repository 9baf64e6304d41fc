"""Prometheus text-format metrics: counters with labels, gauges and labelled families read at
scrape time (from live objects: per session, variant and viewer), loop lag."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

Labels = dict[str, str]
SeriesReader = Callable[[], Iterable[tuple[Labels, float]]]

HELP = {
    "avatar_sessions_created_total": "Sessions created.",
    "avatar_sessions_ended_total": "Sessions ended, by reason.",
    "avatar_sessions_rejected_total": "Session requests refused, by reason.",
    "avatar_blocks_total": "Frame blocks (12 frames) received from the engine.",
    "avatar_peers_total": "WebRTC peers connected, by kind.",
    "avatar_http_errors_total": "Error responses, by code.",
    "avatar_ws_connections_total": "Bot WebSocket connections accepted.",
    "avatar_ws_messages_total": "Bot WebSocket messages received, by type (audio: binary).",
    "avatar_ws_errors_total": "Bot WebSocket errors and policy closes, by code.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._families: dict[str, tuple[str, str, SeriesReader]] = {}
        self.loop_lag = 0.0
        self._probe: asyncio.Task | None = None

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self._counters[name][key] = self._counters[name].get(key, 0.0) + value

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges[name] = (help_text, read)

    def family(self, name: str, help_text: str, kind: str, read: SeriesReader) -> None:
        """A metric of many labelled series, read at scrape time (`kind`: counter | gauge).
        Series come and go with what they describe (a session, a variant, a viewer)."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind {kind!r}: accepted counter, gauge")
        self._families[name] = (help_text, kind, read)

    def get(self, name: str, **labels: str) -> float:
        return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def start_loop_probe(self, interval: float = 0.25) -> None:
        """Measures how late the event loop wakes up (a blocking call shows up as lag)."""

        async def probe() -> None:
            while True:
                start = time.monotonic()
                await asyncio.sleep(interval)
                self.loop_lag = max(0.0, time.monotonic() - start - interval)

        self._probe = asyncio.get_running_loop().create_task(probe(), name="loop-lag-probe")
        self.gauge("avatar_event_loop_lag_seconds", "Latest event-loop wake-up delay.",
                   lambda: self.loop_lag)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    def render(self) -> str:
        lines = []
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        for name, (help_text, kind, read_all) in sorted(self._families.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for series_labels, value in read_all():
                text = ",".join(f'{k}="{_escape(str(v))}"'
                                for k, v in sorted(series_labels.items()))
                lines.append(f"{name}{{{text}}} {value:g}")
        for name, series in sorted(self._counters.items()):
            lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
            for labels, value in sorted(series.items()):
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"
