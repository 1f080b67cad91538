"""The sweep of live sessions: those past their expiry ("expired") and those through a server
that is gone ("server_lost"), and the deletion of ended sessions' records past their
retention.

Transactions: one read transaction finds them, one ``booking_tx`` releases them (each release
commits by itself on PostgreSQL), one more deletes old records.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from app.service.audit import audit
from app.service.core import Core
from app.service.session_settings import SessionSettings
from app.store.bookings import Bookings, Released
from app.store.reservations import Held
from app.store.sessions import Sessions

# How often ended sessions' records past their retention are deleted (by the full sweep).
RECORD_PRUNE_S = 60.0
# Sessions one full sweep (the planner's tick, in a thread) ends at most.
SWEEP_LIMIT = 1000
# Sessions a booking's own sweep ends at most: it may run on the event loop (SQLite), where
# every release holds up every request; the planner's tick, or the next booking, ends the
# rest.
BOOKING_SWEEP_LIMIT = 50


class SessionSweeper:
    def __init__(
        self,
        core: Core,
        config: SessionSettings,
        forget: Callable[[list[Held], list[Released]], None],
        units_freed: Callable[[], None],
    ) -> None:
        self.core = core
        self.config = config
        # Mirrors released units in the route view; wakes the queue.
        self.forget = forget
        self.units_freed = units_freed
        self._records_pruned_at = -math.inf

    def sweep(self, now: float, lost: bool, limit: int = SWEEP_LIMIT) -> int:
        """End up to ``limit`` expired sessions, and with ``lost`` the sessions through a
        server that is gone (and old records); the number ended."""
        with self.core.read_tx() as db:
            expired = Sessions(db).expired_ids(now, limit)
            gone = set(expired)
            room = limit - len(expired)
            through_lost = (
                [s for s in Bookings(db).lost_ids(now, limit) if s not in gone][:room]
                if lost and room > 0
                else []
            )
        if expired or through_lost:
            self._end(now, expired, through_lost)
        if lost and now - self._records_pruned_at >= RECORD_PRUNE_S:
            self._records_pruned_at = now
            with self.core.booking_tx() as db:
                Bookings(db).forget_ended(now - self.config.record_retention_s)
        return len(expired) + len(through_lost)

    def _end(self, now: float, expired: list[str], through_lost: list[str]) -> None:
        released: list[Held] = []
        ended: list[Released] = []
        # On PostgreSQL every release commits by itself (booking_tx): one transaction holding
        # many sessions' server rows would lock them out of id order and could deadlock.
        with self.core.booking_tx() as db:
            bookings = Bookings(db)
            for ids, reason in ((expired, "expired"), (through_lost, "server_lost")):
                for session_id in ids:
                    outcome = bookings.release(session_id, None, now, reason)
                    released.extend(outcome.held)
                    ended.append(outcome)
        self.forget(released, ended)
        if released:
            self.units_freed()
        if through_lost:
            audit("sessions_ended", reason="server_lost", count=len(through_lost))
