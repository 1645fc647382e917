"""On-demand models: min_replicas and idle_timeout on the models table.

A model launched with a minimum replica count (0: it scales to zero) and an idle timeout keeps
both in its row, so that a registry restarted or replaced later still stops its idle replicas
and starts it again on demand.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and without a server default, as in 0002: a plain ADD COLUMN on both backends.
    # Models launched before this revision read None, "never scales", as they ran.
    op.add_column("models", sa.Column("min_replicas", sa.Integer(), nullable=True))
    op.add_column("models", sa.Column("idle_timeout", sa.Float(), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN, not batch mode (see 0002: a rebuilt table cascades into replicas).
    op.drop_column("models", "idle_timeout")
    op.drop_column("models", "min_replicas")
