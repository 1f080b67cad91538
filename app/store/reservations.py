"""Reservations: the cache slots a session holds on each server of its chain. Never
commits (see app.store.common)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.store.models import ReservationRow


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
