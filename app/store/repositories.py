"""Repositories: the coordinator's data access, one small class per aggregate.

Each takes the SQLAlchemy ``Session`` of the caller's transaction, runs queries and updates in
it and NEVER commits, rolls back or begins: the service layer owns the transaction (one per
request). Nothing here knows about HTTP or business rules beyond what one statement expresses
(e.g. a reservation is a conditional UPDATE that only succeeds when the slots are free).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.models import (
    Base,
    ClientRow,
    LeaderRow,
    ModelRow,
    PlacementRow,
    PlannerStateRow,
    ReservationRow,
    RttRow,
    ServerRow,
    SessionRow,
    SiteRow,
)

MODEL_ID = 1
PLANNER_STATE_ID = 1
PLANNER_LEADER = "planner"


def pair_key(a: str, b: str) -> tuple[str, str]:
    """RTTs are symmetric and stored once, under (min, max)."""
    return (a, b) if a <= b else (b, a)


def insert_ignore(db: Session, model: type[Base], values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    table: Any = model.__table__
    dialect: Any = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    key = next(iter(table.primary_key.columns))
    statement: Any = dialect.insert(table).values(**values).on_conflict_do_nothing()
    return db.execute(statement.returning(key)).first() is not None


def _is_postgres(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


# The hot paths of bookings and releases, built once: constructing a statement costs more
# than running it (~0.3 ms of SQLAlchemy work per statement per call otherwise).
_SERVERS = cast(Table, ServerRow.__table__)
_SESSIONS = cast(Table, SessionRow.__table__)
_RESERVATIONS = cast(Table, ReservationRow.__table__)
_RESERVE = (
    update(_SERVERS)
    .where(
        _SERVERS.c.id == bindparam("b_id"),
        _SERVERS.c.reserved_slots + bindparam("b_slots") <= _SERVERS.c.cache_slots,
        _SERVERS.c.lease_expires_at > bindparam("b_now"),
    )
    .values(reserved_slots=_SERVERS.c.reserved_slots + bindparam("b_slots"))
)
_UNRESERVE = (
    update(_SERVERS)
    .where(_SERVERS.c.id == bindparam("b_id"))
    .values(
        reserved_slots=case(
            (_SERVERS.c.reserved_slots < bindparam("b_slots"), 0),
            else_=_SERVERS.c.reserved_slots - bindparam("b_slots"),
        )
    )
)
_DELETE_SESSION = delete(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_session"))
_DELETE_RESERVATIONS = (
    delete(_RESERVATIONS)
    .where(_RESERVATIONS.c.session_id == bindparam("b_session"))
    .returning(_RESERVATIONS.c.server_id, _RESERVATIONS.c.slots, _RESERVATIONS.c.expires_at)
)

# PostgreSQL books and releases a session in ONE statement, run outside any transaction
# (autocommit): the chain's server rows are then locked only while the database executes it,
# never across a round trip to a Python thread that may be waiting for the GIL. With the
# statements of the portable path, a hot chain's row locks were held across four round trips
# and bookings queued on them (pg_stat_activity: mostly "Lock: tuple" waits at 32 clients).
# No deadlocks: everything that writes several server rows writes them in id order (here the
# `locked` CTE, FOR UPDATE re-checking the condition on the newest row; ``reserve_all``,
# ``unreserve_all``, ``renew_leases``, ORM flushes), and a release takes its session row before
# anything else (`held` reads `gone`), so that two releases of one session queue on that row.
# "Id order" is code-point order, as Python's sorted() and SQLAlchemy's flush see it: the
# COLLATE "C" keeps a database whose default collation sorts "a" before "B" from disagreeing.
_SESSION_COLUMNS = [column.key for column in _SESSIONS.columns]
_BOOK_IN_ONE_STATEMENT = text(
    f"""
