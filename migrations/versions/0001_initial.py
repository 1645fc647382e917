"""The registry's initial tables: registrations, models, replicas, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registrations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_type", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("persist", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registrations")),
        sa.UniqueConstraint("model_type", "model_name", name=op.f("uq_registrations_model_type_model_name")),
    )
    op.create_table(
        "models",
        sa.Column("model_uid", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_type", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("quantization", sa.String(length=16), nullable=False),
        sa.Column("replica", sa.Integer(), nullable=False),
        sa.Column("request_limits", sa.Integer(), nullable=True),
        sa.Column("max_batch_size", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('launching', 'ready', 'failed', 'terminating')", name=op.f("ck_models_status")
        ),
        sa.PrimaryKeyConstraint("model_uid", name=op.f("pk_models")),
    )
    op.create_table(
        "replicas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_uid", sa.String(length=128), nullable=False),
        sa.Column("replica_index", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('placing', 'loading', 'ready', 'failed', 'stopping')",
            name=op.f("ck_replicas_status"),
        ),
        sa.ForeignKeyConstraint(
            ["model_uid"],
            ["models.model_uid"],
            name=op.f("fk_replicas_model_uid_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
        sa.UniqueConstraint("model_uid", "replica_index", name=op.f("uq_replicas_model_uid_replica_index")),
    )
    op.create_index(op.f("ix_replicas_model_uid"), "replicas", ["model_uid"], unique=False)
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index(op.f("ix_replicas_model_uid"), table_name="replicas")
    op.drop_table("replicas")
    op.drop_table("models")
    op.drop_table("registrations")
