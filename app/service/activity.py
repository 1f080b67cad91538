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

from pydantic import BaseModel

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

    seq: int
    at: float
    kind: Kind
    client_site: str
    generation: int | None
    session_id: str | None
    hops: list[RouteHop]
    first_token_ms: float | None
    per_token_ms: float | None
    wait_ms: float | None
    detail: str


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

    def booked(self, at: float, route: RouteOut, session_id: str) -> None:
        self._add(at, "booked", route.client_site, route, session_id, route.wait_ms)

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
                    first_token_ms=None if route is None else route.first_token_ms,
                    per_token_ms=None if route is None else route.per_token_ms,
                    wait_ms=event.wait_ms,
                    detail=event.detail,
                )
            )
            if len(out) >= limit:
                break
        return out