WITH want AS (
    SELECT w.id, w.slots
    FROM unnest(CAST(:b_ids AS text[]), CAST(:b_slots AS integer[])) AS w(id, slots)
),
locked AS (
    SELECT s.id FROM servers AS s JOIN want AS w ON w.id = s.id
    WHERE s.reserved_slots + w.slots <= s.cache_slots AND s.lease_expires_at > :b_now
    ORDER BY s.id COLLATE "C"
    FOR UPDATE OF s
),
admitted AS (SELECT count(*) = :b_hops AS ok FROM locked),
taken AS (
    UPDATE servers AS s SET reserved_slots = s.reserved_slots + w.slots
    FROM want AS w
    WHERE s.id = w.id AND (SELECT ok FROM admitted)
),
new_session AS (
    INSERT INTO sessions ({", ".join(_SESSION_COLUMNS)})
    SELECT {", ".join(f":s_{name}" for name in _SESSION_COLUMNS)}
    WHERE (SELECT ok FROM admitted)
),
new_reservations AS (
    INSERT INTO reservations (session_id, server_id, slots, expires_at)
    SELECT :s_id, w.id, w.slots, :s_expires_at FROM want AS w
    WHERE (SELECT ok FROM admitted)
)
SELECT ok FROM admitted
"""
)
_RELEASE_IN_ONE_STATEMENT = text(
    """
