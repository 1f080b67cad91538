"""Prometheus metrics: HTTP metrics from the instrumentator plus the swarm's own gauges, the
per-server gauges read from the route view, and the labelled metrics of app.service.telemetry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from app.service.coordinator import Coordinator
from app.service.errors import Unavailable
from app.service.overview import BottleneckOut, view_bottleneck
from app.service.telemetry import REGISTRY, ServerCollector, ServerSample, route_view_samples

_GAUGES = [  # metric, key of Coordinator.stats(), help
    ("bprr_live_servers", "live_servers", "Servers with a live lease serving their assigned span"),
    ("bprr_block_coverage", "coverage", "Fraction of blocks hosted by a live, loaded server"),
    ("bprr_placement_generation", "generation", "Generation of the published placement"),
    ("bprr_active_sessions", "active_sessions", "Sessions holding cache reservations"),
    (
        "bprr_reserved_cache_slots",
        "reserved_slots",
        "Cache slots held by sessions on routable servers",
    ),
]


class SwarmCollector(Collector):
    """Read at scrape time from the coordinator's in-memory view and counters."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.servers = ServerCollector(self._server_samples)

    def _server_samples(self) -> list[ServerSample]:
        return route_view_samples(self.coordinator.view(), self.coordinator.clock())

    def collect(self) -> Iterator[Metric]:
        counters = self.coordinator.counters
        neck: BottleneckOut | None = None
        try:
            stats = self.coordinator.stats()
            stats["active_sessions"] = float(self.coordinator.active_sessions())
            neck = view_bottleneck(self.coordinator.view(), self.coordinator.clock())
        except Unavailable:  # the scrape still answers, saying so, during an outage
            stats = None
        yield GaugeMetricFamily(
            "bprr_database_up",
            "1 when this scrape could read the coordinator's database, else 0",
            value=0.0 if stats is None else 1.0,
        )
        if stats is not None:
            for name, key, documentation in _GAUGES:
                yield GaugeMetricFamily(name, documentation, value=stats[key])
        if neck is not None:  # a model is set
            yield GaugeMetricFamily(
                "bprr_bottleneck_live_copies",
                "Fewest live copies of any block (0: some block has no live server)",
                value=neck.live_copies,
            )
            yield GaugeMetricFamily(
                "bprr_bottleneck_blocks",
                "Blocks that have only the fewest live copies",
                value=sum(end - start for start, end in neck.blocks),
            )
            if neck.cache_used is not None:
                yield GaugeMetricFamily(
                    "bprr_bottleneck_cache_used",
                    "Fraction of the cache units in use on the servers of the bottleneck blocks",
                    value=neck.cache_used,
                )
        yield CounterMetricFamily(
            "bprr_sessions_booked",
            "Sessions booked by this process",
            value=counters.sessions_booked,
        )
        yield CounterMetricFamily(
            "bprr_session_rejections",
            "Bookings refused with 503 by this process",
            value=counters.sessions_rejected,
        )
        yield CounterMetricFamily(
            "bprr_placements_published",
            "Placements published by this process",
            value=counters.placements_published,
        )
        yield SummaryMetricFamily(
            "bprr_solver_seconds",
            "Placement solver run time",
            count_value=len(counters.solver_seconds),
            sum_value=sum(counters.solver_seconds),
        )
        yield from self.servers.collect()
        yield from REGISTRY.collect()
