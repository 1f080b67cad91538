"""The coordinator service: every API call is one method here, run in one transaction.

The data access lives in app.store.repositories (one small class per aggregate; they never
commit). Each public method here opens exactly one transaction with ``self.tx()`` (or
``self.read_tx()`` for reads) and keeps the business rules: authentication, validation, what a
heartbeat changes, when to re-plan. Route queries run on the in-memory RouteView and touch the
database only to reserve cache (bookings) or to rebuild the view.

On SQLite (one process: ``bprr serve`` refuses several workers there) the write transactions
of this process are serialised by a lock taken before ``BEGIN IMMEDIATE``: waiting on a Python
lock hands over in microseconds, whereas SQLite's busy handler sleeps in steps of up to 100 ms,
which made heartbeat and booking latencies reach seconds under load.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.allocation import cg
from app.allocation.instance import Instance, Span
from app.allocation.scenario import ScenarioError, parse_scenario
from app.allocation.solve import Solution, default_concurrency
from app.logging import get_logger
from app.service import planner
from app.service.activity import RouteLog
from app.service.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from app.service.routeview import RoutePlan, RouteView, cache_slots, model_cache_gb
from app.service.schemas import (
    Heartbeat,
    HeartbeatOut,
    LoadedServer,
    ModelIn,
    ModelOut,
    Overheads,
    PlacedSpan,
    PlacementOut,
    PlacementRequest,
    PrefillSpeed,
    RegistrationOut,
    RouteHop,
    RouteOut,
    RttEntry,
    ScenarioLoadOut,
    ServerOut,
    ServerRegistration,
    SessionIn,
    SessionOut,
    SpanModel,
)
from app.service.state import (
    LiveState,
    build_scenario,
    client_list,
    load_state,
    placement_spans,
    scenario_dict,
)
from app.settings import Settings
from app.store import db as store_db
from app.store import repositories as repo
from app.store.models import ModelRow, PlacementRow, ServerRow, SessionRow

log = get_logger("bprr.coordinator")
Clock = Callable[[], float]
BOOK_ATTEMPTS = 4


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _span(start: int | None, end: int | None) -> SpanModel | None:
    if start is None or end is None:
        return None
    return SpanModel(start=start, end=end)


# Quiet heartbeats' lease renewals are written behind in one batch at most this long after
# they arrive (leases last 15 s); other processes see them that much later.
LEASE_FLUSH_S = 0.1


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database that cannot be reached, or that aborted the work (a deadlock, a lost
    connection), is the service being unavailable for a moment: 503 with Retry-After, never
    a 500. The transaction has been rolled back; nothing was written."""
    try:
        yield
    except OperationalError as error:
        log.warning("database unavailable", error=type(error.orig or error).__name__)
        raise Unavailable("the database is unreachable or busy; retry", retry_after_s=1.0) from None


@dataclass
class Counters:
    sessions_booked: int = 0
    sessions_rejected: int = 0
    placements_published: int = 0
    solver_seconds: list[float] = field(default_factory=list)


