"""Repositories of the planner: published placements, the re-plan request flag and the
leader lease. Never commit (see app.store.common)."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.store.common import PLANNER_LEADER, PLANNER_STATE_ID, insert_ignore
from app.store.common import rowcount as _rowcount
from app.store.models import LeaderRow, PlacementRow, PlannerStateRow

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
