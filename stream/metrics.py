"""The server's metrics, produced by prometheus_client: counters, histograms, gauges and labelled
families read at scrape time (from live objects: per session, variant and viewer), process
figures, and the event loop's wake-up lag.

Each `Metrics` owns its own registry (one per server: tests run several servers in a process).
Call sites name a metric and its labels; the metric is created on first use with the label names
of that call (they must stay the same at every call site) and the help text of `HELP`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Labels = dict[str, str]
SeriesReader = Callable[[], Iterable[tuple[Labels, float]]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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
    "avatar_tier_changes_total": "Generation tier and output variant changes, by kind.",
    "avatar_block_seconds": "Engine time per block (0.48 s of media: above it, slower than "
                            "real time).",
    "avatar_block_ready_lag_seconds": "Time from a block's media end to its frames reaching the "
                                      "server (the engine's share of the latency).",
    "avatar_latency_seconds": "Per block, by stage: audio received -> block started (wait), "
                              "-> decoded (compute), -> first frame encoded (buffer: playout "
                              "delay and encoding), -> sent to a viewer (send); total: audio "
                              "received -> sent.",
}
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class _Family(Collector):
    """A metric of many labelled series read at scrape time; series come and go with what
    they describe (a session, a variant, a viewer)."""

    def __init__(self, name: str, help_text: str, kind: str, read: SeriesReader):
        self.name = name.removesuffix("_total") if kind == "counter" else name
        self.help_text, self.kind, self.read = help_text, kind, read

    def _empty(self, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.help_text, labels=labels)

    def describe(self) -> Iterator[Metric]:
        yield self._empty([])

    def collect(self) -> Iterator[Metric]:
        series = [(dict(labels), value) for labels, value in self.read()]
        names = sorted({k for labels, _ in series for k in labels})
        family = self._empty(names)
        for labels, value in series:
            family.add_metric([str(labels.get(k, "")) for k in names], value)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # RSS, open file descriptors, CPU seconds
        PlatformCollector(registry=self.registry)
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._lock = threading.Lock()  # engine callbacks run on the loop; encoders may not
        self.loop_lag = 0.0
        self._probe: asyncio.Task | None = None
        self.gauge("avatar_threads", "Threads of the server process.", threading.active_count)

    def _labelled(self, family: dict, kind: type, name: str, labels: dict[str, str],
                  **extra: object) -> Any:
        with self._lock:
            metric = family.get(name)
            if metric is None:
                metric = family[name] = kind(name.removesuffix("_total") if kind is Counter
                                             else name, HELP.get(name, name),
                                             labelnames=sorted(labels), registry=self.registry,
                                             **extra)
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._labelled(self._counters, Counter, name, labels).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """A sample of a latency-like figure (seconds) into histogram `name`."""
        self._labelled(self._histograms, Histogram, name, labels,
                       buckets=LATENCY_BUCKETS).observe(value)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()` at scrape time."""
        with self._lock:
            Gauge(name, help_text, registry=self.registry).set_function(read)

    def family(self, name: str, help_text: str, kind: str, read: SeriesReader) -> None:
        """A metric of many labelled series, read at scrape time (`kind`: counter | gauge)."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"kind {kind!r}: accepted counter, gauge")
        with self._lock:
            self.registry.register(_Family(name, help_text, kind, read))

    def get(self, name: str, **labels: str) -> float:
        """A counter's current value (0 if it never counted)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def start_loop_probe(self, interval: float = 0.25) -> None:
        """Measures how late the event loop wakes up (a blocking call shows up as lag), and
        counts its live tasks (a leak shows up as growth)."""

        async def probe() -> None:
            while True:
                start = time.monotonic()
                await asyncio.sleep(interval)
                self.loop_lag = max(0.0, time.monotonic() - start - interval)

        loop = asyncio.get_running_loop()
        self._probe = loop.create_task(probe(), name="loop-lag-probe")
        self.gauge("avatar_event_loop_lag_seconds", "Latest event-loop wake-up delay.",
                   lambda: self.loop_lag)
        self.gauge("avatar_event_loop_tasks", "Live asyncio tasks of the server's loop.",
                   lambda: len(asyncio.all_tasks(loop)))

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    def render(self) -> str:
        return generate_latest(self.registry).decode()
