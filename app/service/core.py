"""The coordinator's infrastructure, shared by every domain service: the engine and its
transaction boundaries, the in-memory route view and its cache, the write-behind lease
renewals, the clock, and the counters.

Transaction boundaries (every domain service opens its transactions here and nowhere else):
- ``tx()``: one write transaction, committed on exit and rolled back on an exception. On
  SQLite (one process: ``bprr serve`` refuses several workers there) the write transactions
  of this process are serialised by a lock taken before ``BEGIN IMMEDIATE``: waiting on a
  Python lock hands over in microseconds, whereas SQLite's busy handler sleeps in steps of up
  to 100 ms, which made heartbeat and booking latencies reach seconds under load.
- ``read_tx()``: a transaction that only reads (on SQLite it does not take the write lock).
- ``booking_tx()``: the unit of work of a booking or a release, on a Core connection (one
  autocommitted statement on PostgreSQL, an ordinary write transaction on SQLite).
Every boundary first writes the pending lease renewals of quiet heartbeats
(``flush_renewals``), so that this process reads its own renewals. A database that cannot be
reached, or that aborted the work, surfaces as ``Unavailable`` (503 with Retry-After).

The route view is read by routes and bookings without touching the database; ``invalidate()``
drops it after a local change, and a view older than ``view_refresh_s`` is rebuilt by one
background thread while the stale one keeps answering.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.logging import get_logger
from app.service.activity import RouteLog
from app.service.errors import Unavailable
from app.service.routeview import RouteView
from app.service.state import load_state
from app.settings import Settings
from app.store import db as store_db
from app.store import repositories as repo

log = get_logger("bprr.coordinator")
Clock = Callable[[], float]

# Quiet heartbeats' lease renewals are written behind in one batch at most this long after
# they arrive (leases last 15 s); other processes see them that much later.
LEASE_FLUSH_S = 0.1
# How often the offset to the database's clock is measured again.
CLOCK_SYNC_S = 5.0
# How long a write on the event loop waits for this process's writer lock before it moves to
# a worker thread. A booking, a release or a lease batch holds it well under a millisecond:
# failing at once sent every booking that arrived during one to the thread pool, where it
# held the lock in turn and sent the next ones there too (under load most bookings ran in
# threads: a thread hop each and the GIL contended). A lock held longer (a long write, another
# process's: SQLite's own lock is never waited for on the loop) still moves the call off it.
LOOP_LOCK_WAIT_S = 0.005


class WouldBlock(Exception):
    """A write on the event loop (``Core.without_waiting``) found SQLite's write lock (or this
    process's writer lock) taken: nothing began; run the call again in a worker thread."""


# Set while a call runs on the event loop: its write transactions must not wait for a lock.
_no_wait: ContextVar[bool] = ContextVar("bprr_no_wait", default=False)


# SQLite's OperationalError also says "no such column" or "syntax error": only these are
# the database being busy or unreachable for a moment.
_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open", "disk is full")


def transient(error: OperationalError) -> bool:
    """Whether the error is the database busy or unreachable (PostgreSQL's OperationalError:
    a lost connection, a deadlock, a statement past its timeout) rather than a bug."""
    if isinstance(error.orig, sqlite3.Error):
        message = str(error.orig).lower()
        return any(reason in message for reason in _SQLITE_TRANSIENT)
    return True


@contextmanager
def database_errors() -> Iterator[None]:
    """A database that cannot be reached, or that aborted the work (a deadlock, a lost
    connection, a statement past db_timeout_s), is the service being unavailable for a
    moment: 503 with Retry-After, never a 500. The transaction has been rolled back; nothing
    was written."""
    try:
        yield
    except OperationalError as error:
        if not transient(error):
            raise  # a bug (no such column, a syntax error): a 500, logged as one
        if _no_wait.get() and "locked" in str(error.orig or error):
            raise WouldBlock() from None
        log.warning("database unavailable", error=type(error.orig or error).__name__)
        raise Unavailable("the database is unreachable or busy; retry", retry_after_s=1.0) from None


@dataclass
class Counters:
    sessions_booked: int = 0
    sessions_rejected: int = 0
    placements_published: int = 0
    solver_seconds: list[float] = field(default_factory=list)


