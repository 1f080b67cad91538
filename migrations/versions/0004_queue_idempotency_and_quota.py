"""the queue: one waiting ticket per client's Idempotency-Key, the client's session quota

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("booking_queue", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("max_sessions", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.create_index(
            "uq_booking_queue_client_idempotency_key",
            ["client", "idempotency_key"],
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("booking_queue", schema=None) as batch_op:
        batch_op.drop_index("uq_booking_queue_client_idempotency_key")
        batch_op.drop_column("max_sessions")
