"""Data access for the registry: one short session per operation.

No session is held across a NATS round trip, so a slow worker never keeps a connection (or,
on SQLite, the single writer slot) busy. Rows come back detached and fully loaded
(``expire_on_commit=False``, replicas loaded eagerly), ready to be turned into replies.
Uniqueness is enforced by the database; an ``IntegrityError`` becomes a 409 ``Conflict``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from broker_client import Conflict

from .models import ModelRow, Registration, ReplicaRow, WorkerRow, utcnow

__all__ = ["NewReplica", "RegistryRepository"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewReplica:
    replica_index: int
    worker_id: str
    device: str | None = None


class RegistryRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self._sessions()

    # ------------------------------------------------------------------ registrations

    async def add_registration(
        self, model_type: str, model_name: str, definition: dict[str, Any], persist: bool
    ) -> Registration:
        row = Registration(
            model_type=model_type, model_name=model_name, definition=definition, persist=persist
        )
        async with self.session() as session:
            session.add(row)
            try:
                await session.commit()
            except IntegrityError as exc:
                raise Conflict(
                    f"model_name {model_name!r} is already registered for model_type {model_type!r}; "
                    "unregister it first"
                ) from exc
        return row

    async def get_registration(self, model_type: str, model_name: str) -> Registration | None:
        async with self.session() as session:
            return await session.scalar(
                select(Registration).where(
                    Registration.model_type == model_type, Registration.model_name == model_name
                )
            )

    async def find_registrations(self, model_name: str) -> Sequence[Registration]:
        """Every registration of ``model_name``, whatever its type."""
        async with self.session() as session:
            result = await session.scalars(
                select(Registration)
                .where(Registration.model_name == model_name)
                .order_by(Registration.model_type)
            )
            return result.all()

    async def list_registrations(self, model_type: str | None = None) -> Sequence[Registration]:
        stmt = select(Registration).order_by(Registration.model_type, Registration.model_name)
        if model_type is not None:
            stmt = stmt.where(Registration.model_type == model_type)
        async with self.session() as session:
            return (await session.scalars(stmt)).all()

    async def delete_registration(self, model_type: str, model_name: str) -> bool:
        async with self.session() as session:
            result = await session.execute(
                delete(Registration).where(
                    Registration.model_type == model_type, Registration.model_name == model_name
                )
            )
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def delete_transient_registrations(self) -> int:
        """Drop every registration made with ``persist=False``; returns how many."""
        async with self.session() as session:
            result = await session.execute(delete(Registration).where(Registration.persist.is_(False)))
            await session.commit()
            return int(getattr(result, "rowcount", 0) or 0)

    # ------------------------------------------------------------------ models

    async def create_model(self, model: ModelRow, replicas: Iterable[NewReplica]) -> ModelRow:
        """Insert a model and its replicas in one transaction; 409 when the uid exists."""
        model.replicas = [
            ReplicaRow(
                replica_index=r.replica_index,
                worker_id=r.worker_id,
                device=r.device,
                status="placing",
                memory_bytes=0,
            )
            for r in replicas
        ]
        async with self.session() as session:
            session.add(model)
            try:
                await session.commit()
            except IntegrityError as exc:
                raise Conflict(f"model_uid {model.model_uid!r} is already running") from exc
        return model

    async def get_model(self, model_uid: str) -> ModelRow | None:
        async with self.session() as session:
            return await session.get(ModelRow, model_uid)

    async def list_models(self) -> Sequence[ModelRow]:
        async with self.session() as session:
            return (await session.scalars(select(ModelRow).order_by(ModelRow.created_at))).all()

    async def set_model_status(self, model_uid: str, status: str, error: str | None = None) -> bool:
        async with self.session() as session:
            result = await session.execute(
                update(ModelRow)
                .where(ModelRow.model_uid == model_uid)
                .values(status=status, error=error, updated_at=utcnow())
            )
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def update_replica(self, model_uid: str, replica_index: int, **values: Any) -> bool:
        async with self.session() as session:
            result = await session.execute(
                update(ReplicaRow)
                .where(ReplicaRow.model_uid == model_uid, ReplicaRow.replica_index == replica_index)
                .values(**values)
            )
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def move_replica(
        self,
        model_uid: str,
        replica_index: int,
        *,
        from_worker: str,
        to_worker: str,
        device: str | None,
    ) -> bool:
        """Re-place a lost replica: one compare-and-set, so that when several registries see
        the same worker die exactly one of them (True) launches its replicas again."""
        async with self.session() as session:
            result = await session.execute(
                update(ReplicaRow)
                .where(
                    ReplicaRow.model_uid == model_uid,
                    ReplicaRow.replica_index == replica_index,
                    ReplicaRow.worker_id == from_worker,
                )
                .values(worker_id=to_worker, device=device, status="placing", memory_bytes=0, error=None)
            )
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def fail_replica(self, model_uid: str, replica_index: int, *, worker_id: str, error: str) -> bool:
        """Mark a replica failed, if it is still recorded on ``worker_id`` and not failed yet."""
        async with self.session() as session:
            result = await session.execute(
                update(ReplicaRow)
                .where(
                    ReplicaRow.model_uid == model_uid,
                    ReplicaRow.replica_index == replica_index,
                    ReplicaRow.worker_id == worker_id,
                    ReplicaRow.status != "failed",
                )
                .values(status="failed", error=error)
            )
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def add_replicas(self, model_uid: str, replicas: Iterable[NewReplica]) -> None:
        """Record new replicas of a model (a start on demand), ``placing``, in one transaction;
        409 when one of their indexes is taken (another registry is starting it)."""
        async with self.session() as session:
            session.add_all(
                ReplicaRow(
                    model_uid=model_uid,
                    replica_index=r.replica_index,
                    worker_id=r.worker_id,
                    device=r.device,
                    status="placing",
                    memory_bytes=0,
                )
                for r in replicas
            )
            try:
                await session.commit()
            except IntegrityError as exc:
                raise Conflict(f"replicas of model_uid {model_uid!r} are already being started") from exc

    async def delete_replica(
        self, model_uid: str, replica_index: int, *, worker_id: str | None = None
    ) -> bool:
        """Forget one replica (stopped for idleness, or a start on demand that failed); with
        ``worker_id``, only if it is still recorded there."""
        stmt = delete(ReplicaRow).where(
            ReplicaRow.model_uid == model_uid, ReplicaRow.replica_index == replica_index
        )
        if worker_id is not None:
            stmt = stmt.where(ReplicaRow.worker_id == worker_id)
        async with self.session() as session:
            result = await session.execute(stmt)
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    async def delete_model(self, model_uid: str) -> bool:
        """Delete a model; its replicas go with it (ON DELETE CASCADE)."""
        async with self.session() as session:
            result = await session.execute(delete(ModelRow).where(ModelRow.model_uid == model_uid))
            await session.commit()
            return bool(getattr(result, "rowcount", 0))

    # ------------------------------------------------------------------ workers

    async def upsert_worker(
        self, worker_id: str, host: str, info: dict[str, Any], last_seen: datetime
    ) -> None:
        values = {"worker_id": worker_id, "host": host, "info": info, "last_seen": last_seen}
        dialect = self.engine.dialect.name
        async with self.session() as session:
            if dialect in ("postgresql", "sqlite"):
                # One atomic statement: two registries beating on one row cannot collide.
                insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(WorkerRow)
                stmt = insert.values(**values)
                excluded = stmt.excluded
                await session.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[WorkerRow.worker_id],
                        set_={"host": excluded.host, "info": excluded.info, "last_seen": excluded.last_seen},
                    )
                )
            else:
                await session.merge(WorkerRow(**values))
            await session.commit()

    async def list_workers(self) -> Sequence[WorkerRow]:
        async with self.session() as session:
            return (await session.scalars(select(WorkerRow).order_by(WorkerRow.worker_id))).all()