class Core:
    """Engine, transactions, the route view cache and the lease write-behind buffer."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock = time.time,
        engine: Engine | None = None,
        view_refresh_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self._local_clock = clock
        self._clock_offset = 0.0  # the database's clock minus this replica's (see now())
        self._clock_synced_at = -math.inf
        self.clock: Clock = self.now
        self.engine = engine or store_db.make_engine(settings.database_url, settings.db_timeout_s)
        self._write_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._no_wait_sessions = sessionmaker(store_db.no_wait(self.engine), expire_on_commit=False)
        self._read_sessions = sessionmaker(store_db.read_only(self.engine), expire_on_commit=False)
        self._no_wait_engine = store_db.no_wait(self.engine)
        self._statement_engine = store_db.autocommit(self.engine)
        # SQLite: one writer at a time in this process (see the module docstring).
        self.embedded_database = store_db.is_sqlite(self.engine)
        self._write_lock: threading.RLock | None = (
            threading.RLock() if self.embedded_database else None
        )
        self.instance_id = uuid.uuid4().hex
        self.view_refresh_s = view_refresh_s
        self.counters = Counters()
        self.activity = RouteLog()  # recent decisions, for the dashboard
        self.stop = threading.Event()
        self._view: RouteView | None = None
        self._view_version = 0  # bumped by invalidate()
        self.view_lock = threading.RLock()
        self._rebuild_lock = threading.Lock()
        self._renewals: dict[str, repo.LeaseRenewal] = {}
        self._renewals_lock = threading.Lock()
        # Lease expiries known to be committed, per server (see durable_lease); and whether
        # the last write-behind flush failed (then quiet heartbeats take the database path).
        self._durable: dict[str, float] = {}
        self.flush_failing = False
        self._local = threading.local()

    # --- transactions ---------------------------------------------------------------------------

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One write transaction (committed on exit, rolled back on an exception)."""
        with database_errors():
            self.flush_renewals()
            sessions = self._no_wait_sessions if _no_wait.get() else self._write_sessions
            with self._nested(), self._writer(), sessions() as db, db.begin():
                yield db

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """This process's SQLite writer lock; on the event loop only if it frees within
        LOOP_LOCK_WAIT_S (held by one of this process's short transactions)."""
        if self._write_lock is None:
            yield
            return
        acquired = (
            self._write_lock.acquire(timeout=LOOP_LOCK_WAIT_S)
            if _no_wait.get()
            else self._write_lock.acquire()
        )
        if not acquired:
            raise WouldBlock()
        try:
            yield
        finally:
            self._write_lock.release()

    @contextmanager
    def without_waiting(self) -> Iterator[None]:
        """Run SQLite writes on the event loop: a transaction that would wait for SQLite's
        lock, or more than LOOP_LOCK_WAIT_S for this process's writer lock, raises WouldBlock
        before it begins (the caller then runs it in a worker thread), so that a writer
        holding the lock (another process, a long transaction) never stalls the loop, /livez
        included."""
        reset = _no_wait.set(True)
        try:
            yield
        finally:
            _no_wait.reset(reset)

    @contextmanager
    def read_tx(self) -> Iterator[Session]:
        """A transaction that only reads (on SQLite it does not take the write lock)."""
        with database_errors():
            self.flush_renewals()
            with self._nested(), self._read_sessions() as db, db.begin():
                yield db

    @contextmanager
    def booking_tx(self) -> Iterator[Connection]:
        """The unit of work of a booking or a release, on a Core connection (the ORM's
        session machinery cost more than the work: app.store.bookings runs its own
        statements). On PostgreSQL the repository does each in one statement, run in
        autocommit so that the chain's row locks are held only while the database runs it; on
        SQLite an ordinary write transaction (BEGIN IMMEDIATE, under this process's writer
        lock, committed on exit and rolled back on an exception)."""
        with database_errors():
            self.flush_renewals()
            if self.embedded_database:
                engine = self._no_wait_engine if _no_wait.get() else self.engine
                with self._nested(), self._writer(), engine.begin() as connection:
                    yield connection
                return
            with self._nested(), self._statement_engine.connect() as connection:
                yield connection

    @contextmanager
    def _nested(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    # --- write-behind lease renewals --------------------------------------------------------------

    # --- the clock ------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the Unix epoch on the DATABASE's clock: every replica computes leases,
        expiries and the leader lease on the same clock, whatever its own says. On SQLite (one
        process, the file on this machine) that is this process's clock."""
        return self._local_clock() + self._clock_offset

    def sync_clock(self) -> None:
        """Measure the offset of the database's clock (PostgreSQL, ``database_clock`` on):
        the database's time against the midpoint of the round trip."""
        if self.embedded_database or not self.settings.database_clock:
            return
        with database_errors(), self.engine.connect() as connection:
            before = self._local_clock()
            value = connection.execute(
                text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")
            ).scalar_one()
            after = self._local_clock()
        offset = float(value) - (before + after) / 2
        if abs(offset - self._clock_offset) > 0.5:
            log.warning("replica clock differs from the database's", offset_s=round(offset, 3))
        self._clock_offset = offset
        self._clock_synced_at = after

    # --- write-behind lease renewals --------------------------------------------------------------

    def lease_written(self, server_id: str, expires_at: float) -> None:
        """Record a lease expiry that a committed transaction wrote."""
        with self._renewals_lock:
            self._durable[server_id] = expires_at

    def durable_lease(self, server_id: str) -> float | None:
        """The latest lease expiry of the server known to be committed by this process."""
        with self._renewals_lock:
            return self._durable.get(server_id)

    def queue_renewal(self, renewal: repo.LeaseRenewal) -> None:
        with self._renewals_lock:
            self._renewals[renewal.server_id] = renewal

    def pending_renewals(self) -> set[str]:
        with self._renewals_lock:
            return set(self._renewals)

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
        sessions = self._no_wait_sessions if _no_wait.get() else self._write_sessions
        try:
            with self._writer(), sessions() as db, db.begin():
                repo.Servers(db).renew_leases(pending)
        except Exception as error:
            with self._renewals_lock:
                self.flush_failing = not isinstance(error, WouldBlock)
                for renewal in pending:  # retried with the next flush unless superseded
                    self._renewals.setdefault(renewal.server_id, renewal)
            raise
        with self._renewals_lock:
            self.flush_failing = False
            for renewal in pending:
                known = self._durable.get(renewal.server_id, -math.inf)
                self._durable[renewal.server_id] = max(known, renewal.expires_at)

    def flush_loop(self) -> None:
        while not self.stop.wait(LEASE_FLUSH_S):
            try:
                self.flush_renewals()
            except Exception as error:  # the renewals are retried with the next flush
                log.warning("lease renewal flush failed", error=type(error).__name__)
            if self._local_clock() - self._clock_synced_at >= CLOCK_SYNC_S:
                try:
                    self.sync_clock()
                except Exception as error:  # the last offset stays in use
                    log.warning("database clock unreadable", error=type(error).__name__)

    # --- the in-memory route view --------------------------------------------------------------

    def invalidate(self) -> None:
        with self.view_lock:
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
            with self.view_lock:
                current = self._view
            if current is not None:
                return current  # another thread rebuilt it while we waited
            return self._rebuild(now)

    def current_view(self) -> RouteView | None:
        """The view if there is one (never reads the database): a stale one is returned
        while one background thread rebuilds it. None after ``invalidate()``."""
        now = self.clock()
        with self.view_lock:
            view = self._view
        stale = view is not None and now - view.built_at >= self.view_refresh_s
        if stale and self._rebuild_lock.acquire(blocking=False):
            threading.Thread(target=self._rebuild_and_release, args=(now,), daemon=True).start()
        return view

    def cached_view(self) -> RouteView | None:
        """The view as it is (no rebuild, no refresh), or None."""
        with self.view_lock:
            return self._view

    def _rebuild(self, now: float) -> RouteView:
        with self.view_lock:
            version = self._view_version
        with self.read_tx() as db:
            state = load_state(db, with_reservations=True)
        # What the database holds is committed: the leases a quiet heartbeat may promise.
        with self._renewals_lock:
            for row in state.servers:
                known = self._durable.get(row.id, -math.inf)
                self._durable[row.id] = max(known, row.lease_expires_at)
        fresh = RouteView(state, self.settings.default_site_rtt_ms, now)
        with self.view_lock:
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

    # --- operations ------------------------------------------------------------------------------

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
