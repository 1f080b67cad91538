"""session records (token hash, client, idempotency key, end reason) and the central queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "session_records",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("client", sa.String(length=300), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("client_site", sa.String(length=200), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("hops", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("chain", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("end_reason", sa.String(length=20), nullable=True),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_session_records")),
        sa.UniqueConstraint("client", "idempotency_key", name=op.f("uq_session_records_client")),
    )
    with op.batch_alter_table("session_records", schema=None) as batch_op:
        batch_op.create_index(
            "ix_session_records_client_ended_at", ["client", "ended_at"], unique=False
        )
        batch_op.create_index("ix_session_records_ended_at", ["ended_at"], unique=False)
        batch_op.create_index(
            "ix_session_records_generation_ended_at", ["generation", "ended_at"], unique=False
        )
    op.create_table(
        "booking_queue",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("client", sa.String(length=300), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("client_site", sa.String(length=200), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_booking_queue")),
        sa.UniqueConstraint("session_id", name=op.f("uq_booking_queue_session_id")),
    )
    with op.batch_alter_table("booking_queue", schema=None) as batch_op:
        batch_op.create_index("ix_booking_queue_state_seq", ["state", "seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("booking_queue", schema=None) as batch_op:
        batch_op.drop_index("ix_booking_queue_state_seq")
    op.drop_table("booking_queue")
    with op.batch_alter_table("session_records", schema=None) as batch_op:
        batch_op.drop_index("ix_session_records_generation_ended_at")
        batch_op.drop_index("ix_session_records_ended_at")
        batch_op.drop_index("ix_session_records_client_ended_at")
    op.drop_table("session_records")
