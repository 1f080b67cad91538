"""Token-granular bookings and token-checked releases (repository: never commits).

A booking takes k x T cache token-block units on every server of its chain (T = input +
output tokens, k = the blocks it runs there), and only while

- every server has the units free under its capacity, computed in the statement from the
  server's memory, its loaded span and the model (the formula of
  app.allocation.instance.cache_token_capacity, capped to 32 bits), and its lease is live;
- (direct bookings) no live ticket waits in the central queue (its head has the first claim);
- (clients with a quota) the client holds fewer live sessions than its quota;

and it inserts the session, its reservations and its ``session_records`` row, all or nothing.
On PostgreSQL that is ONE statement run in autocommit (the chain's row locks are held only
while the database runs it; rows locked in code-point id order, as everywhere else). A
release is one statement too: the record is ended first (only with the session's token
unless trusted: the admin, the sweep), then the session and its reservations deleted and the
units given back.

On SQLite (one writer: the caller's BEGIN IMMEDIATE transaction) a booking is one guarded
update of every hop's units followed by three inserts, and a release four statements, run on
the driver's connection: there are no round trips to save there, only each statement's cost
in Python, which SQLAlchemy's execution path multiplied several times over.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.store.models import ReservationRow, ServerRow, SessionRow
from app.store.reservations import Held
from app.store.session_tables import QueueRow, SessionRecordRow

UNIT_CAP = 2**31 - 1
_SESSIONS = cast(Table, SessionRow.__table__)
_RECORDS = cast(Table, SessionRecordRow.__table__)
_SESSION_COLUMNS = [column.key for column in _SESSIONS.columns]
_RECORD_COLUMNS = [column.key for column in _RECORDS.columns]
# Keep the names the statements below spell out in step with the models.
assert {ServerRow.__tablename__, ReservationRow.__tablename__, QueueRow.__tablename__} == {
    "servers",
    "reservations",
    "booking_queue",
}

# The per-client booking lock's key space (two-int advisory keys: apart from the queue's
# one-bigint lock).
CLIENT_LOCK_SPACE = 0x71756F74
_CLIENT_LOCK = "SELECT pg_advisory_lock(:space, hashtext(:client))"
_CLIENT_UNLOCK = "SELECT pg_advisory_unlock(:space, hashtext(:client))"
_CLIENT_XACT_LOCK = "SELECT pg_advisory_xact_lock(:space, hashtext(:client))"

_QUEUE_CLEAR = (
    "NOT EXISTS (SELECT 1 FROM booking_queue AS q WHERE q.state = 'waiting' "
    "AND q.deadline > :b_now AND q.seen_at > :b_stale)"
)
_WITHIN_QUOTA = (
    "(SELECT count(*) FROM session_records AS r "
    "WHERE r.client = :r_client AND r.ended_at IS NULL) < :b_quota"
)


def _capacity(server: str, model: str, postgres: bool) -> str:
    """The server's units (SQL), as cache_token_capacity computes them. SQLite's CAST
    truncates toward zero: a server short of memory for its weights gets 0 either way."""
    free = (
        f"({server}.memory_gb - {model}.block_memory_gb * "
        f"({server}.loaded_end - {server}.loaded_start)) * 1e9 / "
        f"{model}.kv_bytes_per_token_per_block + 1e-9"
    )
    if postgres:
        return f"LEAST({UNIT_CAP}, floor({free}))"
    return f"MIN({UNIT_CAP}, CAST({free} AS INTEGER))"


def _book_statement(queue_check: bool, quota_check: bool) -> Any:
    clear = _QUEUE_CLEAR if queue_check else "true"
    within = _WITHIN_QUOTA if quota_check else "true"
    return text(
        f"""
