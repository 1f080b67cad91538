"""PETALS peer identity on servers; chains and dispatcher on placements

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 17:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peer_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("multiaddrs", sa.Text(), nullable=True))
    with op.batch_alter_table("placements", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chains", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("dispatcher", sa.String(length=10), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("placements", schema=None) as batch_op:
        batch_op.drop_column("dispatcher")
        batch_op.drop_column("chains")
    with op.batch_alter_table("servers", schema=None) as batch_op:
        batch_op.drop_column("multiaddrs")
        batch_op.drop_column("peer_id")
