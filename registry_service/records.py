"""The ``workers`` table, written behind the heartbeats: a record of each worker for operators.

The registry's live view of workers is the directory in memory (``directory.py``); this table
only keeps each worker's last heartbeat. The write is off the heartbeat path: a slow database
must not delay heartbeats and make live workers look dead. Heartbeats that arrive while a write
is under way replace each other, per worker, so only the latest one is written.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from .directory import WorkerEntry
from .repository import RegistryRepository

__all__ = ["WorkerRecords"]

logger = logging.getLogger(__name__)


class WorkerRecords:
    """Writes the last heartbeat of each worker to ``repository``, one writer task at a time."""

    def __init__(self, repository: RegistryRepository) -> None:
        self.repo = repository
        self._pending: dict[str, WorkerEntry] = {}
        self._writer: asyncio.Task[None] | None = None

    def note(self, entry: WorkerEntry) -> None:
        """Have ``entry`` written soon; returns at once."""
        self._pending[entry.info.worker_id] = entry
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="natserve-registry workers")

    async def _write(self) -> None:
        while self._pending:
            worker_id, entry = self._pending.popitem()
            try:
                await self.repo.upsert_worker(
                    worker_id,
                    entry.info.host,
                    entry.info.model_dump(mode="json"),
                    datetime.fromtimestamp(entry.seen_at, UTC),
                )
            except Exception:
                logger.warning("cannot record worker %s in the database", worker_id, exc_info=True)

    async def stop(self) -> None:
        """Let the write under way finish (for at most 5 s)."""
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=5)