WITH gone AS (
    DELETE FROM sessions WHERE id = :b_session RETURNING id
),
held AS (
    DELETE FROM reservations WHERE session_id = (SELECT id FROM gone)
    RETURNING server_id, slots, expires_at
),
locked AS (
    SELECT s.id FROM servers AS s WHERE s.id IN (SELECT server_id FROM held)
    ORDER BY s.id COLLATE "C"
    FOR UPDATE OF s
),
given_back AS (
    UPDATE servers AS s SET reserved_slots = GREATEST(s.reserved_slots - h.slots, 0)
    FROM held AS h
    WHERE s.id = h.server_id AND (SELECT count(*) FROM locked) >= 0
)
SELECT h.server_id, h.slots, h.expires_at FROM gone LEFT JOIN held AS h ON true
"""
)


# --- the model --------------------------------------------------------------------------------


class Models:
    def __init__(self, db: Session) -> None:
        self.db = db

    def get(self) -> ModelRow | None:
        return self.db.get(ModelRow, MODEL_ID)

    def get_or_new(self) -> ModelRow:
        """The model row, added to the session (not yet flushed) when there is none."""
        row = self.get()
        if row is None:
            row = ModelRow(id=MODEL_ID)
            self.db.add(row)
        return row


# --- sites, clients -------------------------------------------------------------------------


class Sites:
    def __init__(self, db: Session) -> None:
        self.db = db

    def names(self) -> list[str]:
        return list(self.db.scalars(select(SiteRow.name).order_by(SiteRow.position, SiteRow.name)))

    def ensure(self, name: str) -> None:
        """Add the site (at the end) unless it exists; safe against a concurrent insert."""
        if self.db.get(SiteRow, name) is None:
            position = self.db.scalar(select(func.count()).select_from(SiteRow)) or 0
            insert_ignore(self.db, SiteRow, {"name": name, "position": position})

    def add_all(self, names: Sequence[str]) -> None:
        for i, name in enumerate(names):
            self.db.add(SiteRow(name=name, position=i))
        self.db.flush()  # clients and servers refer to sites


class Clients:
    def __init__(self, db: Session) -> None:
        self.db = db

    def all(self) -> list[ClientRow]:
        return list(self.db.scalars(select(ClientRow).order_by(ClientRow.position, ClientRow.id)))

    def ids(self) -> list[str]:
        return list(self.db.scalars(select(ClientRow.id)))

    def add_all(self, clients: Iterable[tuple[str, str, float]]) -> None:
        for i, (client_id, site, share) in enumerate(clients):
            self.db.add(ClientRow(id=client_id, site=site, share=share, position=i))
        self.db.flush()


# --- servers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRenewal:
    """What a quiet heartbeat asserts about its server, and the lease it renews."""

    server_id: str
    token_hash: str
    boot_epoch: int
    state: str
    loaded: tuple[int | None, int | None]
    free_cache_slots: int | None
    now: float
    expires_at: float


class Servers:
    def __init__(self, db: Session) -> None:
        self.db = db

    def get(self, server_id: str) -> ServerRow | None:
        return self.db.get(ServerRow, server_id)

    def all(self) -> list[ServerRow]:
        """Every server in registration order (the order placements index them by)."""
        return list(
            self.db.scalars(select(ServerRow).order_by(ServerRow.registered_at, ServerRow.id))
        )

    def ids(self) -> list[str]:
        return list(self.db.scalars(select(ServerRow.id)))

    def exists_with_token_hash(self, token_hash: str) -> bool:
        found = self.db.scalar(
            select(ServerRow.id).where(ServerRow.token_hash == token_hash).limit(1)
        )
        return found is not None

    def add(self, row: ServerRow) -> None:
        self.db.add(row)

    def remove(self, row: ServerRow) -> None:
        """Delete the server and every reservation held on it."""
        Reservations(self.db).drop_for_server(row.id)
        self.db.delete(row)

    def renew_lease(
        self,
        server_id: str,
        token_hash: str,
        boot_epoch: int,
        state: str,
        loaded: tuple[int | None, int | None],
        free_cache_slots: int | None,
        now: float,
        expires_at: float,
    ) -> bool:
        """A heartbeat that changes nothing but the lease and the free-slot report. True when
        the row was updated (see ``renew_leases``)."""
        renewal = LeaseRenewal(
            server_id, token_hash, boot_epoch, state, loaded, free_cache_slots, now, expires_at
        )
        return self.renew_leases([renewal]) == 1

    def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Renew many leases in one statement (executemany). Each UPDATE is guarded by what
        the caller checked (token, epoch, state, loaded span), so that a row changed since
        then matches nothing and keeps its old lease. Returns the number of rows updated."""
        if not renewals:
            return 0
        table = cast(Table, ServerRow.__table__)  # Core table: a plain executemany
        statement = (
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                table.c.token_hash == bindparam("b_token_hash"),
                table.c.boot_epoch == bindparam("b_boot_epoch"),
                table.c.state == bindparam("b_state"),
                table.c.loaded_start.is_not_distinct_from(bindparam("b_start")),
                table.c.loaded_end.is_not_distinct_from(bindparam("b_end")),
            )
            .values(
                lease_expires_at=bindparam("b_expires_at"),
                last_heartbeat_at=bindparam("b_now"),
                free_cache_slots=bindparam("b_free"),
            )
        )
        result = self.db.execute(
            statement,
            [
                {
                    "b_id": r.server_id,
                    "b_token_hash": r.token_hash,
                    "b_boot_epoch": r.boot_epoch,
                    "b_state": r.state,
                    "b_start": r.loaded[0],
                    "b_end": r.loaded[1],
                    "b_expires_at": r.expires_at,
                    "b_now": r.now,
                    "b_free": r.free_cache_slots,
                }
                for r in sorted(renewals, key=lambda renewal: renewal.server_id)
            ],
        )
        return _rowcount(result)

    def reserve(self, server_id: str, slots: int, now: float) -> bool:
        """Take ``slots`` cache slots on one server (see ``reserve_all``)."""
        return self.reserve_all([(server_id, slots)], now)

    def reserve_all(self, holds: Sequence[tuple[str, int]], now: float) -> bool:
        """Take the slots on every (server id, slots) if all are free and the leases live:
        one conditional UPDATE per server (not an executemany: psycopg does not report the
        rows each one matched). The condition is re-checked under each row lock, so
        concurrent bookings can never over-admit; False when a server refused (the caller
        rolls the transaction back). Rows are taken in id order, so that two transactions
        never wait on each other's rows (a deadlock)."""
        for server_id, slots in sorted(holds):
            parameters = {"b_id": server_id, "b_slots": slots, "b_now": now}
            if _rowcount(self.db.execute(_RESERVE, parameters)) != 1:
                return False
        return True

    def unreserve(self, server_id: str, slots: int) -> None:
        self.unreserve_all([(server_id, slots)])

    def unreserve_all(self, holds: Sequence[tuple[str, int]]) -> None:
        """Give slots back (never below zero), in id order like ``reserve_all``."""
        if holds:
            self.db.execute(
                _UNRESERVE, [{"b_id": sid, "b_slots": slots} for sid, slots in sorted(holds)]
            )


# --- measurements -----------------------------------------------------------------------------


