"""Routes and sessions: route queries, bookings (JFFC over the published chains, else WS-RR,
both app.allocation.dispatch), the central FIFO queue, releases with the session's own
token, session status, and the sweep (expired sessions, sessions through a lost server).

Transaction boundaries:
- ``route``: none (the in-memory route view).
- ``start`` (a booking): an Idempotency-Key retry is one write transaction (the token is
  rotated); a client quota is checked in the booking statement; each attempt is one
  ``booking_tx``: units on every hop, the session, its reservations and its record, all or
  nothing, and only while no ticket waits in the queue (one autocommitted statement on
  PostgreSQL). An attempt another process beat to the units invalidates the view and tries
  again, at most BOOK_ATTEMPTS times. No free chain and wait_s > 0: ``queue.enqueue`` (one
  write transaction); the queue admits it later in its own transaction (app.service.queue).
- ``release``: one ``booking_tx`` (the record ended, the session deleted, units given back).
- ``status``: one read transaction.
- ``sweep``: app.service.session_sweep (a booking's own sweep ends at most
  BOOKING_SWEEP_LIMIT expired sessions).
The route view mirrors units taken and given back (and JFFC's jobs per chain) until its next
rebuild.
"""

from __future__ import annotations

import json
import math
import secrets
import uuid
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.allocation import dispatch
from app.allocation.workload import WorkloadProfile
from app.logging import get_logger
from app.service import telemetry
from app.service.audit import audit
from app.service.auth import hash_token, is_admin
from app.service.clients import ClientDirectory, ClientIdentity, RateLimiter
from app.service.core import Core, WouldBlock
from app.service.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized, Unavailable
from app.service.queue import (
    CentralQueue,
    HeadOverQuota,
    HeadRefused,
    QuotaHeld,
    TooManyRequests,
    replay_ticket,
)
from app.service.routeview import RoutePlan, RouteView
from app.service.schemas import RouteOut, SessionIn
from app.service.session_replies import (
    Booked,
    Pending,
    Reserved,
    reply_out,
    route_out,
    stored_reply,
)
from app.service.session_schemas import BookingIn, BookingOut, SessionStatusOut
from app.service.session_settings import SessionSettings
from app.service.session_sweep import BOOKING_SWEEP_LIMIT, SessionSweeper
from app.service.workload_window import WorkloadWindow
from app.store.booking_queue import BookingQueue, QueuedRequest, Ticket
from app.store.bookings import Bookings, NewSession, Released
from app.store.models import SessionRow
from app.store.reservations import Held
from app.store.sessions import Sessions

log = get_logger("bprr.sessions")
BOOK_ATTEMPTS = 4
INTERNAL = ClientIdentity("internal", 0, 0.0, 1)  # the coordinator's own callers (tests)


class _Refused(Exception):
    """Rolls a refused SQLite booking back (hops already taken)."""


