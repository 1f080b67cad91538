"""The live sessions' reads: expired sessions and the count. Booking and releasing a session
(its units, reservations and record, all or nothing) is app.store.bookings. Never commits
(see app.store.common)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.models import SessionRow


class Sessions:
    def __init__(self, db: Session) -> None:
        self.db = db

    def expired_ids(self, now: float, limit: int = 1000) -> list[str]:
        return list(
            self.db.scalars(select(SessionRow.id).where(SessionRow.expires_at <= now).limit(limit))
        )

    def count(self) -> int:
        return int(self.db.scalar(select(func.count()).select_from(SessionRow)) or 0)
