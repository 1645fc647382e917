"""The worker directory: every worker heard from, its last heartbeat, and who is alive.

In memory only (no SQL, no NATS): what the registry knows of workers comes from their heartbeats,
each of which :meth:`WorkerDirectory.heard` records. Workers publish one every
``heartbeat_interval`` (2 s by default); the registry declares a worker **dead** when it has
heard nothing from it for the *dead window*:

    dead_after = max(6 s, 3 x the worker's heartbeat interval)     (NATSERVE_DEAD_AFTER sets it)

so three missed beats in a row, and never less than 6 s. A worker that stops cleanly (SIGTERM)
says so in its last heartbeat and is **stopped** at once, without waiting for the window.

Times are ``time.monotonic()``, immune to clock jumps and to the skew between machines; the wall
clock of the same moment is kept for display only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from broker_client import WorkerInfo

from .placement import worker_state

__all__ = ["MIN_DEAD_AFTER", "WorkerDirectory", "WorkerEntry"]

logger = logging.getLogger(__name__)

# The shortest dead window, and the grace before any worker has beaten.
MIN_DEAD_AFTER = 6.0


@dataclass
class WorkerEntry:
    """One worker's last heartbeat."""

    info: WorkerInfo
    received: float  # time.monotonic() of the last heartbeat: immune to clock jumps and skew
    seen_at: float  # wall clock of the same moment, for display


class WorkerDirectory:
    """The workers heard from; ``dead_after`` overrides every worker's own dead window."""

    def __init__(self, dead_after: float | None = None) -> None:
        self.dead_after = dead_after
        self._workers: dict[str, WorkerEntry] = {}
        # Until then (monotonic), a registry that has heard no worker yet may still hear from
        # the ones that answer its resync: see first_workers().
        self._settle_until = 0.0
        self._first = asyncio.Event()
        # Set (and replaced) on every heartbeat: what heard_since waits on.
        self._beat = asyncio.Event()

    def settle(self, window: float) -> None:
        """Workers are expected to answer a resync within ``window`` seconds from now."""
        self._settle_until = time.monotonic() + window

    async def first_workers(self) -> bool:
        """While no worker has been heard yet and the resync window is open, wait for the
        first heartbeat (at most the rest of the window). Whether one came meanwhile.

        A worker that starts together with the registry may send its first heartbeat before
        the registry listens and answer no resync it subscribed to too late; its next beat
        comes one interval later. A launch sent in that gap waits for it instead of failing."""
        if self._workers:
            return False
        remaining = self._settle_until - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self._first.wait(), remaining)
        except TimeoutError:
            return False
        return True

    async def heard_since(self, worker_id: str, since: float, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for a heartbeat of ``worker_id`` received after
        ``since`` (monotonic); whether one came."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self._workers.get(worker_id)
            if entry is not None and entry.received > since:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._beat.wait(), remaining)
            except TimeoutError:
                return False

    async def next_beat(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for the next heartbeat of any worker."""
        try:
            await asyncio.wait_for(self._beat.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def window(self, info: WorkerInfo) -> float:
        """The dead window of the worker that sent ``info``."""
        if self.dead_after is not None:
            return self.dead_after
        return max(MIN_DEAD_AFTER, 3 * info.heartbeat_interval)

    def grace(self) -> float:
        """One dead window: how long a replica may go unreported before it counts as lost."""
        if self.dead_after is not None:
            return self.dead_after
        return max((self.window(w.info) for w in self._workers.values()), default=MIN_DEAD_AFTER)

    def is_alive(self, entry: WorkerEntry, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - entry.received <= self.window(entry.info)

    def is_worker_alive(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and self.is_alive(entry)

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def ids(self) -> list[str]:
        """Every worker id heard from, alive or not (to tell a dead worker from one never seen)."""
        return list(self._workers)

    def entries(self) -> list[WorkerEntry]:
        """Every worker heard from, in the order they were first heard."""
        return list(self._workers.values())

    def alive(self) -> list[WorkerInfo]:
        """The last heartbeats of the workers alive now."""
        now = time.monotonic()
        return [w.info for w in self._workers.values() if self.is_alive(w, now)]

    def state_of(self, worker_id: str, now: float | None = None) -> str:
        """``alive``, ``stopping``, ``stopped``, ``dead`` or ``unknown`` (never heard of)."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return "unknown"
        said = worker_state(entry.info)
        if said == "stopped":
            return "stopped"
        if not self.is_alive(entry, now):
            return "dead"
        return "stopping" if said == "stopping" else "alive"

    def heard(self, info: WorkerInfo) -> tuple[WorkerEntry, bool]:
        """Record a heartbeat. Returns its entry, and True when the worker joined or its
        heartbeat says another state (stopping, stopped) than the last one: liveness should look."""
        previous = self._workers.get(info.worker_id)
        entry = WorkerEntry(info=info, received=time.monotonic(), seen_at=time.time())
        if previous is None or not self.is_alive(previous, entry.received):
            logger.info(
                "worker %s on %s is alive (%s)",
                info.worker_id,
                info.host,
                ", ".join(d.name for d in info.devices) or "no devices",
            )
        self._workers[info.worker_id] = entry
        self._first.set()
        beat, self._beat = self._beat, asyncio.Event()
        beat.set()
        changed = previous is None or worker_state(previous.info) != worker_state(info)
        return entry, changed
