"""The registry's tables (SQLAlchemy 2 declarative, typed).

Portable across SQLite and PostgreSQL: JSON columns use the generic ``JSON`` type and every
timestamp is a timezone-aware UTC ``datetime`` (``UTCDateTime`` puts the zone back on the naive
values SQLite returns). Constraint names come from one naming convention so that Alembic
revisions can name what they create and drop.

    registrations   one custom-model definition per (model_type, model_name)
    models          one row per launched model uid: what runs, with the options its replicas
                    are launched with, and its status
    replicas        the replicas of a model: which worker, which device, their status
    workers         the last heartbeat of each worker seen (a record for operators; the
                    registry's live view is in memory)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "MODEL_STATUSES",
    "NAMING_CONVENTION",
    "REPLICA_STATUSES",
    "Base",
    "ModelRow",
    "ModelStatus",
    "Registration",
    "ReplicaRow",
    "ReplicaStatus",
    "UTCDateTime",
    "WorkerRow",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ModelStatus = Literal["launching", "ready", "failed", "terminating"]
MODEL_STATUSES: tuple[str, ...] = ("launching", "ready", "failed", "terminating")
ReplicaStatus = Literal["placing", "loading", "ready", "failed", "stopping"]
REPLICA_STATUSES: tuple[str, ...] = ("placing", "loading", "ready", "failed", "stopping")

# Names and uids are subject tokens capped at 128 characters (broker_client's NAME_PATTERN).
NAME_LENGTH = 128


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no time zone type and hands back naive values; storing UTC and re-attaching the
    zone on the way out keeps comparisons between rows and ``utcnow()`` valid everywhere.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the registry stores timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Registration(Base):
    """A registered custom model definition (the validated JSON, normalised)."""

    __tablename__ = "registrations"
    __table_args__ = (UniqueConstraint("model_type", "model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_type: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    definition: Mapped[dict[str, Any]]
    # False: dropped when the registry starts again, as Xinference does with persist=False.
    persist: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelRow(Base):
    """One launched model uid. The definition is copied so that unregistering a running
    model's definition does not change what describe reports about it, and the launch options
    a replica is created with are kept so that a replica re-placed after its worker died is
    created the same way (``launcher.LaunchPlan.from_row``)."""

    __tablename__ = "models"
    __table_args__ = (CheckConstraint(f"status IN ({_quoted(MODEL_STATUSES)})", name="status"),)

    model_uid: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model_type: Mapped[str] = mapped_column(String(32))
    definition: Mapped[dict[str, Any]]
    spec: Mapped[dict[str, Any]]
    quantization: Mapped[str] = mapped_column(String(16))
    replica: Mapped[int] = mapped_column(Integer)
    request_limits: Mapped[int | None] = mapped_column(Integer)
    max_batch_size: Mapped[int | None] = mapped_column(Integer)
    # The launch limits (revision 0002): the largest max_tokens a request may ask for, and
    # requests per second, per replica.
    max_tokens_limit: Mapped[int | None] = mapped_column(Integer)
    rate_limit: Mapped[float | None] = mapped_column(Float)
    # On demand (revision 0003): the replicas kept while idle and the seconds a replica may go
    # without a request before it is stopped; None for both: a model that never scales.
    min_replicas: Mapped[int | None] = mapped_column(Integer)
    idle_timeout: Mapped[float | None] = mapped_column(Float)
    # The placement the launch asked for (revision 0004), which a start on demand places by:
    # its pinned worker (None: any) and GPU count per replica (None: "auto"; 0: no GPU).
    launch_worker_id: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    launch_n_gpu: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="launching")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    replicas: Mapped[list[ReplicaRow]] = relationship(
        back_populates="model",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ReplicaRow.replica_index",
        lazy="selectin",
    )


class ReplicaRow(Base):
    __tablename__ = "replicas"
    __table_args__ = (
        UniqueConstraint("model_uid", "replica_index"),
        CheckConstraint(f"status IN ({_quoted(REPLICA_STATUSES)})", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_uid: Mapped[str] = mapped_column(
        String(NAME_LENGTH), ForeignKey("models.model_uid", ondelete="CASCADE"), index=True
    )
    replica_index: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    device: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="placing")
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    model: Mapped[ModelRow] = relationship(back_populates="replicas")


class WorkerRow(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    info: Mapped[dict[str, Any]]
    last_seen: Mapped[datetime]
