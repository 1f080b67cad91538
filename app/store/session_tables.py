"""The sessions domain's own tables (beside ``sessions`` and ``reservations`` in
app.store.models): who holds each session and how it ended, and the central FIFO queue.

``session_records`` outlives the live ``sessions`` row: a client asking about a session that
ended (released, expired, or its server was lost) learns why, and a retried booking with the
same Idempotency-Key finds the session it booked. Tokens are stored as SHA-256 hashes only.

``booking_queue`` is the one FIFO queue every coordinator process shares: ``seq`` orders it
(a sequence on PostgreSQL, the rowid on SQLite), admission takes the head under one lock.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.store.models import Base

# SQLite autoincrements only an INTEGER PRIMARY KEY.
_SEQUENCE = BigInteger().with_variant(Integer(), "sqlite")


class SessionRecordRow(Base):
    """One booked session, from its booking until ``record_retention_s`` after its end."""

    __tablename__ = "session_records"
    __table_args__ = (
        UniqueConstraint("client", "idempotency_key"),
        Index("ix_session_records_client_ended_at", "client", "ended_at"),
        Index("ix_session_records_ended_at", "ended_at"),
        Index("ix_session_records_generation_ended_at", "generation", "ended_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    # Who booked it: "token:<name>" for a client token, "anonymous:<address>" otherwise.
    client: Mapped[str] = mapped_column(String(300))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    client_site: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    # Servers it holds cache on (one reservation each): fewer reservations left than this
    # means a server dropped them (it left or re-registered) and the session is lost.
    hops: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    # The chain of the placement's chain plan it runs on (JFFC), else None.
    chain: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    # released | expired | server_lost
    end_reason: Mapped[str | None] = mapped_column(String(20))
    # The booking's reply without its token (JSON), for GET /v1/sessions/{id} and retries.
    reply: Mapped[str] = mapped_column(Text)


class QueueRow(Base):
    """A booking waiting in the central queue (state "waiting"), or admitted and not yet
    picked up by the process whose client waits for it (state "admitted", ``reply`` set),
    or refused at the head because it can no longer be served (state "refused", ``reply``
    the reason)."""

    __tablename__ = "booking_queue"
    __table_args__ = (
        Index("ix_booking_queue_state_seq", "state", "seq"),
        # One ticket per client's Idempotency-Key: two requests racing with one key cannot
        # both enqueue (the second gets the first's answer or a 409).
        Index(
            "uq_booking_queue_client_idempotency_key",
            "client",
            "idempotency_key",
            unique=True,
            sqlite_where=text("idempotency_key IS NOT NULL"),
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    seq: Mapped[int] = mapped_column(_SEQUENCE, primary_key=True, autoincrement=True)
    # The session it becomes, chosen at enqueue (with its token's hash).
    session_id: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    # The coordinator process whose client is waiting (its instance id).
    holder: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(300))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    client_site: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    # The client's quota of live sessions when it asked (0: none), applied at admission.
    max_sessions: Mapped[int] = mapped_column(Integer, server_default="0")
    enqueued_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    # Renewed by the holder while its client waits; a stale ticket (holder gone) is dropped.
    seen_at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(10))
    reply: Mapped[str | None] = mapped_column(Text)
