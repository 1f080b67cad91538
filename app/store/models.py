"""The coordinator's tables (SQLAlchemy 2 typed models).

Schema changes go through Alembic migrations in ``migrations/``; ``alembic check`` (run by the
tests) keeps these models and the migrations in step. Times are seconds on the coordinator's
clock (``time.time()`` unless a test injects one).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """The model the swarm serves (one row, id 1) and the request limits and overheads."""

    __tablename__ = "model_spec"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    num_blocks: Mapped[int] = mapped_column(Integer)
    block_memory_gb: Mapped[float] = mapped_column(Float)
    kv_bytes_per_token_per_block: Mapped[float] = mapped_column(Float)
    max_input_tokens: Mapped[int] = mapped_column(Integer)
    max_output_tokens: Mapped[int] = mapped_column(Integer)
    hidden_size: Mapped[int | None] = mapped_column(Integer)
    petals_cache_tokens: Mapped[int | None] = mapped_column(Integer)
    per_token_ms: Mapped[float] = mapped_column(Float, default=0.0)
    prefill_fixed_ms: Mapped[float] = mapped_column(Float, default=0.0)
    prefill_per_token_ms: Mapped[float] = mapped_column(Float, default=0.0)
    per_request_ms: Mapped[float] = mapped_column(Float, default=0.0)
    # Design concurrency |R| for the planner; None: from the arrival rate or per client site.
    concurrency: Mapped[int | None] = mapped_column(Integer)
    rate_per_s: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class SiteRow(Base):
    __tablename__ = "sites"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class ClientRow(Base):
    """A client population (the scenario's clients); routes are asked per client site."""

    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    share: Mapped[float] = mapped_column(Float)
    position: Mapped[int] = mapped_column(Integer)


class ServerRow(Base):
    __tablename__ = "servers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    gpu: Mapped[str | None] = mapped_column(String(200))
    memory_gb: Mapped[float] = mapped_column(Float)
    decode_ms_per_block: Mapped[float] = mapped_column(Float)
    prefill_fixed_ms: Mapped[float] = mapped_column(Float)
    prefill_per_token_ms: Mapped[float] = mapped_column(Float)
    network_mbps: Mapped[float | None] = mapped_column(Float)
    address: Mapped[str] = mapped_column(String(500))
    boot_epoch: Mapped[int] = mapped_column(BigInteger)
    token_hash: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(20))  # joining / online / draining
    loaded_start: Mapped[int | None] = mapped_column(Integer)
    loaded_end: Mapped[int | None] = mapped_column(Integer)
    free_cache_slots: Mapped[int | None] = mapped_column(Integer)
    # Cache slots (one request on one block each) the loaded span leaves free, and how many
    # of them live sessions hold; bookings only ever move reserved_slots up to cache_slots.
    cache_slots: Mapped[int] = mapped_column(Integer, default=0)
    reserved_slots: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)
    # The PETALS identity of the server (peer id, and a JSON list of multiaddrs), when it
    # registered one; routes and sessions pass it on so that clients reach that peer.
    peer_id: Mapped[str | None] = mapped_column(String(200))
    multiaddrs: Mapped[str | None] = mapped_column(Text)


class RttRow(Base):
    """A smoothed RTT between two endpoints (sites, servers or clients), a <= b."""

    __tablename__ = "rtts"

    a: Mapped[str] = mapped_column(String(200), primary_key=True)
    b: Mapped[str] = mapped_column(String(200), primary_key=True)
    rtt_ms: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)


class PlacementRow(Base):
    __tablename__ = "placements"

    generation: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    algorithm: Mapped[str] = mapped_column(String(20))
    concurrency: Mapped[int] = mapped_column(Integer)
    objective_ms_per_token: Mapped[float] = mapped_column(Float)
    bound_ms_per_token: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20))
    solve_seconds: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[float] = mapped_column(Float)
    # JSON: the scenario the solver saw, and {server id: [start, end]}.
    inputs: Mapped[str] = mapped_column(Text)
    spans: Mapped[str] = mapped_column(Text)
    # A chain plan's chains (JSON [{"hops": [[server id, start, end], ...], "capacity": c,
    # "service_ms": x}], fastest first) and the online dispatcher routes use ("jffc" | "wsrr");
    # NULL for plans published before chains existed (dispatched with WS-RR).
    chains: Mapped[str | None] = mapped_column(Text)
    dispatcher: Mapped[str | None] = mapped_column(String(10))


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_site: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    first_token_ms: Mapped[float] = mapped_column(Float)
    per_token_ms: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)  # JSON list of {server, start, end}


class ReservationRow(Base):
    __tablename__ = "reservations"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    server_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)


class LeaderRow(Base):
    """A leader lease: the process holding it (until expires_at) runs the planner."""

    __tablename__ = "leader"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))
    expires_at: Mapped[float] = mapped_column(Float)


class PlannerStateRow(Base):
    """One row (id 1): a pending re-plan request (set by joins, model changes, drift)."""

    __tablename__ = "planner_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    requested: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(500))
    updated_at: Mapped[float] = mapped_column(Float)
