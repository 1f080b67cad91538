"""What every repository shares: the row ids of the singletons, the RTT pair key, an
insert that tolerates a concurrent one, and the dialect test. Repositories (app.store.*) take
the caller's SQLAlchemy ``Session`` and NEVER commit, roll back or begin: the service layer
owns the transaction (app.service.core)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.models import Base

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


def is_postgres(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


def rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count