class Rtts:
    def __init__(self, db: Session) -> None:
        self.db = db

    def all(self) -> dict[tuple[str, str], float]:
        return {(r.a, r.b): r.rtt_ms for r in self.db.scalars(select(RttRow))}

    def add(self, a: str, b: str, rtt_ms: float, now: float) -> None:
        a, b = pair_key(a, b)
        self.db.add(RttRow(a=a, b=b, rtt_ms=rtt_ms, samples=1, updated_at=now))

    def smooth(self, a: str, b: str, value: float, alpha: float, now: float) -> None:
        """Insert a first sample, or fold one into the EWMA (alpha weighs the new value)."""
        a, b = pair_key(a, b)
        row = self.db.get(RttRow, (a, b))
        if row is None:
            if insert_ignore(
                self.db, RttRow, {"a": a, "b": b, "rtt_ms": value, "samples": 1, "updated_at": now}
            ):
                return
            row = self.db.get(RttRow, (a, b), populate_existing=True)
            assert row is not None
        row.rtt_ms = alpha * value + (1 - alpha) * row.rtt_ms
        row.samples += 1
        row.updated_at = now


# --- placements -----------------------------------------------------------------------------


class Placements:
    def __init__(self, db: Session) -> None:
        self.db = db

    def current(self) -> PlacementRow | None:
        return self.db.scalars(
            select(PlacementRow).order_by(PlacementRow.generation.desc()).limit(1)
        ).first()

    def get(self, generation: int) -> PlacementRow | None:
        return self.db.get(PlacementRow, generation)

    def latest_generation(self) -> int:
        return int(self.db.scalar(select(func.max(PlacementRow.generation))) or 0)

    def add(self, row: PlacementRow) -> None:
        """Insert (flushed now: a generation taken by another process raises IntegrityError
        here, inside the caller's transaction)."""
        self.db.add(row)
        self.db.flush()


# --- sessions and their reservations ------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A reservation a released session held."""

    server_id: str
    slots: int
    expires_at: float


class Reservations:
    def __init__(self, db: Session) -> None:
        self.db = db

    def by_server(self) -> dict[str, list[tuple[float, int]]]:
        """server id -> [(expires_at, slots)] of every reservation."""
        held: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for server_id, expires_at, slots in self.db.execute(
            select(ReservationRow.server_id, ReservationRow.expires_at, ReservationRow.slots)
        ):
            held[server_id].append((expires_at, slots))
        return held

    def drop_for_server(self, server_id: str) -> int:
        """Delete the reservations held on one server; the slots they held."""
        statement = (
            delete(ReservationRow)
            .where(ReservationRow.server_id == server_id)
            .returning(ReservationRow.slots)
        )
        return sum(self.db.scalars(statement))


