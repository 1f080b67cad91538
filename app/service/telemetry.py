"""Labelled Prometheus metrics of the coordinator, and the tiny functions that record them.

The service modules call the ``record_*`` / ``set_*`` functions on their hot paths (one
labelled counter increment each); ``app.api.metrics`` exposes :data:`REGISTRY` at /metrics
next to the HTTP metrics, together with a :class:`ServerCollector` that reads the per-server
gauges from the route view at scrape time (so nothing is written per heartbeat).

Metrics (label sets bounded: sites come from the scenario, outcomes and states are closed
sets, generations are pruned to the last :data:`KEPT_GENERATIONS`):

- ``bprr_bookings_total{client_site, outcome}``: booking decisions (outcome in :data:`OUTCOMES`)
- ``bprr_queue_wait_seconds{client_site}``: time waited in the central queue by bookings that
  ended booked or queue_timeout (0 for a booking served at once)
- ``bprr_queue_depth``: requests waiting in the central queue
- ``bprr_replans_total{reason}`` and ``bprr_replan_generation{reason}`` (latest generation
  published for that reason)
- ``bprr_generation_per_token_ms{generation, kind}``: kind="predicted" (the placement's
  model objective) or "measured" (reported by clients), one pair per recent generation
- ``bprr_server_cache_units{server, kind}`` (kind "used" | "total"), ``bprr_server_state{server,
  state}`` (1 for the server's state; "idle": no span in the placement): from
  :class:`ServerCollector`
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.service.errors import Unavailable

if TYPE_CHECKING:
    from app.service.routeview import RouteView

OUTCOMES = frozenset({"booked", "refused", "queue_timeout", "queue_full", "rate_limited"})
# The outcomes whose wait is a time spent in (or skipping) the central queue.
_WAITED = frozenset({"booked", "queue_timeout"})
SERVER_STATES = ("routable", "expired", "idle", "loading", "joining", "draining")
KEPT_GENERATIONS = 8
WAIT_BUCKETS_S = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REGISTRY = CollectorRegistry(auto_describe=True)

BOOKINGS = Counter(
    "bprr_bookings",
    "Booking decisions per client site and outcome (booked, refused, queue_timeout, "
    "queue_full, rate_limited)",
    ["client_site", "outcome"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "bprr_queue_wait_seconds",
    "Time waited in the central queue by bookings that ended booked or queue_timeout",
    ["client_site"],
    buckets=WAIT_BUCKETS_S,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "bprr_queue_depth", "Booking requests waiting in the central queue", registry=REGISTRY
)
REPLANS = Counter(
    "bprr_replans",
    "Placements published after a re-plan, per reason",
    ["reason"],
    registry=REGISTRY,
)
REPLAN_GENERATION = Gauge(
    "bprr_replan_generation",
    "Generation of the latest placement published for this re-plan reason",
    ["reason"],
    registry=REGISTRY,
)
GENERATION_PER_TOKEN_MS = Gauge(
    "bprr_generation_per_token_ms",
    "Per-token time of a placement generation: kind=predicted (the model's objective) or "
    "kind=measured (reported by clients; absent until one is)",
    ["generation", "kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class Replan:
    at: float
    generation: int
    reason: str


_lock = threading.Lock()
_replans: deque[Replan] = deque(maxlen=64)
_generations: deque[int] = deque()  # generations with a per-token label set, oldest first
_measured: dict[int, tuple[int, float]] = {}  # generation -> (reports, sum of their ms)


def record_booking(client_site: str, outcome: str, wait_s: float) -> None:
    """One booking decision. ``wait_s``: seconds spent in the central queue (0 if none)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
    BOOKINGS.labels(client_site, outcome).inc()
    if outcome in _WAITED:
        QUEUE_WAIT.labels(client_site).observe(max(0.0, wait_s))


def set_queue_depth(n: int) -> None:
    if n < 0:
        raise ValueError(f"queue depth must be >= 0, not {n}")
    QUEUE_DEPTH.set(n)


def record_replan(generation: int, reason: str) -> None:
    """A placement of ``generation`` was published because of ``reason`` (e.g. "coverage_lost",
    "server_joined", "operator")."""
    REPLANS.labels(reason).inc()
    REPLAN_GENERATION.labels(reason).set(generation)
    with _lock:
        _replans.append(Replan(time.time(), generation, reason))


def recent_replans() -> list[Replan]:
    """The latest re-plans recorded in this process, oldest first."""
    with _lock:
        return list(_replans)


def replan_reason(generation: int) -> str | None:
    """Why ``generation`` was published, if this process recorded it."""
    with _lock:
        for replan in reversed(_replans):
            if replan.generation == generation:
                return replan.reason
    return None


