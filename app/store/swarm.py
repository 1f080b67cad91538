"""Repositories of the swarm's description: the model, sites, clients, RTTs, and clearing
it all for a scenario load. They never commit (see app.store.common)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.store.common import MODEL_ID, insert_ignore, pair_key
from app.store.models import (
    ClientRow,
    ModelRow,
    PlacementRow,
    ReservationRow,
    RttRow,
    ServerRow,
    SessionRow,
    SiteRow,
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