class Sessions:
    def __init__(self, db: Session) -> None:
        self.db = db

    def add(self, row: SessionRow, hops: Iterable[tuple[str, int]]) -> None:
        """Insert the session and one reservation per (server id, slots)."""
        values = {column.key: getattr(row, column.key) for column in _SESSIONS.columns}
        self.db.execute(insert(_SESSIONS), values)
        self.db.execute(
            insert(_RESERVATIONS),
            [
                {
                    "session_id": row.id,
                    "server_id": server_id,
                    "slots": slots,
                    "expires_at": row.expires_at,
                }
                for server_id, slots in hops
            ],
        )

    def book(self, row: SessionRow, hops: Sequence[tuple[str, int]], now: float) -> bool:
        """Take the slots on every (server id, slots) if all are free and the leases live,
        and insert the session with one reservation per hop; False when a server refused.

        PostgreSQL does it all in one statement (all or nothing; run it outside a transaction
        to hold the row locks for the shortest time). Elsewhere it is ``reserve_all`` then
        ``add``, and after False the caller must roll back the hops already taken.
        """
        if _is_postgres(self.db):
            parameters: dict[str, Any] = {
                f"s_{name}": getattr(row, name) for name in _SESSION_COLUMNS
            }
            parameters.update(
                b_ids=[server_id for server_id, _ in hops],
                b_slots=[slots for _, slots in hops],
                b_hops=len(hops),
                b_now=now,
            )
            return bool(self.db.execute(_BOOK_IN_ONE_STATEMENT, parameters).scalar_one())
        if not Servers(self.db).reserve_all(hops, now):
            return False
        self.add(row, hops)
        return True

    def release(self, session_id: str) -> list[Held] | None:
        """Delete the session and give its slots back; None if it was not there (released
        or expired, possibly by another process a moment ago). One statement on PostgreSQL."""
        parameters = {"b_session": session_id}
        if _is_postgres(self.db):
            rows = self.db.execute(_RELEASE_IN_ONE_STATEMENT, parameters).all()
            if not rows:  # `gone` deleted nothing
                return None
            return [Held(r.server_id, r.slots, r.expires_at) for r in rows if r.server_id]
        # Reservations first: deleting the session would cascade to them unreturned.
        held = [Held(*row) for row in self.db.execute(_DELETE_RESERVATIONS, parameters)]
        if _rowcount(self.db.execute(_DELETE_SESSION, parameters)) != 1:
            return None
        Servers(self.db).unreserve_all([(h.server_id, h.slots) for h in held])
        return held

    def release_all(self, session_ids: Iterable[str]) -> list[Held]:
        """``release`` each session; what they held (sessions already gone hold nothing)."""
        released: list[Held] = []
        for session_id in session_ids:
            released.extend(self.release(session_id) or [])
        return released

    def expired_ids(self, now: float, limit: int = 1000) -> list[str]:
        return list(
            self.db.scalars(select(SessionRow.id).where(SessionRow.expires_at <= now).limit(limit))
        )

    def count(self) -> int:
        return int(self.db.scalar(select(func.count()).select_from(SessionRow)) or 0)


# --- the whole swarm ------------------------------------------------------------------------


def clear_swarm(db: Session) -> None:
    """Delete every session, placement, server, client, RTT and site (a scenario load)."""
    for table in (
        ReservationRow,
        SessionRow,
        PlacementRow,
        ServerRow,
        ClientRow,
        RttRow,
        SiteRow,
    ):
        db.execute(delete(table))


# --- the planner's coordination rows ------------------------------------------------------


class PlannerState:
    def __init__(self, db: Session) -> None:
        self.db = db

    def ensure(self, now: float) -> None:
        insert_ignore(
            self.db,
            PlannerStateRow,
            {"id": PLANNER_STATE_ID, "requested": False, "reason": "", "updated_at": now},
        )

    def requested(self) -> str | None:
        """The pending re-plan request's reason, or None."""
        row = self.db.get(PlannerStateRow, PLANNER_STATE_ID)
        return row.reason if row is not None and row.requested else None

    def request(self, reason: str, now: float) -> None:
        self.db.execute(
            update(PlannerStateRow)
            .where(PlannerStateRow.id == PLANNER_STATE_ID)
            .values(requested=True, reason=reason[:500], updated_at=now)
        )

    def clear(self, now: float) -> None:
        self.db.execute(
            update(PlannerStateRow)
            .where(PlannerStateRow.id == PLANNER_STATE_ID)
            .values(requested=False, reason="", updated_at=now)
        )


class Leader:
    """The planner's leader lease (a row; works the same on SQLite and PostgreSQL)."""

    def __init__(self, db: Session, name: str = PLANNER_LEADER) -> None:
        self.db = db
        self.name = name

    def acquire(self, holder: str, now: float, expires_at: float) -> bool:
        """Take or renew the lease if it is ours or has expired; True when we hold it."""
        result = self.db.execute(
            update(LeaderRow)
            .where(
                LeaderRow.name == self.name,
                (LeaderRow.holder == holder) | (LeaderRow.expires_at <= now),
            )
            .values(holder=holder, expires_at=expires_at)
        )
        if _rowcount(result) == 1:
            return True
        return insert_ignore(
            self.db, LeaderRow, {"name": self.name, "holder": holder, "expires_at": expires_at}
        )

    def release(self, holder: str) -> None:
        self.db.execute(
            update(LeaderRow)
            .where(LeaderRow.name == self.name, LeaderRow.holder == holder)
            .values(expires_at=0.0)
        )