WITH want AS (
    SELECT w.id, w.units
    FROM unnest(CAST(:b_ids AS text[]), CAST(:b_units AS bigint[])) AS w(id, units)
),
model AS (SELECT * FROM model_spec WHERE id = 1),
locked AS (
    SELECT s.id FROM servers AS s JOIN want AS w ON w.id = s.id CROSS JOIN model AS m
    WHERE s.lease_expires_at > :b_now AND s.loaded_start IS NOT NULL
      AND s.reserved_slots + w.units <= {_capacity("s", "m", postgres=True)}
    ORDER BY s.id COLLATE "C"
    FOR UPDATE OF s
),
checks AS (
    SELECT (SELECT count(*) FROM locked) = :b_hops AS free, {clear} AS clear,
           {within} AS within
),
admitted AS (SELECT free AND clear AND within AS ok FROM checks),
taken AS (
    UPDATE servers AS s SET reserved_slots = s.reserved_slots + w.units
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
    SELECT :s_id, w.id, w.units, :s_expires_at FROM want AS w
    WHERE (SELECT ok FROM admitted)
),
new_record AS (
    INSERT INTO session_records ({", ".join(_RECORD_COLUMNS)})
    SELECT {", ".join(f":r_{name}" for name in _RECORD_COLUMNS)}
    WHERE (SELECT ok FROM admitted)
)
SELECT free, clear, within FROM checks
"""
    )


_BOOK = {(q, c): _book_statement(q, c) for q in (False, True) for c in (False, True)}

# The record first (two releases of one session queue on it; ``gone`` waits for ``rec``
# through the count), then the session row, its reservations, the servers in id order.
_RELEASE = text(
    """
