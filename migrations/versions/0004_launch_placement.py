"""The placement a launch asked for (worker_id, n_gpu) on the models table.

A model that starts on demand places its replicas when its first request comes, long after its
launch: the launch's pinned worker and GPU count are kept in its row so that the start places
them as the launch asked, on this registry or on one restarted or added later.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable and without a server default, as in 0002 and 0003: a plain ADD COLUMN on both
    # backends. Models launched before this revision read None for both: any worker, "auto".
    op.add_column("models", sa.Column("launch_worker_id", sa.String(length=128), nullable=True))
    op.add_column("models", sa.Column("launch_n_gpu", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Native DROP COLUMN, not batch mode (see 0002: a rebuilt table cascades into replicas).
    op.drop_column("models", "launch_n_gpu")
    op.drop_column("models", "launch_worker_id")
