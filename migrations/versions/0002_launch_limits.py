"""The launch limits on the models table: max_tokens_limit and rate_limit.

A replica that liveness re-places after its worker died is launched again from its model's row;
before this revision the row did not keep these two launch options, so the replica came back
without the limits its launch asked for.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without a server default: a plain ADD COLUMN on SQLite and PostgreSQL.
    # Rows of models launched before this revision read None, "no limit", as they ran.
    op.add_column("models", sa.Column("max_tokens_limit", sa.Integer(), nullable=True))
    op.add_column("models", sa.Column("rate_limit", sa.Float(), nullable=True))


def downgrade() -> None:
    # A native DROP COLUMN (SQLite 3.35 or later), not batch mode: batch mode rebuilds the table
    # and drops the old one, and with foreign keys on that drop cascades into the replicas
    # table and deletes every replica row.
    op.drop_column("models", "rate_limit")
    op.drop_column("models", "max_tokens_limit")
