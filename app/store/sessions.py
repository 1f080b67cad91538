"""The sessions repository: booking (slots on every hop and the session row, all or
nothing) and release. Never commits (see app.store.common)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, text
from sqlalchemy.orm import Session

from app.store.common import is_postgres as _is_postgres
from app.store.common import rowcount as _rowcount
from app.store.models import ReservationRow, SessionRow
from app.store.reservations import Held
from app.store.servers import Servers

_SESSIONS = cast(Table, SessionRow.__table__)
_RESERVATIONS = cast(Table, ReservationRow.__table__)
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