class SessionService:
    def __init__(self, core: Core, config: SessionSettings | None = None) -> None:
        self.core = core
        self.settings = core.settings
        self.config = config or SessionSettings()
        self.clients = ClientDirectory(self.config)
        self.limiter = RateLimiter()
        self.window = WorkloadWindow()
        self.sweeper = SessionSweeper(core, self.config, self._forget, self._units_freed)
        self.queue = CentralQueue(
            core.tx,
            core.clock,
            core.instance_id,
            self.config,
            self._admit_head,
            on_depth=telemetry.set_queue_depth,
            on_orphan=self._release_orphan,
            stop=core.stop,
        )

    def close(self) -> None:
        self.queue.close()

    # --- identity ----------------------------------------------------------------------------

    def identify(self, token: str | None, address: str | None) -> ClientIdentity:
        return self.clients.identify(token, address, is_admin(self.settings, token))

    # --- routes ------------------------------------------------------------------------------

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

    def _plan(
        self, view: RouteView, client_site: str, inputs: int, outputs: int, now: float
    ) -> RoutePlan | None:
        if view.chain_in_service is None:
            with self.core.read_tx() as db:
                counts = Bookings(db).in_service(view.generation)
            with self.core.view_lock:
                if view.chain_in_service is None:
                    view.chain_in_service = [counts.get(k, 0) for k in view.chain_ids]
        with self.core.view_lock:
            return view.query(client_site, inputs, outputs, now)

    def route(self, client_site: str, input_tokens: int, output_tokens: int) -> RouteOut:
        view = self.core.view()
        self._check_route_args(view, client_site, input_tokens, output_tokens)
        now = self.core.clock()
        plan = self._plan(view, client_site, input_tokens, output_tokens, now)
        if plan is None:
            raise Unavailable(
                "no chain of live servers covers every block right now",
                retry_after_s=self.settings.heartbeat_interval_s,
            )
        out = route_out(view, client_site, plan)
        self.core.activity.routed(now, out)
        return out

    # --- bookings ----------------------------------------------------------------------------

    def book(
        self,
        body: BookingIn | SessionIn,
        client: ClientIdentity | None = None,
        idempotency_key: str | None = None,
    ) -> BookingOut:
        """A booking from a thread (tests, the facade): waits in the queue for wait_s."""
        started = self.start(body, client, idempotency_key)
        if isinstance(started, Booked):
            return started.out
        reply: str | None
        try:
            reply = started.future.result(timeout=started.wait_s)
        except FutureTimeout:
            reply = self.queue.withdraw(started.session_id, started.future)
        if reply is None:
            raise self.timed_out(started)
        return self.finish(started, reply)

    def start(
        self,
        body: BookingIn | SessionIn,
        client: ClientIdentity | None = None,
        idempotency_key: str | None = None,
    ) -> Booked | Pending:
        """Book now (Booked), or put the request in the central queue (Pending, wait_s > 0),
        or refuse (503 with Retry-After; 429 over a quota or the queue's bound)."""
        client = client or INTERNAL
        wait_s = float(getattr(body, "wait_s", 0.0))
        if wait_s > self.config.queue_max_wait_s:
            raise Invalid(
                f"wait_s: {wait_s:g} exceeds the longest wait this coordinator allows "
                f"({self.config.queue_max_wait_s:g} s)"
            )
        view = self.core.view()
        site, inputs, outputs = body.client_site, body.input_tokens, body.output_tokens
        self._check_route_args(view, site, inputs, outputs)
        now = self.core.clock()
        blocked = False
        try:
            return self._start(body, client, idempotency_key, wait_s, now)
        except WouldBlock:
            # Nothing was booked on the event loop: the retry in a thread counts it once.
            blocked = True
            raise
        finally:
            if not blocked:
                self.window.add(now, inputs, outputs)

    def _start(
        self,
        body: BookingIn | SessionIn,
        client: ClientIdentity,
        idempotency_key: str | None,
        wait_s: float,
        now: float,
    ) -> Booked | Pending:
        site = body.client_site
        if idempotency_key is not None:
            again = self._replay(client, idempotency_key, now)
            if again is not None:
                return again
        retry_in = self.limiter.take(client, now)
        if retry_in > 0:
            self._refused(site, "rate_limited", None, "client over its booking rate")
            raise TooManyRequests(
                f"client {client.name!r} is over its booking rate "
                f"({client.rate_per_s:g}/s, burst {client.burst})",
                retry_after_s=retry_in,
            )
        try:
            return self._book_or_enqueue(body, client, idempotency_key, wait_s)
        except WouldBlock:
            self.limiter.give_back(client)  # the retry in a thread takes it again
            raise

    def _book_or_enqueue(
        self,
        body: BookingIn | SessionIn,
        client: ClientIdentity,
        idempotency_key: str | None,
        wait_s: float,
    ) -> Booked | Pending:
        site, inputs, outputs = body.client_site, body.input_tokens, body.output_tokens
        session_id, token = uuid.uuid4().hex, secrets.token_urlsafe(32)
        token_hash = hash_token(token)
        wait_ms = self.config.queue_poll_s * 1000
        for _attempt in range(BOOK_ATTEMPTS):
            view = self.core.view()
            now = self.core.clock()
            if view.earliest_expiry() <= now:
                self.sweeper.sweep(now, lost=False, limit=BOOKING_SWEEP_LIMIT)
            plan = self._plan(view, site, inputs, outputs, now)
            if plan is None or not math.isfinite(plan.wait_ms):
                self._refused(site, "refused", None, "no chain with enough cache")
                raise Unavailable(
                    "no chain of live servers with enough attention cache covers every block",
                    retry_after_s=self.settings.heartbeat_interval_s,
                )
            if plan.wait_ms > 0:
                wait_ms = plan.wait_ms
                break
            try:
                reserved = self._reserve(
                    view,
                    body,
                    plan,
                    now,
                    session_id,
                    token_hash,
                    client.name,
                    client.max_sessions,
                    idempotency_key,
                )
            except IntegrityError:  # the same Idempotency-Key booked concurrently
                if idempotency_key is None:
                    raise
                again = self._replay(client, idempotency_key, now)
                if again is None:
                    raise Conflict("Idempotency-Key: booked concurrently; retry") from None
                return again
            booked = reserved.outcome
            if booked == "booked":
                out = BookingOut(
                    id=session_id,
                    expires_in_s=max(0.0, reserved.expires_at - now),
                    route=reserved.route,
                    token=token,
                )
                return self._booked(now, out)
            if booked == "queued":  # tickets wait: they come first
                self.queue.last_depth = max(1, self.queue.last_depth)
                self.queue.kick()
                break
            if booked == "quota":
                self._refused(site, "rate_limited", None, "client at its session quota")
                raise TooManyRequests(
                    f"client {client.name!r} holds its quota of {client.max_sessions} "
                    "live sessions; release one",
                    retry_after_s=self.settings.heartbeat_interval_s,
                )
            self.core.invalidate()  # another process took the units: look again
        if wait_s > 0:
            return self._enqueue(body, client, idempotency_key, session_id, token, wait_s)
        self._refused(site, "refused", wait_ms, "every chain is full")
        raise Unavailable(
            f"every chain is full; one may free in {wait_ms / 1000:.1f} s "
            "(or wait in the queue: wait_s)",
            retry_after_s=wait_ms / 1000,
        )

    def _enqueue(
        self,
        body: BookingIn | SessionIn,
        client: ClientIdentity,
        key: str | None,
        session_id: str,
        token: str,
        wait_s: float,
    ) -> Booked | Pending:
        request = QueuedRequest(
            session_id,
            hash_token(token),
            client.name,
            key,
            body.client_site,
            body.input_tokens,
            body.output_tokens,
            client.max_sessions,
        )
        try:
            future = self.queue.enqueue(request, wait_s)
        except QuotaHeld:
            self._refused(body.client_site, "rate_limited", None, "client at its session quota")
            raise
        except TooManyRequests:
            self._refused(body.client_site, "queue_full", None, "the queue is full")
            raise
        except IntegrityError:  # a ticket with this Idempotency-Key was enqueued meanwhile
            if key is None:
                raise
            again = self._replay(client, key, self.core.clock())  # 409 while it waits
            if again is None:
                raise Conflict("Idempotency-Key: booked concurrently; retry") from None
            return again
        return Pending(session_id, token, future, body.client_site, wait_s, self.core.clock())

    def finish(self, pending: Pending, reply: str) -> BookingOut:
        """The reply of a queued booking once admitted."""
        now = self.core.clock()
        out = reply_out(reply, pending.token, now)
        telemetry.record_booking(pending.client_site, "booked", max(0.0, now - pending.enqueued_at))
        self.core.counters.sessions_booked += 1
        self.core.activity.booked(now, out.route)
        return out

    def timed_out(self, pending: Pending) -> Unavailable:
        now = self.core.clock()
        self._refused(pending.client_site, "queue_timeout", None, "waited wait_s in the queue")
        telemetry.record_booking(pending.client_site, "queue_timeout", now - pending.enqueued_at)
        return Unavailable(
            f"no chain freed within wait_s ({pending.wait_s:g} s)",
            retry_after_s=self.config.queue_poll_s,
        )

    def abandon(self, pending: Pending) -> None:
        """The client went away while waiting: leave the queue, release if just admitted."""
        reply = self.queue.withdraw(pending.session_id, pending.future)
        if reply is not None:
            self._release_orphan(pending.session_id)

    def _booked(self, now: float, out: BookingOut) -> Booked:
        self.core.counters.sessions_booked += 1
        # Public GETs never show session ids (GET /v1/routes/recent): none is logged.
        self.core.activity.booked(now, out.route)
        telemetry.record_booking(out.route.client_site, "booked", 0.0)
        return Booked(out, True)

    def _refused(self, site: str, outcome: str, wait_ms: float | None, detail: str) -> None:
        self.core.counters.sessions_rejected += 1
        self.core.activity.rejected(self.core.clock(), site, wait_ms, detail)
        if outcome in {"refused", "queue_full", "rate_limited"}:
            telemetry.record_booking(site, outcome, 0.0)

    def _reserve(
        self,
        view: RouteView,
        body: BookingIn | SessionIn | QueuedRequest,
        plan: RoutePlan,
        now: float,
        session_id: str,
        token_hash: str,
        client: str,
        quota: int,
        key: str | None,
        db: Session | None = None,
    ) -> Reserved:
        """Take the units of ``plan`` for the request: "booked" (with the reply stored for
        status and retries), or why not ("full", "queued", "quota"). ``db``: inside the
        queue's admission transaction (no queue check; a savepoint rolls a refused SQLite
        booking back). ``quota``: the client's live sessions at most (0: no limit)."""
        expires_at = now + plan.timing.total_ms / 1000 + self.settings.session_grace_s
        tokens = dispatch.tokens_of(body.input_tokens, body.output_tokens)
        units = dispatch.units_needed(plan.hops, tokens)
        holds = tuple(sorted((view.entries[s].id, n) for s, n in units.items()))
        route = route_out(view, body.client_site, plan)
        queued = db is not None
        new = NewSession(
            id=session_id,
            token_hash=token_hash,
            client=client,
            idempotency_key=key,
            client_site=body.client_site,
            input_tokens=body.input_tokens,
            output_tokens=body.output_tokens,
            generation=view.generation,
            chain=plan.chain,
            created_at=now,
            expires_at=expires_at,
            first_token_ms=plan.timing.first_token_ms,
            per_token_ms=plan.timing.per_token_ms,
            path=json.dumps([[view.entries[h.server].id, h.start, h.end] for h in plan.hops]),
            reply=stored_reply(session_id, expires_at, route),
            holds=holds,
        )
        stale = None if queued else self.queue.stale_before(now)
        try:
            if db is not None:
                with db.begin_nested():
                    check = Bookings(db).book(new, now, quota=quota)
                    if not check.ok:
                        raise _Refused()
            else:
                with self.core.booking_tx() as tx:
                    check = Bookings(tx).book(new, now, queue_stale_before=stale, quota=quota)
                    if not check.ok:
                        raise _Refused()
        except _Refused:
            why = "queued" if not check.clear else "quota" if not check.within else "full"
            return Reserved(why, "", route, expires_at)
        with self.core.view_lock:
            for server_id, n in holds:
                view.add_reservation(server_id, n, expires_at)
            view.chain_started(plan.chain)
        return Reserved("booked", new.reply, route, expires_at)

    def _replay(self, client: ClientIdentity, key: str, now: float) -> Booked | None:
        """The session booked before with this client's Idempotency-Key, with a new token
        (the first reply may never have arrived; only its hash was kept)."""
        token = secrets.token_urlsafe(32)
        with self.core.tx() as db:
            bookings = Bookings(db)
            record = bookings.by_key(client.name, key)
            if record is None:
                if BookingQueue(db).find_waiting(client.name, key) is not None:
                    raise Conflict(
                        "Idempotency-Key: the booking with this key is still waiting in the queue"
                    )
                return None
            bookings.rotate_token(record.id, hash_token(token))
            reply = record.reply
        return Booked(reply_out(reply, token, now), False)

    # --- the queue's admission ---------------------------------------------------------------

    def _admit_head(self, db: Session, ticket: Ticket, now: float) -> str | None:
        """Book the queue's head in the admission transaction (see app.service.queue)."""
        request = ticket.request
        view = self.core.view()
        try:
            self._check_route_args(
                view, request.client_site, request.input_tokens, request.output_tokens
            )
        except (Conflict, Invalid) as error:
            raise HeadRefused(error.message) from None
        plan = self._plan(
            view, request.client_site, request.input_tokens, request.output_tokens, now
        )
        if plan is None or not math.isfinite(plan.wait_ms):
            raise HeadRefused(
                "no chain of live servers with enough attention cache covers every block"
            )
        if plan.wait_ms > 0:
            return None
        try:
            reserved = self._reserve(
                view,
                request,
                plan,
                now,
                request.session_id,
                request.token_hash,
                request.client,
                request.max_sessions,
                request.idempotency_key,
                db=db,
            )
        except IntegrityError:  # a session was booked with this Idempotency-Key meanwhile
            return replay_ticket(db, request)
        if reserved.outcome == "quota":
            raise HeadOverQuota(
                f"client {request.client!r} holds its quota of {request.max_sessions} live "
                "sessions; release one"
            )
        if reserved.outcome != "booked":
            self.core.invalidate()  # the view was stale; the next round looks again
            return None
        return reserved.reply

    def _release_orphan(self, session_id: str) -> None:
        try:
            self._release(session_id, None, "abandoned")
        except WouldBlock:  # on the event loop: run_write retries in a thread
            raise
        except Exception as error:  # it expires by itself
            log.warning("orphan not released", session=session_id, error=str(error))

    # --- releases, status, sweep -----------------------------------------------------------

    def release(self, session_id: str, token: str | None = None) -> None:
        """DELETE /v1/sessions/{id}: with the session's token or the admin token. Audited
        (session_released, or session_release_refused with the reason)."""
        if token is None:
            audit("session_release_refused", session=session_id, reason="no token")
            raise Unauthorized("missing bearer token (the session's token or the admin token)")
        admin = is_admin(self.settings, token)
        released = self._release(session_id, None if admin else hash_token(token), "released")
        if released.ended or released.deleted:
            audit("session_released", session=session_id, by="admin" if admin else "owner")
            return
        with self.core.read_tx() as db:
            record = Bookings(db).record(session_id)
        if record is None:
            raise NotFound(f"session {session_id!r} does not exist (released or expired)")
        if record.ended_at is not None:
            raise NotFound(f"session {session_id!r} does not exist (it ended: {record.end_reason})")
        audit("session_release_refused", session=session_id, reason="not the session's token")
        raise Forbidden(f"the bearer token is not session {session_id!r}'s token")

    def _release(self, session_id: str, token_hash: str | None, reason: str) -> Released:
        now = self.core.clock()
        with self.core.booking_tx() as db:
            released = Bookings(db).release(session_id, token_hash, now, reason)
        self._forget(released.held, [released])
        if released.held:
            self._units_freed()
        return released

    def _units_freed(self) -> None:
        """Wake the queue's admission when someone may be waiting (a ticket seen here, or a
        direct booking refused because of one); other processes' tickets are also found by
        their own holders' polling."""
        if self.queue.last_depth > 0 or self.queue.local_waiting() > 0:
            self.queue.kick()

    def _forget(self, released: list[Held], ended: list[Released]) -> None:
        """Mirror released reservations (and JFFC's jobs per chain) in the route view until
        its next rebuild."""
        with self.core.view_lock:
            view = self.core.cached_view()
            if view is None:
                return
            for held in released:
                view.remove_reservation(held.server_id, held.slots, held.expires_at)
            for session in ended:
                if session.generation == view.generation:
                    view.chain_ended(session.chain)

    def status(self, session_id: str, token: str | None) -> SessionStatusOut:
        if token is None:
            raise Unauthorized("missing bearer token (the session's token or the admin token)")
        now = self.core.clock()
        with self.core.read_tx() as db:
            record = Bookings(db).record(session_id)
            live = db.get(SessionRow, session_id)
            expires_at = None if live is None else live.expires_at
        if record is None:
            raise NotFound(f"session {session_id!r} does not exist")
        if not is_admin(self.settings, token) and hash_token(token) != record.token_hash:
            raise Forbidden(f"the bearer token is not session {session_id!r}'s token")
        reply = json.loads(record.reply)
        ended = record.ended_at is not None or live is None
        return SessionStatusOut(
            id=record.id,
            state="ended" if ended else "active",
            end_reason=record.end_reason if ended else None,
            created_at=record.created_at,
            ended_at=record.ended_at,
            expires_in_s=None if ended or expires_at is None else max(0.0, expires_at - now),
            route=RouteOut(**reply["route"]),
        )

    def sweep(self) -> int:
        """End every session past its expiry, and every session through a server that is
        gone (lease expired, left, re-registered): their clients learn it from
        GET /v1/sessions/{id} ("expired", "server_lost"). Run by every replica's planner
        tick; a booking that finds an expired reservation sweeps the expired ones only."""
        return self.sweeper.sweep(self.core.clock(), lost=True)

    def active(self) -> int:
        with self.core.read_tx() as db:
            return Sessions(db).count()

    def profile(self) -> WorkloadProfile | None:
        """The load this process has seen (a rolling window of booking requests), for the
        scenario export; None before enough requests were seen."""
        return self.window.profile(self.core.clock())

    def profile_workload(self) -> dict[str, object] | None:
        """The measured profile as a scenario's Poisson workload (docs/SCENARIO.md: rate and
        length distributions; as many requests as one window holds), for GET /v1/scenario,
        so that ``bprr solve``/``bprr simulate`` on the export replay the live load."""
        profile = self.profile()
        if profile is None:
            return None
        requests = max(1, round(profile.rate_per_s * self.window.window_s))
        return {"arrival": "poisson", "num_requests": requests, **profile.to_json()}
