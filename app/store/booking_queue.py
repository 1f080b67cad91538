"""The central queue's repository (table ``booking_queue``). Never commits: the service
(app.service.queue) owns each transaction and takes ``lock()`` first in every one that reads
the head or adds a ticket, so that admissions and arrivals are serialised across processes and
``seq`` order is arrival order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, delete, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.store.session_tables import QueueRow

WAITING = "waiting"
ADMITTED = "admitted"
REFUSED = "refused"
# Refused at the head because its client held its quota of live sessions then (a 429).
OVER_QUOTA = "quota"
# Any constant works; it only has to be the same for every coordinator process.
QUEUE_LOCK_ID = 0x62717565
_QUEUE = cast(Table, QueueRow.__table__)


@dataclass(frozen=True)
class QueuedRequest:
    """What a ticket asks for (and the session it becomes once admitted)."""

    session_id: str
    token_hash: str
    client: str
    idempotency_key: str | None
    client_site: str
    input_tokens: int
    output_tokens: int
    # The client's quota of live sessions (0: none): checked again when admitted.
    max_sessions: int = 0


@dataclass(frozen=True)
class Ticket:
    seq: int
    request: QueuedRequest
    enqueued_at: float
    deadline: float


def live_waiting(now: float, stale_before: float) -> Any:
    """The condition of a ticket that still waits: not past its deadline, holder alive."""
    return and_(
        _QUEUE.c.state == WAITING,
        _QUEUE.c.deadline > now,
        _QUEUE.c.seen_at > stale_before,
    )


def anyone_waiting(now: float, stale_before: float) -> Any:
    """EXISTS (a live ticket): a direct booking must not take a slot the queue's head waits
    for."""
    return exists().where(live_waiting(now, stale_before))


def is_postgres(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


class BookingQueue:
    def __init__(self, db: Session) -> None:
        self.db = db

    def lock(self) -> None:
        """Serialise with every other queue transaction (held until commit). PostgreSQL: a
        transaction-level advisory lock; SQLite: the transaction's BEGIN IMMEDIATE already
        holds the only writer lock."""
        if is_postgres(self.db):
            self.db.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": QUEUE_LOCK_ID})

    def depth(self, now: float, stale_before: float) -> int:
        query = select(func.count()).select_from(_QUEUE).where(live_waiting(now, stale_before))
        return int(self.db.scalar(query) or 0)

    def any_waiting(self, now: float, stale_before: float) -> bool:
        return bool(self.db.scalar(select(anyone_waiting(now, stale_before))))

    def add(self, request: QueuedRequest, holder: str, now: float, deadline: float) -> int:
        values = {
            "session_id": request.session_id,
            "token_hash": request.token_hash,
            "holder": holder,
            "client": request.client,
            "idempotency_key": request.idempotency_key,
            "client_site": request.client_site,
            "input_tokens": request.input_tokens,
            "output_tokens": request.output_tokens,
            "max_sessions": request.max_sessions,
            "enqueued_at": now,
            "deadline": deadline,
            "seen_at": now,
            "state": WAITING,
            "reply": None,
        }
        seq = self.db.execute(_QUEUE.insert().values(**values).returning(_QUEUE.c.seq)).scalar()
        return int(cast(int, seq))

    def drop_stale(self, now: float, stale_before: float) -> int:
        """Delete the waiting tickets past their deadline or whose holder stopped renewing
        them (its client gave up, its process died)."""
        statement = delete(_QUEUE).where(
            or_(
                and_(
                    _QUEUE.c.state == WAITING,
                    or_(_QUEUE.c.deadline <= now, _QUEUE.c.seen_at <= stale_before),
                ),
                # Answered, and its holder never picked the answer up (it died): the session
                # expires by itself.
                and_(_QUEUE.c.state != WAITING, _QUEUE.c.deadline <= stale_before),
            )
        )
        result: Any = self.db.execute(statement)
        return int(result.rowcount)

    def head(self, now: float, stale_before: float) -> Ticket | None:
        row = self.db.execute(
            select(_QUEUE).where(live_waiting(now, stale_before)).order_by(_QUEUE.c.seq).limit(1)
        ).first()
        if row is None:
            return None
        request = QueuedRequest(
            session_id=row.session_id,
            token_hash=row.token_hash,
            client=row.client,
            idempotency_key=row.idempotency_key,
            client_site=row.client_site,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            max_sessions=row.max_sessions,
        )
        return Ticket(row.seq, request, row.enqueued_at, row.deadline)

    def admit(self, seq: int, reply: str) -> None:
        self.db.execute(
            update(_QUEUE).where(_QUEUE.c.seq == seq).values(state=ADMITTED, reply=reply)
        )

    def refuse(self, seq: int, reason: str, state: str = REFUSED) -> None:
        """Take a head that cannot be served out of the line (REFUSED, or OVER_QUOTA); its
        holder answers it."""
        self.db.execute(update(_QUEUE).where(_QUEUE.c.seq == seq).values(state=state, reply=reason))

    def touch(self, holder: str, now: float) -> None:
        """Renew every waiting ticket of this holder."""
        self.db.execute(
            update(_QUEUE)
            .where(_QUEUE.c.holder == holder, _QUEUE.c.state == WAITING)
            .values(seen_at=now)
        )

    def answered_for(self, holder: str) -> dict[str, tuple[str, str]]:
        """session id -> (state, reply) of this holder's admitted or refused tickets,
        deleted as they are read."""
        rows = self.db.execute(
            delete(_QUEUE)
            .where(_QUEUE.c.holder == holder, _QUEUE.c.state.in_([ADMITTED, REFUSED, OVER_QUOTA]))
            .returning(_QUEUE.c.session_id, _QUEUE.c.state, _QUEUE.c.reply)
        ).all()
        return {row.session_id: (row.state, row.reply or "") for row in rows}

    def waiting_ids(self, holder: str) -> set[str]:
        return set(
            self.db.scalars(
                select(_QUEUE.c.session_id).where(
                    _QUEUE.c.holder == holder, _QUEUE.c.state == WAITING
                )
            )
        )

    def withdraw(self, session_id: str) -> tuple[str, str] | None:
        """Take a ticket out of the queue: None if it was still waiting (or gone), else
        (state, reply) of its answer: admitted (the session exists; the caller returns or
        releases it) or refused (the reason)."""
        row = self.db.execute(
            delete(_QUEUE)
            .where(_QUEUE.c.session_id == session_id)
            .returning(_QUEUE.c.state, _QUEUE.c.reply)
        ).first()
        if row is None or row.state == WAITING:
            return None
        return str(row.state), str(row.reply or "")

    def find_waiting(self, client: str, idempotency_key: str) -> str | None:
        """The session id of a waiting ticket with this client's Idempotency-Key, if any."""
        found = self.db.scalar(
            select(_QUEUE.c.session_id).where(
                _QUEUE.c.client == client,
                _QUEUE.c.idempotency_key == idempotency_key,
            )
        )
        return None if found is None else str(found)

    def waiting_for(self, client: str) -> int:
        """The client's tickets still in the line (they count against its session quota)."""
        query = (
            select(func.count())
            .select_from(_QUEUE)
            .where(_QUEUE.c.client == client, _QUEUE.c.state == WAITING)
        )
        return int(self.db.scalar(query) or 0)

    def seqs(self, session_ids: Sequence[str]) -> dict[str, int]:
        rows = self.db.execute(
            select(_QUEUE.c.session_id, _QUEUE.c.seq).where(_QUEUE.c.session_id.in_(session_ids))
        ).all()
        return {row.session_id: int(row.seq) for row in rows}