class Coordinator:
    def __init__(
        self,
        settings: Settings,
        clock: Clock = time.time,
        engine: Engine | None = None,
        view_refresh_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine or store_db.make_engine(settings.database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = sessionmaker(store_db.read_only(self.engine), expire_on_commit=False)
        self.statement_sessions = sessionmaker(
            store_db.autocommit(self.engine), expire_on_commit=False
        )
        self._rebuild_lock = threading.Lock()
        # SQLite: one writer at a time in this process (see the module docstring).
        self.embedded_database = store_db.is_sqlite(self.engine)
        self._write_lock: threading.RLock | None = (
            threading.RLock() if self.embedded_database else None
        )
        self.instance_id = uuid.uuid4().hex
        self.view_refresh_s = view_refresh_s
        self.counters = Counters()
        self.activity = RouteLog()  # recent decisions, for the dashboard
        self.on_solve: Callable[[float], None] | None = None
        # The solver worker is killed this long after its time limit (tests shorten it).
        self.solver_grace_s = planner.SOLVER_GRACE_S
        self.on_reject: Callable[[], None] | None = None
        self._view: RouteView | None = None
        self._view_version = 0  # bumped by invalidate()
        self._view_lock = threading.RLock()
        self._plan_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flusher: threading.Thread | None = None
        self._renewals: dict[str, repo.LeaseRenewal] = {}
        self._renewals_lock = threading.Lock()
        self._local = threading.local()

    # --- life cycle --------------------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        store_db.ensure_schema(self.engine, self.settings.auto_migrate)
        with self.tx() as db:
            repo.PlannerState(db).ensure(self.clock())
        if self.settings.join_token is None:
            log.warning("registration is open: set BPRR_JOIN_TOKEN to require a join token")
        if background and self.settings.planner_interval_s > 0:
            self._thread = threading.Thread(target=self._planner_loop, daemon=True)
            self._thread.start()
        if background:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
            self._flusher.start()

    def close(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._flusher):
            if thread is not None:
                thread.join(timeout=30)
        for last_write in (self.flush_renewals, self.release_leadership):
            try:
                last_write()
            except Exception as error:  # the database is gone: leases expire by themselves
                log.warning("not written at shutdown", step=last_write.__name__, error=str(error))
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One write transaction (committed on exit, rolled back on an exception)."""
        with _database_errors():
            self.flush_renewals()
            with (
                self._nested(),
                self._write_lock or nullcontext(),
                self.sessions() as db,
                db.begin(),
            ):
                yield db

    @contextmanager
    def read_tx(self) -> Iterator[Session]:
        """A transaction that only reads (on SQLite it does not take the write lock)."""
        with _database_errors():
            self.flush_renewals()
            with self._nested(), self.read_sessions() as db, db.begin():
                yield db

    @contextmanager
    def booking_tx(self) -> Iterator[Session]:
        """The unit of work of a booking or a release. On PostgreSQL the repository does each
        in one statement, run in autocommit so that the chain's row locks are held only while
        the database runs it; on SQLite an ordinary write transaction."""
        if self.embedded_database:
            with self.tx() as db:
                yield db
            return
        with _database_errors():
            self.flush_renewals()
            with self._nested(), self.statement_sessions() as db:
                yield db

    @contextmanager
    def _nested(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def flush_renewals(self) -> None:
        """Write the pending lease renewals of quiet heartbeats in one transaction.

        Every transaction of this process calls it first, so this process reads its own
        renewals; the flusher thread calls it every LEASE_FLUSH_S for the other processes.
        Skipped inside a transaction of the same thread (its connection may hold SQLite's
        write lock).
        """
        if getattr(self._local, "depth", 0):
            return
        with self._renewals_lock:
            if not self._renewals:
                return
            pending = list(self._renewals.values())
            self._renewals.clear()
        with self._write_lock or nullcontext(), self.sessions() as db, db.begin():
            repo.Servers(db).renew_leases(pending)

    def _flush_loop(self) -> None:
        while not self._stop.wait(LEASE_FLUSH_S):
            try:
                self.flush_renewals()
            except Exception:  # the renewals are retried with the next heartbeats
                log.exception("lease renewal flush failed")

    # --- authentication ------------------------------------------------------------------------

    def check_admin(self, token: str | None) -> None:
        expected = self.settings.admin_token
        if expected is None:
            raise Forbidden("admin routes are disabled: set BPRR_ADMIN_TOKEN on the coordinator")
        if token is None:
            raise Unauthorized("missing bearer token (admin token required)")
        if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
            raise Forbidden("the bearer token is not the admin token")

    def is_admin(self, token: str | None) -> bool:
        expected = self.settings.admin_token
        return (
            expected is not None
            and token is not None
            and hmac.compare_digest(token.encode(), expected.get_secret_value().encode())
        )

    def check_measurer(self, token: str | None) -> None:
        """Measurements come from the operator (admin token) or from any registered server."""
        if self.is_admin(token):
            return
        if token is None:
            raise Unauthorized("missing bearer token (admin or a server's token is required)")
        with self.read_tx() as db:
            found = repo.Servers(db).exists_with_token_hash(hash_token(token))
        if not found:
            raise Forbidden("the bearer token is neither the admin token nor a server's token")

    def _check_server_token(self, row: ServerRow, token: str | None) -> None:
        if token is None:
            raise Unauthorized("missing bearer token (the server's own token is required)")
        if not hmac.compare_digest(hash_token(token), row.token_hash):
            raise Forbidden(f"the bearer token does not belong to server {row.id!r}")

    # --- the in-memory route view --------------------------------------------------------------

    def invalidate(self) -> None:
        with self._view_lock:
            self._view = None
            self._view_version += 1

    def view(self) -> RouteView:
        """The in-memory route view.

        A view older than ``view_refresh_s`` keeps answering while one background thread
        rebuilds it (stale-while-revalidate: a rebuild reads the whole swarm, ~20 ms at 200
        servers, and must not stall the request that happens to notice the age). After
        ``invalidate()`` (a local change) there is no view and the caller rebuilds it, so its
        own change is visible at once.
        """
        view = self.current_view()
        if view is not None:
            return view
        now = self.clock()
        with self._rebuild_lock:
            with self._view_lock:
                current = self._view
            if current is not None:
                return current  # another thread rebuilt it while we waited
            return self._rebuild(now)

    def current_view(self) -> RouteView | None:
        """The view if there is one (never reads the database): a stale one is returned
        while one background thread rebuilds it. None after ``invalidate()``."""
        now = self.clock()
        with self._view_lock:
            view = self._view
        stale = view is not None and now - view.built_at >= self.view_refresh_s
        if stale and self._rebuild_lock.acquire(blocking=False):
            threading.Thread(target=self._rebuild_and_release, args=(now,), daemon=True).start()
        return view

    def _rebuild(self, now: float) -> RouteView:
        with self._view_lock:
            version = self._view_version
        with self.read_tx() as db:
            state = load_state(db, with_reservations=True)
        fresh = RouteView(state, self.settings.default_site_rtt_ms, now)
        with self._view_lock:
            # A local change may have invalidated the view while this one was being read;
            # never put back a view that predates that change.
            if self._view_version == version:
                self._view = fresh
        return fresh

    def _rebuild_and_release(self, now: float) -> None:
        try:
            self._rebuild(now)
        except Exception:  # the stale view keeps serving; the next request retries
            log.exception("route view refresh failed")
        finally:
            self._rebuild_lock.release()

    # --- model -----------------------------------------------------------------------------------

    def get_model(self) -> ModelOut:
        with self.read_tx() as db:
            row = repo.Models(db).get()
            if row is None:
                raise NotFound("no model is set yet (PUT /v1/model)")
            return _model_out(row)

    def set_model(self, body: ModelIn) -> ModelOut:
        now = self.clock()
        with self.tx() as db:
            row = repo.Models(db).get_or_new()
            _apply_model(row, body, now)
            for server in repo.Servers(db).all():
                server.cache_slots = self._slots_for(row, server)
            repo.PlannerState(db).request("model changed", now)
            db.flush()
            out = _model_out(row)
        self.invalidate()
        return out

    @staticmethod
    def _slots_for(model: ModelRow | None, server: ServerRow) -> int:
        if model is None or server.loaded_start is None or server.loaded_end is None:
            return 0
        blocks = server.loaded_end - server.loaded_start
        return cache_slots(server.memory_gb, model.block_memory_gb, model_cache_gb(model), blocks)

    # --- servers ---------------------------------------------------------------------------------

    def register_server(self, body: ServerRegistration, join_token: str | None) -> RegistrationOut:
        expected = self.settings.join_token
        if expected is not None:
            if join_token is None:
                raise Unauthorized("missing bearer token (the join token is required)")
            if not hmac.compare_digest(join_token.encode(), expected.get_secret_value().encode()):
                raise Forbidden("the bearer token is not the join token")
        server_id = body.id or f"srv-{uuid.uuid4().hex[:12]}"
        token = secrets.token_urlsafe(32)
        now = self.clock()
        ttl = self.settings.lease_ttl_s
        try:
            with self.tx() as db:
                repo.Sites(db).ensure(body.site)
                servers = repo.Servers(db)
                row = servers.get(server_id)
                if row is not None:
                    if body.boot_epoch <= row.boot_epoch:
                        raise Conflict(
                            f"id: server {server_id!r} is already registered with boot epoch "
                            f"{row.boot_epoch}; re-register with a larger boot_epoch"
                        )
                    # The reservations first, then the row (a release's order), and the count
                    # lowered by what was dropped rather than set to 0: a booking committed in
                    # between keeps its reservation counted.
                    dropped = repo.Reservations(db).drop_for_server(server_id)
                    _apply_registration(row, body, hash_token(token), now, ttl)
                    servers.unreserve(server_id, dropped)
                else:
                    row = ServerRow(id=server_id, registered_at=now, reserved_slots=0)
                    servers.add(row)
                    _apply_registration(row, body, hash_token(token), now, ttl)
                repo.PlannerState(db).request(f"server {server_id} joined", now)
        except IntegrityError:
            raise Conflict(f"id: server {server_id!r} registered concurrently; retry") from None
        self.invalidate()
        log.info("server registered", server=server_id, site=body.site)
        return RegistrationOut(
            id=server_id,
            token=token,
            lease_ttl_s=self.settings.lease_ttl_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )

    def heartbeat(self, server_id: str, token: str | None, body: Heartbeat) -> HeartbeatOut:
        quick = self.quiet_heartbeat(server_id, token, body)
        if quick is not None:
            return quick
        now = self.clock()
        view = self.view()
        self._check_loaded_span(view, body)
        with self.tx() as db:
            changed = self._heartbeat_update(db, server_id, token, body, view.model, now)
        if changed:
            self.invalidate()
        else:
            # Fresh RTT or speed samples reach routes with the periodic refresh (at most
            # view_refresh_s later): rebuilding the view on every such heartbeat would cost a
            # full swarm read per heartbeat (~20 ms at 200 servers).
            with self._view_lock:
                view.renew(server_id, now + self.settings.lease_ttl_s)
        return self._heartbeat_out(view, server_id)

    def quiet_heartbeat(
        self, server_id: str, token: str | None, body: Heartbeat
    ) -> HeartbeatOut | None:
        """The fast path, without any database access: a heartbeat that changes nothing but
        the lease (and the free-slot report), when the route view vouches for its token,
        epoch, state and loaded span. None: take the full path (``heartbeat``).

        The renewal is written behind, with every other pending one, in one guarded
        executemany (group commit): by this process's next transaction or the flusher,
        within LEASE_FLUSH_S. A row changed meanwhile matches nothing and keeps its lease;
        the next heartbeat then takes the full path, as the refreshed view disagrees.
        """
        if token is None or body.rtts or body.decode_ms_per_block is not None:
            return None
        if body.prefill_ms_per_block is not None:
            return None
        view = self.current_view()
        if view is None:
            return None
        self._check_loaded_span(view, body)
        span = body.loaded_span
        loaded = (None, None) if span is None else (span.start, span.end)
        token_hash = hash_token(token)
        if view.heartbeat_keys.get(server_id) != (token_hash, body.boot_epoch, body.state, *loaded):
            return None
        now = self.clock()
        expires_at = now + self.settings.lease_ttl_s
        renewal = repo.LeaseRenewal(
            server_id,
            token_hash,
            body.boot_epoch,
            body.state,
            loaded,
            body.free_cache_slots,
            now,
            expires_at,
        )
        with self._renewals_lock:
            self._renewals[server_id] = renewal
        with self._view_lock:
            view.renew(server_id, expires_at)
        return self._heartbeat_out(view, server_id)

    @staticmethod
    def _check_loaded_span(view: RouteView, body: Heartbeat) -> None:
        model, span = view.model, body.loaded_span
        if span is not None and model is not None and span.end > model.num_blocks:
            raise Invalid(
                f"loaded_span.end: {span.end} is past the model's {model.num_blocks} blocks"
            )

    def _heartbeat_out(self, view: RouteView, server_id: str) -> HeartbeatOut:
        assigned = view.spans.get(server_id)
        return HeartbeatOut(
            server_id=server_id,
            generation=view.generation,
            assigned_span=None
            if assigned is None
            else SpanModel(start=assigned.start, end=assigned.end),
            lease_expires_in_s=self.settings.lease_ttl_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )

    def _heartbeat_update(
        self,
        db: Session,
        server_id: str,
        token: str | None,
        body: Heartbeat,
        model: ModelRow | None,
        now: float,
    ) -> bool:
        """The full heartbeat (checks, state, speeds, RTTs); True when what routes depend
        on (state, loaded span, boot epoch) changed."""
        alpha = self.settings.rtt_ewma_alpha
        row = repo.Servers(db).get(server_id)
        if row is None:
            raise NotFound(f"server {server_id!r} is not registered")
        self._check_server_token(row, token)
        if body.boot_epoch < row.boot_epoch:
            raise Conflict(
                f"boot_epoch: {body.boot_epoch} is older than the server's current boot "
                f"epoch {row.boot_epoch}; this heartbeat comes from a previous run"
            )
        if body.rtts:
            known = self._known_endpoints(db)
            for target in body.rtts:
                if target not in known:
                    raise Invalid(f"rtts.{target}: unknown server, site or client id")
        new_start = None if body.loaded_span is None else body.loaded_span.start
        new_end = None if body.loaded_span is None else body.loaded_span.end
        changed = (
            row.state != body.state
            or row.loaded_start != new_start
            or row.loaded_end != new_end
            or row.boot_epoch != body.boot_epoch
        )
        draining = row.state != body.state and body.state == "draining"
        row.boot_epoch = body.boot_epoch
        row.state = body.state
        row.loaded_start, row.loaded_end = new_start, new_end
        row.free_cache_slots = body.free_cache_slots
        row.cache_slots = self._slots_for(model, row)
        if body.decode_ms_per_block is not None:
            row.decode_ms_per_block = _ewma(
                row.decode_ms_per_block, body.decode_ms_per_block, alpha
            )
        if body.prefill_ms_per_block is not None:
            row.prefill_fixed_ms = _ewma(
                row.prefill_fixed_ms, body.prefill_ms_per_block.fixed, alpha
            )
            row.prefill_per_token_ms = _ewma(
                row.prefill_per_token_ms, body.prefill_ms_per_block.per_token, alpha
            )
        row.lease_expires_at = now + self.settings.lease_ttl_s
        row.last_heartbeat_at = now
        if draining:  # after the row's changes: the server row is locked first, as in `leave`
            repo.PlannerState(db).request(f"server {server_id} is draining", now)
        rtts = repo.Rtts(db)
        for target, value in body.rtts.items():
            rtts.smooth(server_id, target, value, alpha, now)
        return changed

    def leave(self, server_id: str, token: str | None) -> None:
        now = self.clock()
        with self.tx() as db:
            servers = repo.Servers(db)
            row = servers.get(server_id)
            if row is None:
                raise NotFound(f"server {server_id!r} is not registered")
            if not self.is_admin(token):
                self._check_server_token(row, token)
            servers.remove(row)
            repo.PlannerState(db).request(f"server {server_id} left", now)
        self.invalidate()
        log.info("server left", server=server_id)

    def list_servers(self) -> list[ServerOut]:
        now = self.clock()
        with self.read_tx() as db:
            rows = repo.Servers(db).all()
            spans = placement_spans(repo.Placements(db).current())
        return [_server_out(r, spans.get(r.id), now) for r in rows]

    def get_server(self, server_id: str) -> ServerOut:
        now = self.clock()
        with self.read_tx() as db:
            row = repo.Servers(db).get(server_id)
            if row is None:
                raise NotFound(f"server {server_id!r} is not registered")
            spans = placement_spans(repo.Placements(db).current())
        return _server_out(row, spans.get(server_id), now)

    # --- measurements ----------------------------------------------------------------------------

    @staticmethod
    def _known_endpoints(db: Session) -> set[str]:
        known = set(repo.Sites(db).names())
        known.update(repo.Servers(db).ids())
        known.update(repo.Clients(db).ids())
        return known

    def put_rtts(self, entries: list[RttEntry]) -> int:
        now = self.clock()
        alpha = self.settings.rtt_ewma_alpha
        with self.tx() as db:
            known = self._known_endpoints(db)
            sites = set(repo.Sites(db).names())
            client_sites = {c.id: c.site for c in repo.Clients(db).all()}
            for i, entry in enumerate(entries):
                for end in ("a", "b"):
                    value = getattr(entry, end)
                    if value not in known:
                        raise Invalid(
                            f"entries[{i}].{end}: unknown site, server or client {value!r}"
                        )
            rtts = repo.Rtts(db)
            for entry in entries:
                # A client's RTT is stored for its site: routes are asked per client site.
                a = client_sites.get(entry.a, entry.a) if entry.a not in sites else entry.a
                b = client_sites.get(entry.b, entry.b) if entry.b not in sites else entry.b
                rtts.smooth(a, b, entry.rtt_ms, alpha, now)
        self.invalidate()
        return len(entries)

    # --- placements ------------------------------------------------------------------------------

    def _planning_input(self, db: Session, now: float) -> tuple[LiveState, list[ServerRow]]:
        state = load_state(db)
        if state.model is None:
            raise Conflict("no model is set yet (PUT /v1/model)")
        live = _plannable(state, now)
        if not live:
            raise Conflict(
                "no server with a live lease (and memory for one block and one cache) "
                "to place blocks on"
            )
        return state, live

    def _concurrency(
        self, state: LiveState, instance: Instance, scenario_rate: float | None
    ) -> int:
        model = state.model
        assert model is not None
        best = cg.max_feasible_concurrency(instance)
        if best < 1:
            raise Conflict(
                "the live servers cannot hold the model even for one request "
                f"({instance.num_blocks} blocks)"
            )
        if model.concurrency is not None:
            wanted = model.concurrency
        elif scenario_rate is not None:
            wanted = cg.design_concurrency(instance, scenario_rate)
        elif self.settings.default_concurrency > 0:
            wanted = self.settings.default_concurrency
        else:
            wanted = max(1, instance.num_clients)
        return max(1, min(wanted, best))

    def compute_placement(self, request: PlacementRequest) -> PlacementOut:
        """POST /v1/placements: solve now (worker process) and publish as a new generation."""
        now = self.clock()
        with self.read_tx() as db:
            state, live = self._planning_input(db, now)
            scenario = build_scenario(state, live, self.settings.default_site_rtt_ms)
        instance = Instance.from_scenario(scenario)
        model = state.model
        assert model is not None
        if request.concurrency is not None:
            concurrency = request.concurrency
        else:
            concurrency = self._concurrency(state, instance, model.rate_per_s)
        limit = request.time_limit_s or self.settings.planner_time_limit_s
        solution = self._solve(scenario, request.algorithm, concurrency, limit)
        objective = planner.evaluate(
            instance, solution.placement, scenario.client_request_counts(concurrency)
        )
        spans = {
            instance.server_ids[j]: span
            for j, span in enumerate(solution.placement)
            if span is not None
        }
        return self._publish(
            solution,
            spans,
            objective if objective is not None else solution.objective_ms_per_token,
            scenario.model_dump(mode="json", exclude_none=True),
            "requested by the operator",
            solution.status,
        )

    def _solve(self, scenario: Any, algorithm: str, concurrency: int, limit: float) -> Solution:
        try:
            solution = planner.run_solver(
                scenario, algorithm, concurrency, limit, grace_s=self.solver_grace_s
            )
        except planner.SolverTimeout as error:
            raise Unavailable(str(error), retry_after_s=limit) from None
        except planner.SolverNoSolution as error:
            raise Invalid(f"time_limit_s: {error}") from None
        except planner.SolverError as error:
            raise Invalid(f"algorithm: {error}") from None
        self.counters.solver_seconds.append(solution.solve_seconds)
        if self.on_solve is not None:
            self.on_solve(solution.solve_seconds)
        return solution

    def _publish(
        self,
        solution: Solution,
        spans: dict[str, Span],
        objective: float,
        inputs: dict[str, Any],
        reason: str,
        status: str,
    ) -> PlacementOut:
        now = self.clock()
        for _ in range(3):
            try:
                with self.tx() as db:
                    placements = repo.Placements(db)
                    row = PlacementRow(
                        generation=placements.latest_generation() + 1,
                        algorithm=solution.algorithm,
                        concurrency=solution.concurrency,
                        objective_ms_per_token=float(objective),
                        bound_ms_per_token=solution.bound_ms_per_token,
                        status=status,
                        solve_seconds=solution.solve_seconds,
                        reason=reason[:500],
                        created_at=now,
                        inputs=json.dumps(inputs),
                        spans=json.dumps({k: [v.start, v.end] for k, v in spans.items()}),
                    )
                    placements.add(row)
                    out = _placement_out(row)
                break
            except IntegrityError:  # another process published the same generation first
                continue
        else:
            raise Conflict("another coordinator kept publishing placements; retry")
        self.counters.placements_published += 1
        self.invalidate()
        log.info(
            "placement published",
            generation=out.generation,
            reason=reason,
            objective_ms_per_token=round(objective, 3),
        )
        return out

    def get_placement(self, generation: int | None) -> PlacementOut:
        with self.read_tx() as db:
            placements = repo.Placements(db)
            if generation is None:
                row = placements.current()
                if row is None:
                    raise NotFound("no placement has been published yet")
            else:
                row = placements.get(generation)
                if row is None:
                    raise NotFound(f"generation: no placement with generation {generation}")
            return _placement_out(row)

    def current_generation(self) -> int:
        return self.view().generation

    # --- routes and sessions ------------------------------------------------------------------

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
        view = self.view()
        self._check_route_args(view, client_site, input_tokens, output_tokens)
        now = self.clock()
        with self._view_lock:
            plan = view.query(client_site, input_tokens, output_tokens, now)
        if plan is None:
            raise Unavailable(
                "no chain of live servers covers every block right now",
                retry_after_s=self.settings.heartbeat_interval_s,
            )
        out = _route_out(view, client_site, plan)
        self.activity.routed(now, out)
        return out

    def book(self, body: SessionIn) -> SessionOut:
        """WS-RR: route with waiting times, then reserve cache on every hop in one transaction."""
        for _attempt in range(BOOK_ATTEMPTS):
            view = self.view()
            self._check_route_args(view, body.client_site, body.input_tokens, body.output_tokens)
            now = self.clock()
            if view.earliest_expiry() <= now:
                self.sweep_sessions()
            with self._view_lock:
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
                self.counters.sessions_booked += 1
                self.activity.booked(now, session.route, session.id)
                return session
            self.invalidate()  # another process took the slots: look again with fresh counts
        self._rejected(body.client_site, None, "cache slots contended")
        raise Unavailable("cache slots are contended; retry", retry_after_s=1.0)

    def _rejected(self, client_site: str, wait_ms: float | None, detail: str) -> None:
        self.counters.sessions_rejected += 1
        self.activity.rejected(self.clock(), client_site, wait_ms, detail)
        if self.on_reject is not None:
            self.on_reject()

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
            with self.booking_tx() as db:
                if not repo.Sessions(db).book(row, [(h[0], h[3]) for h in hops], now):
                    raise _Contended()  # rolls back the hops already taken
        except _Contended:
            return None
        with self._view_lock:
            for server_id, _, _, blocks in hops:
                view.add_reservation(server_id, blocks, expires_at)
        return SessionOut(
            id=session_id,
            expires_in_s=expires_at - now,
            route=_route_out(view, body.client_site, plan),
        )

    def release(self, session_id: str) -> None:
        with self.booking_tx() as db:
            released = repo.Sessions(db).release(session_id)
        if released is None:
            raise NotFound(f"session {session_id!r} does not exist (released or expired)")
        self._forget(released)

    def _forget(self, released: list[repo.Held]) -> None:
        """Mirror released reservations in the route view until its next rebuild."""
        with self._view_lock:
            if self._view is not None:
                for held in released:
                    self._view.remove_reservation(held.server_id, held.slots, held.expires_at)

    def sweep_sessions(self) -> int:
        """Release every session past its expiry (predicted completion plus grace)."""
        now = self.clock()
        with self.read_tx() as db:
            expired = repo.Sessions(db).expired_ids(now)
        if not expired:
            return 0
        # On PostgreSQL every release commits by itself (booking_tx): one transaction holding
        # many sessions' server rows would lock them out of id order and could deadlock.
        with self.booking_tx() as db:
            released = repo.Sessions(db).release_all(expired)
        self._forget(released)
        return len(expired)

    def active_sessions(self) -> int:
        with self.read_tx() as db:
            return repo.Sessions(db).count()

    # --- scenario snapshot ---------------------------------------------------------------------

    def export_scenario(self, include_expired: bool) -> dict[str, Any]:
        now = self.clock()
        with self.read_tx() as db:
            state = load_state(db)
        if state.model is None:
            raise Conflict("no model is set yet (PUT /v1/model or POST /v1/scenario)")
        servers = [s for s in state.servers if include_expired or s.lease_expires_at > now]
        if not servers:
            raise Conflict("no server with a live lease (use include_expired=true for all)")
        data = scenario_dict(state, servers, self.settings.default_site_rtt_ms)
        try:
            parse_scenario(data)  # what we export must read back
        except ScenarioError as error:
            raise Conflict(f"the live state is not a valid scenario: {error}") from None
        return data

    def load_scenario(self, raw: Any, online: bool, lease_s: float) -> ScenarioLoadOut:
        """Replace the swarm by a scenario's; ``online`` marks its servers as live and loaded
        with the placement computed for them (for demos, tests and benchmarks)."""
        try:
            scenario = parse_scenario(raw)
        except ScenarioError as error:
            raise Invalid(str(error)) from None
        raw_servers = raw.get("servers", []) if isinstance(raw, dict) else []
        now = self.clock()
        tokens: list[LoadedServer] = []
        with self.tx() as db:
            repo.clear_swarm(db)
            model = repo.Models(db).get_or_new()
            m = scenario.model
            rate = getattr(scenario.workload, "rate_per_s", None)
            _apply_model(
                model,
                ModelIn(
                    name=_safe_name(m.name),
                    num_blocks=m.num_blocks,
                    block_memory_gb=m.block_memory_gb,
                    kv_bytes_per_token_per_block=m.kv_bytes_per_token_per_block,
                    max_input_tokens=scenario.requests.max_input_tokens,
                    max_output_tokens=scenario.requests.max_output_tokens,
                    hidden_size=m.hidden_size,
                    petals_cache_tokens=m.petals_cache_tokens,
                    overheads=Overheads(**scenario.overheads.model_dump()),
                    rate_per_s=rate,
                ),
                now,
            )
            repo.Sites(db).add_all(scenario.sites)  # first: clients and servers refer to them
            rtts = repo.Rtts(db)
            matrix = scenario.site_matrix()
            for i, a in enumerate(scenario.sites):
                for j, b in enumerate(scenario.sites):
                    if j >= i:
                        rtts.add(a, b, (matrix[i][j] + matrix[j][i]) / 2, now)
            repo.Clients(db).add_all((c.id, c.site, c.share) for c in scenario.clients)
            client_site = {c.id: c.site for c in scenario.clients}
            stored: dict[tuple[str, str], float] = {}
            for a, targets in (scenario.rtt_ms or {}).items():
                for b, value in targets.items():
                    key = repo.pair_key(client_site.get(a, a), client_site.get(b, b))
                    stored[key] = value
            for (a, b), value in stored.items():
                rtts.add(a, b, value, now)
            servers = repo.Servers(db)
            for i, spec in enumerate(scenario.servers):
                token = secrets.token_urlsafe(32)
                extra = (
                    raw_servers[i]
                    if i < len(raw_servers) and isinstance(raw_servers[i], dict)
                    else {}
                )
                address = extra.get("address")
                row = ServerRow(
                    id=spec.id,
                    site=spec.site,
                    gpu=spec.gpu,
                    memory_gb=spec.memory_gb,
                    decode_ms_per_block=spec.decode_ms_per_block,
                    prefill_fixed_ms=spec.prefill_ms_per_block.fixed,
                    prefill_per_token_ms=spec.prefill_ms_per_block.per_token,
                    network_mbps=spec.network_mbps,
                    address=address if isinstance(address, str) and address else f"{spec.id}:31337",
                    boot_epoch=0,
                    token_hash=hash_token(token),
                    state="online" if online else "joining",
                    cache_slots=0,
                    reserved_slots=0,
                    lease_expires_at=now + lease_s if online else now,
                    registered_at=now + i * 1e-6,
                )
                servers.add(row)
                tokens.append(LoadedServer(id=spec.id, token=token))
            repo.PlannerState(db).request("scenario loaded", now)
        self.invalidate()
        generation = 0
        if online:
            placed = self.compute_placement(PlacementRequest(algorithm="cg"))
            generation = placed.generation
            with self.tx() as db:
                model_row = repo.Models(db).get()
                servers = repo.Servers(db)
                # In id order: each get() autoflushes the previous row's update.
                for placed_span in sorted(placed.spans, key=lambda span: span.server_id):
                    server = servers.get(placed_span.server_id)
                    if server is None:
                        continue
                    server.loaded_start, server.loaded_end = placed_span.start, placed_span.end
                    server.cache_slots = self._slots_for(model_row, server)
                repo.PlannerState(db).clear(now)
            self.invalidate()
        return ScenarioLoadOut(servers=tokens, generation=generation)

    # --- the planner (leader only) ------------------------------------------------------------

    def try_lead(self) -> bool:
        now = self.clock()
        expires = now + self.settings.leader_lease_s
        with self.tx() as db:
            return repo.Leader(db).acquire(self.instance_id, now, expires)

    def release_leadership(self) -> None:
        try:
            with self.tx() as db:
                repo.Leader(db).release(self.instance_id)
        except Exception:  # the database may already be gone at shutdown
            pass

    def _planner_loop(self) -> None:
        while not self._stop.wait(self.settings.planner_interval_s):
            try:
                self.planner_tick()
            except ServiceError as error:
                log.info("planner skipped", reason=error.message)
            except Exception as error:
                log.error("planner failed", error=f"{type(error).__name__}: {error}")

    def planner_tick(self) -> str:
        """One planner round: sweep sessions, then (leader only) re-plan if there is a reason.

        Returns what it did, for tests and logs."""
        self.sweep_sessions()
        if not self.try_lead():
            return "follower"
        with self._plan_lock:
            now = self.clock()
            with self.tx() as db:
                requested = repo.PlannerState(db).requested()
                state = load_state(db)
            if state.model is None:
                return "no model"
            live = _plannable(state, now)
            if not live:
                return "no live servers"
            current = state.assigned_spans()
            lost = _coverage_lost(state, live, current)
            reason = requested or ("coverage lost" if lost else None)
            scenario = build_scenario(state, live, self.settings.default_site_rtt_ms)
            instance = Instance.from_scenario(scenario)
            if reason is None and state.placement is not None:
                stored = state.placement.objective_ms_per_token
                counts = scenario.client_request_counts(state.placement.concurrency)
                aligned = planner.aligned_current(instance.server_ids, current)
                now_obj = planner.evaluate(instance, aligned, counts)
                if now_obj is None:
                    reason = "coverage lost"
                elif stored > 0 and abs(now_obj - stored) / stored > self.settings.replan_drift:
                    reason = f"measurements drifted ({stored:.1f} -> {now_obj:.1f} ms/token)"
            if reason is None:
                return "steady"
            return self._replan(state, scenario, instance, current, reason, now)

    def _replan(
        self,
        state: LiveState,
        scenario: Any,
        instance: Instance,
        current: dict[str, Span],
        reason: str,
        now: float,
    ) -> str:
        model = state.model
        assert model is not None
        try:
            concurrency = self._concurrency(state, instance, model.rate_per_s)
        except Conflict as error:
            with self.tx() as db:
                repo.PlannerState(db).clear(now)
            return f"cannot plan: {error.message}"
        algorithm = self.settings.planner_algorithm
        solution = self._solve(scenario, algorithm, concurrency, self.settings.planner_time_limit_s)
        counts = scenario.client_request_counts(concurrency)
        aligned = planner.aligned_current(instance.server_ids, current)
        decision = planner.plan_update(
            instance, solution, aligned, counts, self.settings.replan_min_gain
        )
        with self.tx() as db:
            repo.PlannerState(db).clear(now)
        if not decision.publish:
            log.info("re-plan kept the current placement", reason=reason, why=decision.reason)
            return f"kept ({decision.reason})"
        spans = {
            instance.server_ids[j]: span
            for j, span in enumerate(decision.placement)
            if span is not None
        }
        status = solution.status if decision.kept == 0 else "sticky"
        objective = decision.objective_ms_per_token or solution.objective_ms_per_token
        out = self._publish(
            solution,
            spans,
            objective,
            scenario.model_dump(mode="json", exclude_none=True),
            f"{reason}; {decision.reason}, {decision.moved} spans moved, {decision.kept} kept",
            status,
        )
        return f"published {out.generation}"

    # --- operations ----------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, bool, str | None]:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:
            return False, False, f"database unreachable: {type(error).__name__}"
        try:
            at_head = store_db.schema_at_head(self.engine)
        except Exception as error:
            return True, False, f"cannot read the schema revision: {type(error).__name__}"
        return True, at_head, None if at_head else "database schema is behind the code"

    def stats(self) -> dict[str, float]:
        now = self.clock()
        view = self.view()
        return {
            "live_servers": float(view.live_count(now)),
            "coverage": view.coverage(now),
            "generation": float(view.generation),
            "reserved_slots": float(view.reserved.sum()) if view.reserved.size else 0.0,
        }


class _Contended(Exception):
    pass


# --- pure helpers ------------------------------------------------------------------------


def _ewma(old: float, new: float, alpha: float) -> float:
    return alpha * new + (1 - alpha) * old


def _plannable(state: LiveState, now: float) -> list[ServerRow]:
    """Servers the planner may use: live lease, not draining, room for one block + one cache."""
    model = state.model
    if model is None:
        return []
    one_block = model.block_memory_gb + model_cache_gb(model)
    return [
        s
        for s in state.servers
        if s.lease_expires_at > now and s.state != "draining" and s.memory_gb >= one_block
    ]


def _coverage_lost(state: LiveState, live: list[ServerRow], current: dict[str, Span]) -> bool:
    model = state.model
    if model is None or not current:
        return True
    covered = [False] * model.num_blocks
    for server in live:
        span = current.get(server.id)
        if span is None:
            continue
        for block in range(span.start, min(span.end, model.num_blocks)):
            covered[block] = True
    return not all(covered)


def _apply_model(row: ModelRow, body: ModelIn, now: float) -> None:
    row.name = body.name
    row.num_blocks = body.num_blocks
    row.block_memory_gb = body.block_memory_gb
    row.kv_bytes_per_token_per_block = body.kv_bytes_per_token_per_block
    row.max_input_tokens = body.max_input_tokens
    row.max_output_tokens = body.max_output_tokens
    row.hidden_size = body.hidden_size
    row.petals_cache_tokens = body.petals_cache_tokens
    row.per_token_ms = body.overheads.per_token_ms
    row.prefill_fixed_ms = body.overheads.prefill_fixed_ms
    row.prefill_per_token_ms = body.overheads.prefill_per_token_ms
    row.per_request_ms = body.overheads.per_request_ms
    row.concurrency = body.concurrency
    row.rate_per_s = body.rate_per_s
    row.updated_at = now


def _model_out(row: ModelRow) -> ModelOut:
    return ModelOut(
        name=row.name,
        num_blocks=row.num_blocks,
        block_memory_gb=row.block_memory_gb,
        kv_bytes_per_token_per_block=row.kv_bytes_per_token_per_block,
        max_input_tokens=row.max_input_tokens,
        max_output_tokens=row.max_output_tokens,
        hidden_size=row.hidden_size,
        petals_cache_tokens=row.petals_cache_tokens,
        overheads=Overheads(
            per_token_ms=row.per_token_ms,
            prefill_fixed_ms=row.prefill_fixed_ms,
            prefill_per_token_ms=row.prefill_per_token_ms,
            per_request_ms=row.per_request_ms,
        ),
        concurrency=row.concurrency,
        rate_per_s=row.rate_per_s,
        updated_at=row.updated_at,
    )


def _apply_registration(
    row: ServerRow, body: ServerRegistration, token_hash: str, now: float, ttl: float
) -> None:
    row.site = body.site
    row.gpu = body.gpu
    row.memory_gb = body.memory_gb
    row.decode_ms_per_block = body.decode_ms_per_block
    row.prefill_fixed_ms = body.prefill_ms_per_block.fixed
    row.prefill_per_token_ms = body.prefill_ms_per_block.per_token
    row.network_mbps = body.network_mbps
    row.address = body.address
    row.boot_epoch = body.boot_epoch
    row.token_hash = token_hash
    row.state = "joining"
    row.loaded_start = None
    row.loaded_end = None
    row.free_cache_slots = None
    row.cache_slots = 0
    row.lease_expires_at = now + ttl
    row.last_heartbeat_at = None


def _server_out(row: ServerRow, assigned: Span | None, now: float) -> ServerOut:
    return ServerOut(
        id=row.id,
        site=row.site,
        gpu=row.gpu,
        memory_gb=row.memory_gb,
        decode_ms_per_block=row.decode_ms_per_block,
        prefill_ms_per_block=PrefillSpeed(
            fixed=row.prefill_fixed_ms, per_token=row.prefill_per_token_ms
        ),
        network_mbps=row.network_mbps,
        address=row.address,
        boot_epoch=row.boot_epoch,
        state=row.state,
        lease="live" if row.lease_expires_at > now else "expired",
        lease_expires_in_s=max(0.0, row.lease_expires_at - now),
        loaded_span=_span(row.loaded_start, row.loaded_end),
        assigned_span=None
        if assigned is None
        else SpanModel(start=assigned.start, end=assigned.end),
        cache_slots=row.cache_slots,
        reserved_slots=row.reserved_slots,
        free_cache_slots=row.free_cache_slots,
    )


def _placement_out(row: PlacementRow) -> PlacementOut:
    spans: dict[str, list[int]] = json.loads(row.spans)
    return PlacementOut(
        generation=row.generation,
        algorithm=row.algorithm,
        concurrency=row.concurrency,
        objective_ms_per_token=row.objective_ms_per_token,
        bound_ms_per_token=row.bound_ms_per_token,
        status=row.status,
        solve_seconds=row.solve_seconds,
        reason=row.reason,
        created_at=row.created_at,
        spans=[PlacedSpan(server_id=k, start=v[0], end=v[1]) for k, v in spans.items()],
        inputs=json.loads(row.inputs),
    )


def _route_out(view: RouteView, client_site: str, plan: RoutePlan) -> RouteOut:
    return RouteOut(
        generation=view.generation,
        client_site=client_site,
        hops=[
            RouteHop(
                server_id=view.entries[h.server].id,
                address=view.entries[h.server].address,
                start=h.start,
                end=h.end,
            )
            for h in plan.hops
        ],
        first_token_ms=plan.timing.first_token_ms,
        per_token_ms=plan.timing.per_token_ms,
        total_ms=plan.timing.total_ms,
        wait_ms=plan.wait_ms,
    )


def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "._:@-" else "-" for ch in name)
    return cleaned[:200] or "model"


__all__ = ["Coordinator", "client_list", "default_concurrency", "hash_token"]
