"""Routes and sessions: route queries on the in-memory view, bookings (WS-RR with waiting
times), releases and the sweep of expired sessions.

Transaction boundaries:
- ``route``: no transaction (the route view; it is rebuilt in a read transaction when absent).
- ``book``: one ``booking_tx`` per attempt (the reservations on every hop and the session row,
  all or nothing: one autocommitted statement on PostgreSQL); an attempt that another process
  beat to the slots invalidates the view and tries again, at most BOOK_ATTEMPTS times.
- ``release``: one ``booking_tx``.
- ``sweep``: one read transaction to find the expired sessions, then one ``booking_tx`` that
  releases them (each release commits by itself on PostgreSQL).
The route view mirrors reservations taken and given back until its next rebuild.
"""

from __future__ import annotations

import json
import math
import uuid

from app.service.core import Core
from app.service.errors import Conflict, Invalid, NotFound, Unavailable
from app.service.routeview import RoutePlan, RouteView
from app.service.schemas import RouteHop, RouteOut, SessionIn, SessionOut
from app.store import repositories as repo
from app.store.models import SessionRow

BOOK_ATTEMPTS = 4


class _Contended(Exception):
    pass


class SessionService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings

    def _check_route_args(
        self, view: RouteView, client_site: str, inputs: int, outputs: int
    ) -> None:
        model = view.model
        if model is None:
            raise Conflict("no model is set yet (PUT /v1/model)")
        if client_site not in view.site_index:
            raise Invalid(f"client_site: unknown site {client_site!r}")
        if inputs > model.max_input_tokens:
            raise Invalid(
                f"input_tokens: {inputs} exceeds the model's max_input_tokens "
                f"({model.max_input_tokens})"
            )
        if outputs > model.max_output_tokens:
            raise Invalid(
                f"output_tokens: {outputs} exceeds the model's max_output_tokens "
                f"({model.max_output_tokens})"
            )

    def route(self, client_site: str, input_tokens: int, output_tokens: int) -> RouteOut:
        view = self.core.view()
        self._check_route_args(view, client_site, input_tokens, output_tokens)
        now = self.core.clock()
        with self.core.view_lock:
            plan = view.query(client_site, input_tokens, output_tokens, now)
        if plan is None:
            raise Unavailable(
                "no chain of live servers covers every block right now",
                retry_after_s=self.settings.heartbeat_interval_s,
            )
        out = route_out(view, client_site, plan)
        self.core.activity.routed(now, out)
        return out

    def book(self, body: SessionIn) -> SessionOut:
        """WS-RR: route with waiting times, then reserve cache on every hop in one transaction."""
        for _attempt in range(BOOK_ATTEMPTS):
            view = self.core.view()
            self._check_route_args(view, body.client_site, body.input_tokens, body.output_tokens)
            now = self.core.clock()
            if view.earliest_expiry() <= now:
                self.sweep()
            with self.core.view_lock:
                plan = view.query(body.client_site, body.input_tokens, body.output_tokens, now)
            if plan is None or not math.isfinite(plan.wait_ms):
                self._rejected(body.client_site, None, "no chain with enough cache")
                raise Unavailable(
                    "no chain of live servers with enough attention cache covers every block",
                    retry_after_s=self.settings.heartbeat_interval_s,
                )
            if plan.wait_ms > 0:
                self._rejected(body.client_site, plan.wait_ms, "every chain is full")
                raise Unavailable(
                    f"every chain is full; the first frees in {plan.wait_ms / 1000:.1f} s",
                    retry_after_s=plan.wait_ms / 1000,
                )
            session = self._reserve(view, body, plan, now)
            if session is not None:
                self.core.counters.sessions_booked += 1
                self.core.activity.booked(now, session.route, session.id)
                return session
            self.core.invalidate()  # another process took the slots: look again
        self._rejected(body.client_site, None, "cache slots contended")
        raise Unavailable("cache slots are contended; retry", retry_after_s=1.0)

    def _rejected(self, client_site: str, wait_ms: float | None, detail: str) -> None:
        self.core.counters.sessions_rejected += 1
        self.core.activity.rejected(self.core.clock(), client_site, wait_ms, detail)

    def _reserve(
        self, view: RouteView, body: SessionIn, plan: RoutePlan, now: float
    ) -> SessionOut | None:
        session_id = uuid.uuid4().hex
        expires_at = now + plan.timing.total_ms / 1000 + self.settings.session_grace_s
        hops = [(view.entries[h.server].id, h.start, h.end, h.blocks) for h in plan.hops]
        row = SessionRow(
            id=session_id,
            client_site=body.client_site,
            input_tokens=body.input_tokens,
            output_tokens=body.output_tokens,
            generation=view.generation,
            created_at=now,
            expires_at=expires_at,
            first_token_ms=plan.timing.first_token_ms,
            per_token_ms=plan.timing.per_token_ms,
            path=json.dumps([[s, a, b] for s, a, b, _ in hops]),
        )
        try:
            with self.core.booking_tx() as db:
                if not repo.Sessions(db).book(row, [(h[0], h[3]) for h in hops], now):
                    raise _Contended()  # rolls back the hops already taken
        except _Contended:
            return None
        with self.core.view_lock:
            for server_id, _, _, blocks in hops:
                view.add_reservation(server_id, blocks, expires_at)
        return SessionOut(
            id=session_id,
            expires_in_s=expires_at - now,
            route=route_out(view, body.client_site, plan),
        )

    def release(self, session_id: str) -> None:
        with self.core.booking_tx() as db:
            released = repo.Sessions(db).release(session_id)
        if released is None:
            raise NotFound(f"session {session_id!r} does not exist (released or expired)")
        self._forget(released)

    def _forget(self, released: list[repo.Held]) -> None:
        """Mirror released reservations in the route view until its next rebuild."""
        with self.core.view_lock:
            view = self.core.cached_view()
            if view is not None:
                for held in released:
                    view.remove_reservation(held.server_id, held.slots, held.expires_at)

    def sweep(self) -> int:
        """Release every session past its expiry (predicted completion plus grace)."""
        now = self.core.clock()
        with self.core.read_tx() as db:
            expired = repo.Sessions(db).expired_ids(now)
        if not expired:
            return 0
        # On PostgreSQL every release commits by itself (booking_tx): one transaction holding
        # many sessions' server rows would lock them out of id order and could deadlock.
        with self.core.booking_tx() as db:
            released = repo.Sessions(db).release_all(expired)
        self._forget(released)
        return len(expired)

    def active(self) -> int:
        with self.core.read_tx() as db:
            return repo.Sessions(db).count()


def route_out(view: RouteView, client_site: str, plan: RoutePlan) -> RouteOut:
    return RouteOut(
        generation=view.generation,
        client_site=client_site,
        hops=[
            RouteHop(
                server_id=entry.id,
                address=entry.address,
                start=h.start,
                end=h.end,
                peer_id=entry.peer_id,
                multiaddrs=list(entry.multiaddrs),
            )
            for h in plan.hops
            for entry in (view.entries[h.server],)
        ],
        first_token_ms=plan.timing.first_token_ms,
        per_token_ms=plan.timing.per_token_ms,
        total_ms=plan.timing.total_ms,
        wait_ms=plan.wait_ms,
    )
