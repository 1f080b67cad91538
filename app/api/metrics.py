"""Prometheus metrics: HTTP metrics from the instrumentator plus the swarm's own gauges."""

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


class SwarmCollector(Collector):
    """Read at scrape time from the coordinator's in-memory view and counters."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        stats = self.coordinator.stats()
        counters = self.coordinator.counters
        yield GaugeMetricFamily(
            "bprr_live_servers",
            "Servers with a live lease serving their assigned span",
            value=stats["live_servers"],
        )
        yield GaugeMetricFamily(
            "bprr_block_coverage",
            "Fraction of blocks hosted by a live, loaded server",
            value=stats["coverage"],
        )
        yield GaugeMetricFamily(
            "bprr_placement_generation",
            "Generation of the published placement",
            value=stats["generation"],
        )
        yield GaugeMetricFamily(
            "bprr_active_sessions",
            "Sessions holding cache reservations",
            value=float(self.coordinator.active_sessions()),
        )
        yield GaugeMetricFamily(
            "bprr_reserved_cache_slots",
            "Cache slots held by sessions on routable servers",
            value=stats["reserved_slots"],
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
