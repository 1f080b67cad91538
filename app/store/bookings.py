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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session

from app.store.models import ReservationRow, ServerRow, SessionRow
from app.store.reservations import Held
from app.store.session_tables import QueueRow, SessionRecordRow
from app.store.sessions import Sessions

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

# SQLite: one hop at a time inside the caller's (exclusive) transaction.
_RESERVE_UNITS = text(
    f"""
UPDATE servers SET reserved_slots = reserved_slots + :b_units
WHERE id = :b_id AND lease_expires_at > :b_now AND loaded_start IS NOT NULL
  AND reserved_slots + :b_units <= (
      SELECT {_capacity("servers", "m", postgres=False)} FROM model_spec AS m WHERE m.id = 1
  )
"""
)


# The portable path's statements, built once (building one costs more than running it).
_QUEUE_IS_CLEAR = text(f"SELECT {_QUEUE_CLEAR}")
_INSERT_RECORD = insert(_RECORDS)
_END_RECORD = (
    update(_RECORDS)
    .where(_RECORDS.c.id == bindparam("b_session"), _RECORDS.c.ended_at.is_(None))
    .values(ended_at=bindparam("b_now"), end_reason=bindparam("b_reason"))
    .returning(_RECORDS.c.generation, _RECORDS.c.chain)
)
_END_OWN_RECORD = _END_RECORD.where(_RECORDS.c.token_hash == bindparam("b_hash"))


@dataclass(frozen=True)
class BookingCheck:
    """Why a booking went through or not: units free on every hop, the queue clear, the
    client within its quota."""

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


class Bookings:
    def __init__(self, db: Session) -> None:
        self.db = db

    def _postgres(self) -> bool:
        return self.db.get_bind().dialect.name == "postgresql"

    def book(
        self,
        row: SessionRow,
        holds: Sequence[tuple[str, int]],
        record: SessionRecordRow,
        now: float,
        *,
        queue_stale_before: float | None = None,
        quota: int = 0,
    ) -> BookingCheck:
        """Book (see the module docstring). ``queue_stale_before``: refuse while a live
        ticket waits (tickets not renewed since then are dead); ``quota`` > 0: refuse when the
        record's client already holds that many live sessions. After a refusal on SQLite the
        caller rolls back (hops already taken). A second booking with the client's
        Idempotency-Key raises IntegrityError."""
        record_values = {name: getattr(record, name) for name in _RECORD_COLUMNS}
        if self._postgres():
            parameters: dict[str, Any] = {f"s_{n}": getattr(row, n) for n in _SESSION_COLUMNS}
            parameters.update({f"r_{n}": v for n, v in record_values.items()})
            parameters.update(
                b_ids=[server_id for server_id, _ in holds],
                b_units=[units for _, units in holds],
                b_hops=len(holds),
                b_now=now,
                b_stale=queue_stale_before,
                b_quota=quota,
            )
            statement = _BOOK[(queue_stale_before is not None, quota > 0)]
            free, clear, within = self.db.execute(statement, parameters).one()
            return BookingCheck(bool(free), bool(clear), bool(within))
        if queue_stale_before is not None and self.db.scalar(
            _QUEUE_IS_CLEAR, {"b_now": now, "b_stale": queue_stale_before}
        ) in (0, False):
            return BookingCheck(True, False, True)
        if quota > 0 and self.live_for(record.client) >= quota:
            return BookingCheck(True, True, False)
        for server_id, units in sorted(holds):
            result: Any = self.db.execute(
                _RESERVE_UNITS, {"b_id": server_id, "b_units": units, "b_now": now}
            )
            if result.rowcount != 1:
                return BookingCheck(False, True, True)
        Sessions(self.db).add(row, holds)
        self.db.execute(_INSERT_RECORD, record_values)
        return BookingCheck(True, True, True)

    def release(self, session_id: str, token_hash: str | None, now: float, reason: str) -> Released:
        """End the record and release the session. ``token_hash`` None: trusted (the admin
        or the sweep); else only a record with that token hash is ended and released."""
        trusted = token_hash is None
        if self._postgres():
            rows = self.db.execute(
                _RELEASE,
                {
                    "b_session": session_id,
                    "b_hash": token_hash or "",
                    "b_trusted": trusted,
                    "b_now": now,
                    "b_reason": reason,
                },
            ).all()
            first = rows[0]
            held = [Held(r.server_id, r.slots, r.expires_at) for r in rows if r.server_id]
            return Released(
                bool(first.ended), bool(first.deleted), held, first.generation, first.chain
            )
        parameters = {"b_session": session_id, "b_now": now, "b_reason": reason}
        if trusted:
            ended = self.db.execute(_END_RECORD, parameters).first()
        else:
            ended = self.db.execute(_END_OWN_RECORD, {**parameters, "b_hash": token_hash}).first()
        if ended is None and not trusted:
            return Released(False, False, [])
        released = Sessions(self.db).release(session_id)
        generation, chain = (None, None) if ended is None else (ended.generation, ended.chain)
        return Released(ended is not None, released is not None, released or [], generation, chain)

    # --- records ---------------------------------------------------------------------------

    def record(self, session_id: str) -> SessionRecordRow | None:
        return self.db.get(SessionRecordRow, session_id)

    def by_key(self, client: str, idempotency_key: str) -> SessionRecordRow | None:
        return self.db.scalars(
            select(SessionRecordRow).where(
                SessionRecordRow.client == client,
                SessionRecordRow.idempotency_key == idempotency_key,
            )
        ).first()

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