def _keep_generation(generation: int) -> None:
    with _lock:
        if generation in _generations:
            return
        _generations.append(generation)
        stale = []
        while len(_generations) > KEPT_GENERATIONS:
            stale.append(_generations.popleft())
            _measured.pop(stale[-1], None)
    for old in stale:
        for kind in ("predicted", "measured"):
            with contextlib.suppress(KeyError):
                GENERATION_PER_TOKEN_MS.remove(str(old), kind)


def record_prediction(generation: int, per_token_ms: float) -> None:
    """The model's predicted per-token time of a placement generation (when published)."""
    _keep_generation(generation)
    GENERATION_PER_TOKEN_MS.labels(str(generation), "predicted").set(per_token_ms)


def record_measurement(generation: int, per_token_ms: float) -> None:
    """One per-token time measured on a route of generation ``generation`` (e.g. reported
    by a client at the end of its session); the gauge shows the mean of the reports."""
    if not per_token_ms >= 0:  # also refuses NaN
        raise ValueError(f"per_token_ms must be >= 0, not {per_token_ms}")
    _keep_generation(generation)
    with _lock:
        count, total = _measured.get(generation, (0, 0.0))
        _measured[generation] = (count + 1, total + per_token_ms)
        mean = (total + per_token_ms) / (count + 1)
    GENERATION_PER_TOKEN_MS.labels(str(generation), "measured").set(mean)


def generation_times() -> dict[int, dict[str, float]]:
    """{generation: {"predicted": ms, "measured": ms}} for the kept generations (a kind is
    missing until it is recorded)."""
    out: dict[int, dict[str, float]] = {}
    for metric in GENERATION_PER_TOKEN_MS.collect():
        for sample in metric.samples:
            generation = int(sample.labels["generation"])
            out.setdefault(generation, {})[sample.labels["kind"]] = sample.value
    return out


def booking_totals() -> tuple[int, int, float, int]:
    """(booked, not booked, queue-wait seconds summed, waits counted) since the process
    started, over every client site: what the dashboard's history differences."""
    booked = refused = 0
    for metric in BOOKINGS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                if sample.labels["outcome"] == "booked":
                    booked += int(sample.value)
                else:
                    refused += int(sample.value)
    wait_sum, wait_count = 0.0, 0
    for metric in QUEUE_WAIT.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                wait_sum += sample.value
            elif sample.name.endswith("_count"):
                wait_count += int(sample.value)
    return booked, refused, wait_sum, wait_count


def queue_depth() -> int:
    for metric in QUEUE_DEPTH.collect():
        for sample in metric.samples:
            return int(sample.value)
    return 0


# --- per-server gauges, read at scrape time ---------------------------------------------------


@dataclass(frozen=True)
class ServerSample:
    server: str
    state: str  # one of SERVER_STATES
    cache_used: int | None  # None: not in the route view (not serving its span)
    cache_total: int | None


def route_view_samples(view: RouteView, now: float) -> list[ServerSample]:
    """Every registered server of the view: the ones serving their assigned span with their
    cache units; the others with their registration state ("idle": online with no span in
    the published placement; "loading": online but its loaded span is not the assigned one
    yet)."""
    samples = []
    for position, entry in enumerate(view.entries):
        state = "routable" if view.lease[position] > now else "expired"
        samples.append(
            ServerSample(
                entry.id, state, int(view.reserved[position]), int(view.capacity[position])
            )
        )
    for server_id, key in sorted(view.heartbeat_keys.items()):
        if server_id in view.position:
            continue
        row_state = key[2]
        if row_state == "online":
            state = "loading" if server_id in view.spans else "idle"
        else:
            state = row_state
        samples.append(ServerSample(server_id, state, None, None))
    return samples


class ServerCollector(Collector):
    """Per-server gauges from ``read()`` at each scrape; nothing when the database is down
    (``bprr_database_up`` says so)."""

    def __init__(self, read: Callable[[], Iterable[ServerSample]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        try:
            samples = list(self.read())
        except Unavailable:
            return
        cache = GaugeMetricFamily(
            "bprr_server_cache_units",
            "Attention-cache units of a routable server: kind=used (reserved by sessions) "
            "or kind=total (its capacity)",
            labels=["server", "kind"],
        )
        state = GaugeMetricFamily(
            "bprr_server_state",
            "1 for the server's current state (routable, expired, idle, loading, joining, "
            "draining)",
            labels=["server", "state"],
        )
        for sample in samples:
            if sample.cache_used is not None and sample.cache_total is not None:
                cache.add_metric([sample.server, "used"], sample.cache_used)
                cache.add_metric([sample.server, "total"], sample.cache_total)
            for name in SERVER_STATES:
                state.add_metric([sample.server, name], 1.0 if sample.state == name else 0.0)
        yield cache
        yield state


class RegistryCollector(Collector):
    """Forwards :data:`REGISTRY` (process-wide) into an app's own registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
