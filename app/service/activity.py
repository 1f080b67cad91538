"""Recent route and booking decisions, kept in memory for the operator dashboard.

A bounded ring buffer per coordinator process (several replicas each keep their own): route
queries, bookings and refused bookings with their path and predicted times. Appending is one
``deque.append`` of an already built response object, so the hot paths pay next to nothing.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from app.service.schemas import RouteHop, RouteOut

Kind = Literal["route", "booked", "rejected"]
DEFAULT_CAPACITY = 200


@dataclass(frozen=True)
class _Event:
    seq: int
    at: float
    kind: Kind
    client_site: str
    route: RouteOut | None
    session_id: str | None
    wait_ms: float | None
    detail: str


class RecentRouteOut(BaseModel):
    """One decision: a route answered, a session booked, or a booking refused (503)."""

    seq: int = Field(description="Its sequence number in this process (grows by one per decision)")
    at: float = Field(description="When it was made (Unix time, s)")
    kind: Kind = Field(
        description="route: a route answered; booked: a session booked; rejected: a booking refused"
    )
    client_site: str = Field(description="The client's site")
    generation: int | None = Field(description="The placement generation of its route (null: none)")
    session_id: str | None = Field(description="The booked session (null: not a booking)")
    hops: list[RouteHop] = Field(description="The route's chain (empty when refused)")
    first_token_ms: float | None = Field(description="Predicted time to the first token (ms)")
    per_token_ms: float | None = Field(description="Predicted time per further token (ms)")
    wait_ms: float | None = Field(description="Predicted or measured wait for a free chain (ms)")
    detail: str = Field(description="Why a booking was refused (empty otherwise)")


class RouteLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._events: deque[_Event] = deque(maxlen=capacity)
        self._seq = 0
        self._lock = threading.Lock()
        self.capacity = capacity

    def _add(
        self,
        at: float,
        kind: Kind,
        client_site: str,
        route: RouteOut | None = None,
        session_id: str | None = None,
        wait_ms: float | None = None,
        detail: str = "",
    ) -> None:
        with self._lock:
            self._seq += 1
            self._events.append(
                _Event(self._seq, at, kind, client_site, route, session_id, wait_ms, detail)
            )

    def routed(self, at: float, route: RouteOut) -> None:
        self._add(at, "route", route.client_site, route=route, wait_ms=route.wait_ms)

    def booked(self, at: float, route: RouteOut, session_id: str | None = None) -> None:
        """A booking; the sessions code passes no id (public GETs never show session ids)."""
        self._add(at, "booked", route.client_site, route, session_id or None, route.wait_ms)

    def rejected(self, at: float, client_site: str, wait_ms: float | None, detail: str) -> None:
        self._add(at, "rejected", client_site, wait_ms=wait_ms, detail=detail)

    def recent(self, limit: int, kinds: set[str] | None = None) -> list[RecentRouteOut]:
        """The latest ``limit`` decisions (of the given kinds), newest first."""
        with self._lock:
            events = list(self._events)
        out: list[RecentRouteOut] = []
        for event in reversed(events):
            if kinds is not None and event.kind not in kinds:
                continue
            route = event.route
            out.append(
                RecentRouteOut(
                    seq=event.seq,
                    at=event.at,
                    kind=event.kind,
                    client_site=event.client_site,
                    generation=None if route is None else route.generation,
                    session_id=event.session_id,
                    hops=[] if route is None else list(route.hops),
                    # as the API's replies: to 0.1 ms
                    first_token_ms=None if route is None else round(route.first_token_ms, 1),
                    per_token_ms=None if route is None else round(route.per_token_ms, 1),
                    wait_ms=event.wait_ms,
                    detail=event.detail,
                )
            )
            if len(out) >= limit:
                break
        return out


# --- history: the swarm sampled over time, for the dashboard's charts -------------------------

HISTORY_CAPACITY = 1800  # one hour at the default interval
HISTORY_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Snapshot:
    """The swarm at one instant; the booking figures are running totals (this process)."""

    at: float
    generation: int
    routable_servers: int
    coverage: float
    active_sessions: int
    queue_depth: int
    booked_total: int
    refused_total: int
    wait_s_total: float
    waits_total: int


class HistoryPoint(BaseModel):
    """One sample; ``booked``/``refused`` count the decisions since the previous sample and
    ``mean_wait_s`` is the mean queue wait of the bookings that ended in between (None: none
    did)."""

    at: float = Field(description="When it was sampled (Unix time, s)")
    generation: int = Field(description="The published placement's generation")
    routable_servers: int = Field(
        description="Servers with a live lease serving their assigned span"
    )
    coverage: float = Field(description="Fraction of blocks hosted by a live, loaded server")
    active_sessions: int = Field(description="Sessions holding cache reservations")
    queue_depth: int = Field(description="Bookings waiting in the central queue")
    booked: int = Field(description="Sessions booked since the previous sample")
    refused: int = Field(description="Bookings refused since the previous sample")
    mean_wait_s: float | None = Field(
        description="Mean queue wait of the bookings that left the queue since (s; null: none)"
    )


class ReplanMark(BaseModel):
    """A new placement generation first seen at ``at`` (within one sampling interval)."""

    at: float = Field(description="When the new generation was first seen (Unix time, s)")
    generation: int = Field(description="The new generation")
    reason: str = Field(description="Why it was planned, when the planner recorded it")


class GenerationTimes(BaseModel):
    """The model's predicted per-token time of a generation, and the measured one when any
    client reported it (None until then)."""

    generation: int = Field(description="The placement generation")
    predicted_ms_per_token: float | None = Field(
        description="The model's predicted per-token time (ms)"
    )
    measured_ms_per_token: float | None = Field(
        description="The mean per-token time clients reported (ms; null: none yet)"
    )


class HistoryOut(BaseModel):
    interval_s: float = Field(description="Time between samples (s)")
    capacity: int = Field(description="The most samples kept (the ring buffer's size)")
    points: list[HistoryPoint] = Field(description="The samples, oldest first")
    replans: list[ReplanMark] = Field(description="New placement generations, oldest first")
    generations: list[GenerationTimes] = Field(
        description="Predicted and measured per-token times of recent generations"
    )


class History:
    """A bounded ring buffer of samples, differenced against the previous one; a generation
    change between two samples is kept as a re-plan mark with its reason (when recorded)."""

    def __init__(
        self, capacity: int = HISTORY_CAPACITY, interval_s: float = HISTORY_INTERVAL_S
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.capacity = capacity
        self.interval_s = interval_s
        self._points: deque[HistoryPoint] = deque(maxlen=capacity)
        self._replans: deque[ReplanMark] = deque(maxlen=capacity)
        self._last: Snapshot | None = None
        self._lock = threading.Lock()

    def add(self, snapshot: Snapshot, reason: str | None = None) -> bool:
        """Append a sample; True when its generation differs from the previous sample's
        (``reason``: why that generation was published, if known)."""
        with self._lock:
            last = self._last
            # Counters restart with the process (or another test's app): never negative.
            booked = max(0, snapshot.booked_total - last.booked_total) if last else 0
            refused = max(0, snapshot.refused_total - last.refused_total) if last else 0
            waits = max(0, snapshot.waits_total - last.waits_total) if last else 0
            wait_s = snapshot.wait_s_total - last.wait_s_total if last else 0.0
            self._points.append(
                HistoryPoint(
                    at=snapshot.at,
                    generation=snapshot.generation,
                    routable_servers=snapshot.routable_servers,
                    coverage=snapshot.coverage,
                    active_sessions=snapshot.active_sessions,
                    queue_depth=snapshot.queue_depth,
                    booked=booked,
                    refused=refused,
                    mean_wait_s=round(max(0.0, wait_s) / waits, 4) if waits else None,
                )
            )
            changed = last is not None and snapshot.generation != last.generation
            if changed:
                self._replans.append(
                    ReplanMark(
                        at=snapshot.at,
                        generation=snapshot.generation,
                        reason=reason or "not recorded",
                    )
                )
            self._last = snapshot
            return changed

    def last_generation(self) -> int | None:
        with self._lock:
            return None if self._last is None else self._last.generation

    def out(self, limit: int, generations: list[GenerationTimes]) -> HistoryOut:
        """The latest ``limit`` samples (oldest first) and the re-plans within them."""
        with self._lock:
            points = list(self._points)[-limit:]
            start = points[0].at if points else float("inf")
            replans = [mark for mark in self._replans if mark.at >= start]
        return HistoryOut(
            interval_s=self.interval_s,
            capacity=self.capacity,
            points=points,
            replans=replans,
            generations=generations,
        )
