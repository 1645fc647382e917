"""Worker liveness and the replicas it affects: dead workers, lost replicas, orphans.

Which workers are alive, and the dead window that decides it, is the worker directory
(``directory.py``). Every ``interval`` (at most 1 s) :class:`Liveness` runs one pass over it:

* **Worker states.** Each change of a worker's state (``alive``, ``dead``, ``stopped``) is
  published on ``<prefix>.workers.events`` (``events.py``). Clients end the requests that worker
  had accepted with a 503 when it turns dead or stopped (the client's model handles); the
  registry ends its own commands in flight to it (a launch waiting on a dead worker fails at
  once).
* **Lost replicas.** A replica recorded on a worker that is dead, stopped, or (after the
  registry's start-up window) unknown, or on a live worker that has not reported it for one
  dead window, is lost. It is re-placed: placed again (``placement.py``, never on the worker it
  was lost on, and on a worker that holds none of the model's other replicas when one has room)
  and launched there from the model's row, with the options of its launch
  (``plan.py``, ``launcher.py``), with ``placing``/``loading``/``ready`` events; when nothing
  has room it is marked ``failed`` with the reason (``describe`` shows it), and a model whose
  replicas all failed is ``failed`` too. Failed replicas are tried again when a worker joins.
  The database row moves with one compare-and-set (``RegistryRepository.move_replica``), so
  when several registries see the same death exactly one re-places each replica.
* **Adoption.** A replica the database still has as loading (its registry was restarted or
  died mid-launch) that its worker reports ready is recorded ready.
* **Orphans.** A replica a live worker reports that the database does not have on that worker
  (a launch whose registry died, a replica moved elsewhere while its worker was cut off) is
  terminated on that worker after one dead window, so that nothing keeps memory for nobody.

Models still ``launching`` or ``terminating`` are left to the request that is doing it; those
left over by a registry that died are removed by the start-up reconcile
(``Launcher.reconcile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable

from broker_client import NatserveError, NotFound, Unavailable
from broker_client.runtime import NATSConnection

from .directory import WorkerDirectory
from .events import RegistryEvents
from .launcher import Launcher
from .models import ModelRow, ReplicaRow
from .placement import Placement
from .plan import LaunchPlan
from .repository import RegistryRepository

__all__ = ["Liveness"]

logger = logging.getLogger(__name__)


class Liveness:
    """The registry's periodic pass over workers and replicas (see the module docstring)."""

    def __init__(
        self,
        nc: NATSConnection,
        directory: WorkerDirectory,
        launcher: Launcher,
        repository: RegistryRepository,
        events: RegistryEvents,
        *,
        interval: float | None = None,
    ) -> None:
        self.nc = nc
        self.directory = directory
        self.launcher = launcher
        self.repo = repository
        self.events = events
        self.interval = interval
        # The state last published for each worker.
        self._states: dict[str, str] = {}
        self._armed_at = float("inf")
        self._missing: dict[tuple[str, int], float] = {}
        self._orphans: dict[tuple[str, str, int], float] = {}
        self._orphan_sent: dict[tuple[str, str, int], float] = {}
        self._relaunching: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._retry_failed = False
        self._reconnects = 0
        self._blind_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, judge_after: float) -> None:
        """Start the passes; replicas are judged only ``judge_after`` seconds from now, once
        the workers have had the time to answer the registry's resync."""
        self._armed_at = time.monotonic() + judge_after
        self._task = asyncio.create_task(self._run(), name="natserve-registry liveness")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._relaunching.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self._task = None

    def wake(self) -> None:
        """Run a pass now (a heartbeat changed a worker's state)."""
        self._wake.set()

    def _interval(self) -> float:
        if self.interval is not None:
            return self.interval
        return max(0.05, min(1.0, self.directory.grace() / 4))

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("liveness pass failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval()):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        nc = self.nc
        now = time.monotonic()
        reconnects = nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            # We were cut off from NATS, so the heartbeats we missed say nothing about the
            # workers: judge nobody until they have had one dead window to beat again.
            grace = self.directory.grace()
            self._reconnects = reconnects
            self._blind_until = now + grace
            logger.info("reconnected to NATS: judging workers again in %.1f s", grace)
        if not nc.is_connected or now < self._blind_until:
            return
        await self._workers_pass()
        if now >= self._armed_at:
            await self._replicas_pass()

    # ------------------------------------------------------------------ workers

    async def _workers_pass(self) -> None:
        directory = self.directory
        now = time.monotonic()
        for entry in directory.entries():
            worker_id = entry.info.worker_id
            state = directory.state_of(worker_id, now)
            if state == "stopping":
                state = "alive"  # still serving what it has; placement already skips it
            previous = self._states.get(worker_id)
            if state == previous:
                continue
            self._states[worker_id] = state
            dead_after = directory.window(entry.info)
            if state in ("dead", "stopped"):
                why = f"no heartbeat for {dead_after:g} s" if state == "dead" else "it stopped"
                logger.warning("worker %s on %s is %s (%s)", worker_id, entry.info.host, state, why)
                self.launcher.worker_gone(worker_id, f"worker {worker_id!r} is {state} ({why})")
            else:
                # A worker joined (or came back): failed replicas may fit now.
                self._retry_failed = True
            await self.events.worker(entry.info, state, entry.seen_at, dead_after)

    # ------------------------------------------------------------------ replicas

    def _reported(self) -> dict[tuple[str, int, str], str]:
        """(uid, replica_index, worker_id) -> replica status, from the workers alive now."""
        reported: dict[tuple[str, int, str], str] = {}
        for entry in self.directory.entries():
            worker_id = entry.info.worker_id
            if self.directory.state_of(worker_id) not in ("alive", "stopping"):
                continue
            for r in entry.info.replicas:
                reported[(r.model_uid, r.replica_index, worker_id)] = r.status
        return reported

    async def _replicas_pass(self) -> None:
        rows = await self.repo.list_models()
        reported = self._reported()
        now = time.monotonic()
        retry_failed, self._retry_failed = self._retry_failed, False
        grace = self.directory.grace()
        seen_missing: set[tuple[str, int]] = set()
        for row in rows:
            if row.status in ("launching", "terminating") or self.launcher.launching(row.model_uid):
                continue
            # Where the model's replicas are, as this pass moves them: a re-placed replica goes
            # where its siblings are not.
            where = {r.replica_index: r.worker_id for r in row.replicas if r.status != "failed"}
            for r in row.replicas:
                key = (row.model_uid, r.replica_index)
                if key in self._relaunching:
                    continue
                status = reported.get((row.model_uid, r.replica_index, r.worker_id))
                if status is not None:
                    # Its worker has it: a worker that was only cut off for a while (a failed
                    # replica comes back), or a launch whose registry died (adopted as ready).
                    if status == "ready" and r.status != "ready":
                        await self._adopt(row, r)
                    continue
                if r.status == "failed":
                    if retry_failed:
                        await self._replace(row, r, r.error or "failed", where)
                    continue
                state = self.directory.state_of(r.worker_id, now)
                if state in ("dead", "stopped", "unknown"):
                    reason = {
                        "dead": f"worker {r.worker_id!r} died (no heartbeat for {grace:g} s)",
                        "stopped": f"worker {r.worker_id!r} stopped",
                        "unknown": f"worker {r.worker_id!r} has not been heard from",
                    }[state]
                    await self._replace(row, r, reason, where)
                    continue
                seen_missing.add(key)
                first = self._missing.setdefault(key, now)
                if now - first >= grace:
                    await self._replace(row, r, f"worker {r.worker_id!r} no longer reports it", where)
        self._missing = {k: v for k, v in self._missing.items() if k in seen_missing}
        await self._orphans_pass(rows, reported, now, grace)

    async def _adopt(self, row: ModelRow, r: ReplicaRow) -> None:
        await self.repo.update_replica(row.model_uid, r.replica_index, status="ready", error=None)
        await self._refresh_model_status(row.model_uid)
        logger.info("replica %d of %r on %s is ready (adopted)", r.replica_index, row.model_uid, r.worker_id)

    async def _replace(self, row: ModelRow, r: ReplicaRow, reason: str, where: dict[int, str]) -> None:
        """Place a lost replica elsewhere and launch it there, or mark it failed; ``where`` (the
        worker of each of the model's replicas) follows."""
        uid, index = row.model_uid, r.replica_index
        self._missing.pop((uid, index), None)
        plan = self.launcher.plan_of(row)
        siblings = Counter(worker for i, worker in where.items() if i != index)
        try:
            [placement] = self.launcher.place(
                plan,
                1,
                n_gpu=0 if r.device == "cpu" else "auto",
                # A dead or stopped worker is not a candidate anyway; a live one that lost the
                # replica (restarted under the same id) may take it again.
                what=repr(uid),
                first_index=index,
                siblings=siblings,
            )
        except (Unavailable, NotFound) as exc:
            where.pop(index, None)
            if r.status == "failed":
                return  # still nowhere to go; it stays failed with its first reason
            error = f"{reason}; {exc.message}"
            if await self.repo.fail_replica(uid, index, worker_id=r.worker_id, error=error):
                logger.warning("replica %d of %r is lost: %s", index, uid, error)
                await self._announce_failed(uid, row.model_name, index, r.worker_id, error)
            return
        moved = await self.repo.move_replica(
            uid, index, from_worker=r.worker_id, to_worker=placement.worker_id, device=placement.device
        )
        if not moved:
            return  # another registry re-placed it first
        where[index] = placement.worker_id
        logger.warning("replica %d of %r: %s; re-placing it on %s", index, uid, reason, placement.worker_id)
        self.launcher.memory.reserve([placement])
        task = asyncio.create_task(
            self._relaunch(plan, placement, reason), name=f"natserve-registry relaunch {uid}[{index}]"
        )
        self._relaunching[(uid, index)] = task

    async def _relaunch(self, plan: LaunchPlan, placement: Placement, reason: str) -> None:
        uid, index = plan.model_uid, placement.replica_index
        try:
            await self.events.model(
                uid,
                "placing",
                model_name=plan.model_name,
                replica_index=index,
                worker_id=placement.worker_id,
                status="ready",
                message=f"{reason}: replica {index} re-placed on worker {placement.worker_id}",
            )
            await self.launcher.launch_replica(plan, placement)
            await self._refresh_model_status(uid)
            logger.info("replica %d of %r is ready again on %s", index, uid, placement.worker_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if await self.repo.get_model(uid) is None:
                return  # terminated meanwhile: its terminate told the worker already
            message = exc.message if isinstance(exc, NatserveError) else f"{type(exc).__name__}: {exc}"
            error = f"{reason}; re-placing it on worker {placement.worker_id!r} failed: {message}"
            logger.warning("replica %d of %r: %s", index, uid, error)
            await self.repo.fail_replica(uid, index, worker_id=placement.worker_id, error=error)
            await self.launcher.terminate_replica(placement.worker_id, uid, index)
            await self._announce_failed(uid, plan.model_name, index, placement.worker_id, error)
        finally:
            self.launcher.memory.release([placement])
            self._relaunching.pop((uid, index), None)

    async def _announce_failed(
        self, uid: str, model_name: str, index: int, worker_id: str | None, error: str
    ) -> None:
        """Tell subscribers a replica failed, and let the model's status follow."""
        await self.events.model(
            uid,
            "failed",
            model_name=model_name,
            replica_index=index,
            worker_id=worker_id,
            status="failed",
            message=error,
        )
        await self._refresh_model_status(uid)

    async def _refresh_model_status(self, uid: str) -> None:
        """``ready`` while one replica is, ``failed`` (with the reasons) when none is left."""
        row = await self.repo.get_model(uid)
        if row is None or row.status in ("launching", "terminating") or not row.replicas:
            return  # no replica at all: a model scaled to zero, which is ready
        if any(r.status != "failed" for r in row.replicas):
            if row.status != "ready":
                await self.repo.set_model_status(uid, "ready")
            return
        if row.status != "failed":
            reasons = "; ".join(f"replica {r.replica_index}: {r.error}" for r in row.replicas)
            await self.repo.set_model_status(uid, "failed", error=reasons)
            await self.events.model(
                uid, "failed", model_name=row.model_name, status="failed", message=reasons
            )

    # ------------------------------------------------------------------ orphans

    async def _orphans_pass(
        self,
        rows: Iterable[ModelRow],
        reported: dict[tuple[str, int, str], str],
        now: float,
        grace: float,
    ) -> None:
        owners = {(row.model_uid, r.replica_index): r.worker_id for row in rows for r in row.replicas}
        suspects: set[tuple[str, str, int]] = set()
        for uid, index, worker_id in reported:
            if owners.get((uid, index)) == worker_id:
                continue
            if self.launcher.launching(uid) or (uid, index) in self._relaunching:
                continue
            key = (worker_id, uid, index)
            suspects.add(key)
            first = self._orphans.setdefault(key, now)
            if now - first < grace or now - self._orphan_sent.get(key, -1e9) < 10 * grace:
                continue
            self._orphan_sent[key] = now
            logger.warning(
                "worker %s reports replica %d of model %r, which the registry does not know "
                "(not in its database on that worker): terminating it",
                worker_id,
                index,
                uid,
            )
            await self.launcher.terminate_replica(worker_id, uid, index)
        self._orphans = {k: v for k, v in self._orphans.items() if k in suspects}
        self._orphan_sent = {k: v for k, v in self._orphan_sent.items() if k in suspects}