WITH rec AS (
    UPDATE session_records SET ended_at = :b_now, end_reason = :b_reason
    WHERE id = :b_session AND ended_at IS NULL AND (:b_trusted OR token_hash = :b_hash)
    RETURNING id, generation, chain
),
gone AS (
    DELETE FROM sessions
    WHERE id = :b_session AND (SELECT count(*) FROM rec) >= 0
      AND (:b_trusted OR EXISTS (SELECT 1 FROM rec))
    RETURNING id
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
SELECT (SELECT count(*) FROM rec) AS ended, (SELECT count(*) FROM gone) AS deleted,
       (SELECT generation FROM rec) AS generation, (SELECT chain FROM rec) AS chain,
       h.server_id, h.slots, h.expires_at
FROM (SELECT 1) AS one LEFT JOIN held AS h ON true
"""
)


# SQLite (embedded: no round trips, only each statement's cost in Python) runs these on the
# driver's connection inside the caller's write transaction (BEGIN IMMEDIATE: this process
# is the only writer, so a condition checked by a statement still holds at its commit).
# Every hop's units in ONE update, guarded like PostgreSQL's statement (live lease, units
# free under the computed capacity, the queue clear, the client within its quota): it
# updates every hop or the caller rolls back.
def _sqlite_take_units(queue_check: bool, quota_check: bool) -> str:
    clear = _QUEUE_CLEAR if queue_check else "1"
    within = _WITHIN_QUOTA if quota_check else "1"
    return f"""
UPDATE servers SET reserved_slots = servers.reserved_slots + w.value
FROM json_each(:b_want) AS w
WHERE servers.id = w.key AND servers.lease_expires_at > :b_now
  AND servers.loaded_start IS NOT NULL
  AND servers.reserved_slots + w.value <= (
      SELECT {_capacity("servers", "m", postgres=False)} FROM model_spec AS m WHERE m.id = 1
  )
  AND {clear} AND {within}
"""


_SQLITE_TAKE_UNITS = {
    (q, c): _sqlite_take_units(q, c) for q in (False, True) for c in (False, True)
}
_SQLITE_CHECKS = f"SELECT {_QUEUE_CLEAR}, {_WITHIN_QUOTA}"
_SQLITE_INSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(_SESSION_COLUMNS)}) "
    f"VALUES ({', '.join(f':s_{name}' for name in _SESSION_COLUMNS)})"
)
_SQLITE_INSERT_RESERVATIONS = (
    "INSERT INTO reservations (session_id, server_id, slots, expires_at) "
    "SELECT :s_id, w.key, w.value, :s_expires_at FROM json_each(:b_want) AS w"
)
_SQLITE_INSERT_RECORD = (
    f"INSERT INTO session_records ({', '.join(_RECORD_COLUMNS)}) "
    f"VALUES ({', '.join(f':r_{name}' for name in _RECORD_COLUMNS)})"
)
_SQLITE_END_RECORD = (
    "UPDATE session_records SET ended_at = :b_now, end_reason = :b_reason "
    "WHERE id = :b_session AND ended_at IS NULL AND (:b_trusted OR token_hash = :b_hash) "
    "RETURNING generation, chain"
)
# Reservations first: deleting the session would cascade to them unreturned.
_SQLITE_DROP_RESERVATIONS = (
    "DELETE FROM reservations WHERE session_id = :b_session RETURNING server_id, slots, expires_at"
)
_SQLITE_DELETE_SESSION = "DELETE FROM sessions WHERE id = :b_session"
_SQLITE_GIVE_BACK = (
    "UPDATE servers SET reserved_slots = max(reserved_slots - :slots, 0) WHERE id = :id"
)


@dataclass(frozen=True)
class BookingCheck:
    """Why a booking went through or not: units free on every hop, the queue clear, the
    client within its quota. (On SQLite a refused booking always reads ``free`` False: one
    statement checks everything, and only the queue and the quota are looked at again.)"""

    free: bool
    clear: bool
    within: bool

    @property
    def ok(self) -> bool:
        return self.free and self.clear and self.within


@dataclass(frozen=True)
class Released:
    ended: bool  # the record was ended now (False: absent, already ended, or not the token)
    deleted: bool  # the live session row was deleted
    held: list[Held]
    # The ended session's placement generation and JFFC chain (None: none, or not ended).
    generation: int | None = None
    chain: int | None = None


@dataclass(frozen=True)
class NewSession:
    """A session to book: its live row (``sessions``), its record (``session_records``) and
    the units it takes on each server of its chain (distinct server ids)."""

    id: str
    token_hash: str
    client: str
    idempotency_key: str | None
    client_site: str
    input_tokens: int
    output_tokens: int
    generation: int
    chain: int | None
    created_at: float
    expires_at: float
    first_token_ms: float
    per_token_ms: float
    path: str  # JSON [[server id, start, end], ...]
    reply: str  # the booking's reply without its token (JSON)
    holds: tuple[tuple[str, int], ...]

    def parameters(self) -> dict[str, Any]:
        """The statements' parameters: s_* the session row, r_* the record."""
        return {
            "s_id": self.id,
            "s_client_site": self.client_site,
            "s_input_tokens": self.input_tokens,
            "s_output_tokens": self.output_tokens,
            "s_generation": self.generation,
            "s_created_at": self.created_at,
            "s_expires_at": self.expires_at,
            "s_first_token_ms": self.first_token_ms,
            "s_per_token_ms": self.per_token_ms,
            "s_path": self.path,
            "r_id": self.id,
            "r_token_hash": self.token_hash,
            "r_client": self.client,
            "r_idempotency_key": self.idempotency_key,
            "r_client_site": self.client_site,
            "r_input_tokens": self.input_tokens,
            "r_output_tokens": self.output_tokens,
            "r_hops": len(self.holds),
            "r_generation": self.generation,
            "r_chain": self.chain,
            "r_created_at": self.created_at,
            "r_ended_at": None,
            "r_end_reason": None,
            "r_reply": self.reply,
        }


def _check_parameters() -> None:
    """The parameters name every column of both tables (a column added to a model and not
    here fails at import, not at the first booking)."""
    sample = NewSession("", "", "", None, "", 0, 0, 0, None, 0.0, 0.0, 0.0, 0.0, "", "", ())
    expected = {f"s_{name}" for name in _SESSION_COLUMNS} | {
        f"r_{name}" for name in _RECORD_COLUMNS
    }
    assert set(sample.parameters()) == expected, "NewSession.parameters and the models differ"


_check_parameters()


def _driver(db: Session | Connection) -> Any:
    """The DBAPI connection of the caller's transaction (SQLite's hot path)."""
    connection = db if isinstance(db, Connection) else db.connection()
    return connection.connection.driver_connection


@contextmanager
def _translated(statement: str, parameters: Any) -> Iterator[None]:
    """Driver errors as SQLAlchemy's (IntegrityError, OperationalError), as the service
    expects them from every statement."""
    try:
        yield
    except sqlite3.Error as error:
        raise DBAPIError.instance(statement, parameters, error, sqlite3.Error) from error


class Bookings:
    """Bookings, releases and the sessions' records. ``db``: the caller's ORM session, or
    (bookings and releases: ``Core.booking_tx``) a Core connection."""

    def __init__(self, db: Session | Connection) -> None:
        self.db = db

    def _postgres(self) -> bool:
        if isinstance(self.db, Connection):
            return self.db.dialect.name == "postgresql"
        return self.db.get_bind().dialect.name == "postgresql"

    @contextmanager
    def _client_lock(self, client: str) -> Iterator[None]:
        """PostgreSQL: one booking under a quota per client at a time, so that the quota's
        count (a snapshot taken when the booking statement starts, after this lock) sees the
        client's booking committed just before. An autocommitted booking (Core.booking_tx)
        holds a session-level lock around its one statement; inside a transaction (the
        queue's admission) the lock lasts until its commit."""
        key = {"space": CLIENT_LOCK_SPACE, "client": client}
        autocommit = isinstance(self.db, Connection) and (
            self.db.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        )
        if not autocommit:
            self.db.execute(text(_CLIENT_XACT_LOCK), key)
            yield
            return
        self.db.execute(text(_CLIENT_LOCK), key)
        try:
            yield
        finally:
            self.db.execute(text(_CLIENT_UNLOCK), key)

    def _session(self) -> Session:
        if not isinstance(self.db, Session):
            raise TypeError("reading records as rows needs an ORM session")
        return self.db

    def book(
        self,
        new: NewSession,
        now: float,
        *,
        queue_stale_before: float | None = None,
        quota: int = 0,
    ) -> BookingCheck:
        """Book (see the module docstring). ``queue_stale_before``: refuse while a live
        ticket waits (tickets not renewed since then are dead); ``quota`` > 0: refuse when the
        session's client already holds that many live sessions. After a refusal on SQLite the
        caller rolls back (units may have been taken). A second booking with the client's
        Idempotency-Key raises IntegrityError."""
        if not new.holds:
            raise ValueError("a session holds units on at least one server")
        parameters = new.parameters()
        parameters.update(
            b_now=now, b_stale=queue_stale_before, b_quota=quota, b_hops=len(new.holds)
        )
        if self._postgres():
            parameters.update(
                b_ids=[server_id for server_id, _ in new.holds],
                b_units=[units for _, units in new.holds],
            )
            statement = _BOOK[(queue_stale_before is not None, quota > 0)]
            if quota > 0:
                with self._client_lock(new.client):
                    free, clear, within = self.db.execute(statement, parameters).one()
            else:
                free, clear, within = self.db.execute(statement, parameters).one()
            return BookingCheck(bool(free), bool(clear), bool(within))
        want = dict(new.holds)
        if len(want) != len(new.holds):
            raise ValueError("a session holds units once per server")
        parameters["b_want"] = json.dumps(want)
        driver = _driver(self.db)
        take = _SQLITE_TAKE_UNITS[(queue_stale_before is not None, quota > 0)]
        with _translated(take, parameters):
            taken = driver.execute(take, parameters).rowcount
            if taken != len(want):  # why not (the caller rolls back)
                clear, within = driver.execute(_SQLITE_CHECKS, parameters).fetchone()
                # Units are not told apart from the other checks here: "free" is False.
                clear = queue_stale_before is None or bool(clear)
                within = quota <= 0 or bool(within)
                return BookingCheck(False, clear, within)
            driver.execute(_SQLITE_INSERT_SESSION, parameters)
            driver.execute(_SQLITE_INSERT_RESERVATIONS, parameters)
            driver.execute(_SQLITE_INSERT_RECORD, parameters)
        return BookingCheck(True, True, True)

    def release(self, session_id: str, token_hash: str | None, now: float, reason: str) -> Released:
        """End the record and release the session. ``token_hash`` None: trusted (the admin
        or the sweep); else only a record with that token hash is ended and released."""
        trusted = token_hash is None
        parameters = {
            "b_session": session_id,
            "b_hash": token_hash or "",
            "b_trusted": trusted,
            "b_now": now,
            "b_reason": reason,
        }
        if self._postgres():
            rows = self.db.execute(_RELEASE, parameters).all()
            first = rows[0]
            held = [Held(r.server_id, r.slots, r.expires_at) for r in rows if r.server_id]
            return Released(
                bool(first.ended), bool(first.deleted), held, first.generation, first.chain
            )
        driver = _driver(self.db)
        with _translated(_SQLITE_END_RECORD, parameters):
            ended = driver.execute(_SQLITE_END_RECORD, parameters).fetchone()
            if ended is None and not trusted:
                return Released(False, False, [])
            held = [Held(*row) for row in driver.execute(_SQLITE_DROP_RESERVATIONS, parameters)]
            deleted = driver.execute(_SQLITE_DELETE_SESSION, parameters).rowcount == 1
            driver.executemany(
                _SQLITE_GIVE_BACK, [{"id": h.server_id, "slots": h.slots} for h in held]
            )
        generation, chain = (None, None) if ended is None else ended
        return Released(ended is not None, deleted, held, generation, chain)

    # --- records ---------------------------------------------------------------------------

    def record(self, session_id: str) -> SessionRecordRow | None:
        return self._session().get(SessionRecordRow, session_id)

    def by_key(self, client: str, idempotency_key: str) -> SessionRecordRow | None:
        return (
            self._session()
            .scalars(
                select(SessionRecordRow).where(
                    SessionRecordRow.client == client,
                    SessionRecordRow.idempotency_key == idempotency_key,
                )
            )
            .first()
        )

    def rotate_token(self, session_id: str, token_hash: str) -> None:
        self.db.execute(
            update(_RECORDS).where(_RECORDS.c.id == session_id).values(token_hash=token_hash)
        )

    def live_for(self, client: str) -> int:
        query = select(func.count()).where(
            SessionRecordRow.client == client, SessionRecordRow.ended_at.is_(None)
        )
        return int(self.db.scalar(query) or 0)

    def in_service(self, generation: int) -> dict[int, int]:
        """chain -> live sessions of this generation on it (JFFC's occupied job slots)."""
        rows = self.db.execute(
            select(SessionRecordRow.chain, func.count())
            .where(
                SessionRecordRow.generation == generation,
                SessionRecordRow.ended_at.is_(None),
                SessionRecordRow.chain.is_not(None),
            )
            .group_by(SessionRecordRow.chain)
        ).all()
        return {int(chain): int(count) for chain, count in rows if chain is not None}

    def lost_ids(self, now: float, limit: int = 1000) -> list[str]:
        """Live sessions through a server that is gone: its lease expired, its row deleted,
        or its reservations dropped (it left or re-registered)."""
        dead_hop = (
            "SELECT DISTINCT r.session_id FROM reservations AS r "
            "LEFT JOIN servers AS s ON s.id = r.server_id "
            "WHERE s.id IS NULL OR s.lease_expires_at <= :now"
        )
        dropped = (
            "SELECT c.id FROM session_records AS c JOIN sessions AS x ON x.id = c.id "
            "WHERE c.ended_at IS NULL AND c.hops > "
            "(SELECT count(*) FROM reservations AS r WHERE r.session_id = c.id)"
        )
        query = text(f"{dead_hop} UNION {dropped} LIMIT :limit")
        return [str(r[0]) for r in self.db.execute(query, {"now": now, "limit": limit})]

    def forget_ended(self, before: float) -> int:
        """Delete the records of sessions that ended before ``before``."""
        result: Any = self.db.execute(_RECORDS.delete().where(_RECORDS.c.ended_at < before))
        return int(result.rowcount)
