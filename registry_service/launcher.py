"""The launcher: placing a model's replicas, asking workers to load and drop them, aborting.

A launch (:meth:`Launcher.start`) finds the registration, makes a :class:`~.plan.LaunchPlan`,
estimates what one replica needs (``memory.py``) and places the replicas on devices with room
(``placement.py``); when none has room it fails at once with a 503 naming the need and the most
free memory seen. It records the model and its replicas as ``launching`` (the uid is claimed by
its primary key before anything is launched, so concurrent launches of one uid load it once),
asks each worker over ``worker.<id>.launch`` in parallel and waits for all of them. If any
fails, the others are told to terminate, the rows are deleted and the worker's error goes back
to the caller with its class and message: nothing is left half-launched. Progress goes out as
model events (``events.py``).

Liveness re-places a lost replica through the same plan, built from the model's row
(:meth:`Launcher.plan_of`), the same placement (:meth:`Launcher.place`) and the same command
(:meth:`Launcher.launch_replica`).

Reconcile on start (:meth:`Launcher.reconcile`): a model a previous run left ``launching`` or
``terminating`` is removed, its stray replicas told to terminate. Running models are left to
``liveness.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Protocol

from pydantic import ValidationError

from broker_client import (
    BadRequest,
    Conflict,
    InternalError,
    LaunchRequest,
    NatserveError,
    NoResponders,
    NotFound,
    RequestTimeout,
    ServerTimeout,
    Subjects,
    TransportError,
    Unavailable,
    WorkerLaunchReply,
    WorkerTerminate,
)
from broker_client.runtime import NatsTransport

from .directory import WorkerDirectory
from .events import RegistryEvents
from .metrics import RegistryMetrics
from .models import ModelRow, Registration
from .placement import MemoryReservations, Placement, place_replicas
from .plan import LaunchPlan
from .repository import NewReplica, RegistryRepository

__all__ = ["DEFAULT_LAUNCH_TIMEOUT", "Launcher", "ScalingHooks"]

logger = logging.getLogger(__name__)

DEFAULT_LAUNCH_TIMEOUT = 600.0
# Failed launches remembered so that describe can say why a uid is gone.
_FAILURES_KEPT = 256
_FAILURE_CHARS = 4000


class ScalingHooks(Protocol):
    """What the launcher tells the on-demand part of the registry (``ondemand/``), and asks it."""

    async def scaled_to_zero(self, uid: str) -> None:
        """``uid`` has no replica now: answer its subjects (before its launch says ready)."""

    async def terminated(self, uid: str) -> None:
        """``uid`` was terminated: the requests held for it get an error."""

    async def make_room(
        self, plan: LaunchPlan, replica: int, *, worker_id: str | None, n_gpu: int | str | None
    ) -> bool:
        """Stop idle on-demand replicas so that ``replica`` replicas of ``plan`` fit; whether
        any was stopped (then placing again may succeed)."""


class Launcher:
    """Launches and terminations of models, and the commands they send to workers.

    What only this process knows is kept here: uids being launched, the launch tasks in
    flight, the memory promised to replicas still loading and the recent failures."""

    def __init__(
        self,
        repository: RegistryRepository,
        directory: WorkerDirectory,
        transport: NatsTransport,
        subjects: Subjects,
        events: RegistryEvents,
        metrics: RegistryMetrics,
        *,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
        terminate_timeout: float = 30.0,
    ) -> None:
        self.repo = repository
        self.directory = directory
        self.transport = transport
        self.subjects = subjects
        self.events = events
        self.metrics = metrics
        self.launch_timeout = launch_timeout
        self.terminate_timeout = terminate_timeout
        # Until a replica is loaded, its worker's heartbeats do not show the memory it takes.
        self.memory = MemoryReservations()
        self._reserved: set[str] = set()
        self._launches: dict[str, asyncio.Task[None]] = {}
        self._failures: OrderedDict[str, str] = OrderedDict()
        # The on-demand part (set by the service): starts from zero, idle stops, eviction.
        self.scaling: ScalingHooks | None = None

    # ------------------------------------------------------------------ state

    def launching(self, uid: str) -> bool:
        """Whether this process is launching ``uid`` now (its rows are the launch's to change)."""
        return uid in self._reserved or uid in self._launches

    def launches_in_flight(self) -> int:
        return len(self._launches)

    def not_running(self, uid: str) -> NotFound:
        """The 404 for ``uid``, saying why when its launch failed recently."""
        failure = self._failures.get(uid)
        if failure is not None:
            return NotFound(f"model_uid {uid!r} is not running: its launch failed: {failure}")
        return NotFound(f"model_uid {uid!r} is not running")

    def _remember_failure(self, uid: str, message: str) -> None:
        # Kept for describe and status: bounded, as a worker's error message may be huge.
        message = message if len(message) <= _FAILURE_CHARS else message[:_FAILURE_CHARS] + " ..."
        self.metrics.note_failure(uid, message)
        failures = self._failures
        failures[uid] = message
        failures.move_to_end(uid)
        while len(failures) > _FAILURES_KEPT:
            failures.popitem(last=False)

    def worker_gone(self, worker_id: str, message: str) -> None:
        """End the commands in flight to a worker that died or stopped, with a 503 of ``message``."""

        def gone() -> Unavailable:
            return Unavailable(message)

        self.transport.fail_worker(worker_id, gone)

    async def stop(self) -> None:
        """Abort the launches in flight (their workers told to terminate) rather than leave them
        half-launched for the next run to clean up."""
        launches = list(self._launches.values())
        for task in launches:
            task.cancel()
        if launches:
            await asyncio.wait(launches, timeout=self.terminate_timeout + 5)

    # ------------------------------------------------------------------ plans and placement

    async def _registration(self, model_name: str, model_type: str | None) -> Registration:
        if model_type is not None:
            row = await self.repo.get_registration(model_type, model_name)
            if row is None:
                raise NotFound(
                    f"model_name {model_name!r} is not registered for model_type {model_type!r}; "
                    "register it first"
                )
            return row
        rows = await self.repo.find_registrations(model_name)
        if not rows:
            raise NotFound(f"model_name {model_name!r} is not registered; register it first")
        if len(rows) > 1:
            types = ", ".join(r.model_type for r in rows)
            raise BadRequest(
                f"model_name {model_name!r} is registered for several model types ({types}); give model_type"
            )
        return rows[0]

    def plan_of(self, row: ModelRow) -> LaunchPlan:
        """The plan of a launched model, from its row (to launch one of its replicas again)."""
        return LaunchPlan.from_row(row, timeout=self.launch_timeout)

    def place(
        self,
        plan: LaunchPlan,
        replica: int,
        *,
        worker_id: str | None = None,
        n_gpu: int | str | None = "auto",
        what: str,
        first_index: int = 0,
        siblings: Mapping[str, int] | None = None,
    ) -> list[Placement]:
        """Places ``replica`` replicas of ``plan`` on the live workers, counting the memory
        promised to replicas still loading and the model's replicas already placed
        (``siblings``, per worker); ``Unavailable`` or ``NotFound`` when it cannot."""
        if plan.spec.get("model_format") == "ggufv2":
            # The llama.cpp engine of GGUF models runs on the CPU (workers/engines/llama_cpp.py).
            n_gpu = 0
        return place_replicas(
            self.directory.alive(),
            replica,
            worker_id=worker_id,
            n_gpu=n_gpu,
            known=self.directory.ids(),
            need=plan.need,
            reserved=self.memory.snapshot(),
            what=what,
            first_index=first_index,
            siblings=siblings,
        )

    # ------------------------------------------------------------------ launch

    async def start(self, req: LaunchRequest) -> tuple[str, asyncio.Task[None]]:
        """Place and record the launch of ``req``, and start it; returns its uid and its task
        (the task ends when every replica is ready, or with the launch's error)."""
        registration = await self._registration(req.model_name, req.model_type)
        # A pool without a GPU serves GGUF files faster than checkpoints (llama.cpp on the CPU:
        # docs/benchmarks.md), so a definition with both runs its ggufv2 spec there unless the
        # launch names a format.
        no_gpu = req.n_gpu in (0, None) or not any(
            d.kind == "cuda" for w in self.directory.alive() for d in w.devices
        )
        plan = LaunchPlan.from_request(
            req, registration, timeout=self.launch_timeout, prefer_format="ggufv2" if no_gpu else None
        )
        uid = plan.model_uid
        # Requests run concurrently: the in-memory reservation closes the gap between the
        # check below and the insert; the primary key guards against other processes.
        if uid in self._reserved:
            raise Conflict(f"model_uid {uid!r} is already being launched")
        self._reserved.add(uid)
        try:
            if await self.repo.get_model(uid) is not None:
                raise Conflict(
                    f"model_uid {uid!r} is already running; terminate it first or give another model_uid"
                )
            # A model that starts on demand loads nothing now: its first request starts it.
            count = 0 if plan.starts_on_demand else req.replica
            placements = (
                await self._place_launch(plan, count, worker_id=req.worker_id, n_gpu=req.n_gpu)
                if count
                else []
            )
            await self.repo.create_model(
                plan.row("launching"),
                [NewReplica(p.replica_index, p.worker_id, p.device) for p in placements],
            )
        except BaseException:
            self._reserved.discard(uid)
            raise
        self._failures.pop(uid, None)
        logger.info(
            "launching %r as %r: %s",
            plan.model_name,
            uid,
            ", ".join(f"replica {p.replica_index} on {p.worker_id}" for p in placements),
        )
        # The launch runs in a task of its own so that terminate can cancel it and a
        # wait=False launch outlives its request.
        task = asyncio.create_task(self._run(plan, placements), name=f"natserve-registry launch {uid}")
        self._launches[uid] = task
        task.add_done_callback(lambda t: self._done(uid, t))
        self.memory.reserve(placements)
        task.add_done_callback(lambda t: self.memory.release(placements))
        self.metrics.track_launch(task)
        return uid, task

    async def _place_launch(
        self, plan: LaunchPlan, count: int, *, worker_id: str | None, n_gpu: int | str | None
    ) -> list[Placement]:
        """Place ``count`` replicas of ``plan``: after the first workers' heartbeats when none has
        been heard yet, after stopping idle on-demand replicas when they do not fit."""
        try:
            return self.place(plan, count, worker_id=worker_id, n_gpu=n_gpu, what=plan.label)
        except Unavailable:
            if await self.directory.first_workers():
                try:
                    return self.place(plan, count, worker_id=worker_id, n_gpu=n_gpu, what=plan.label)
                except Unavailable:
                    pass
            if self.scaling is None or not await self.scaling.make_room(
                plan, count, worker_id=worker_id, n_gpu=n_gpu
            ):
                raise
        return self.place(plan, count, worker_id=worker_id, n_gpu=n_gpu, what=plan.label)

    async def start_replicas(self, row: ModelRow, *, reason: str) -> None:
        """Start the replicas of a launched model that has none (a start on demand), with the
        options of its launch; returns once every one is ready, or raises the launch's error
        (its replicas are then removed again; the model stays, with none). They are placed as
        the launch asked: on its pinned worker, with its n_gpu (``LaunchPlan.from_row``)."""
        plan = self.plan_of(row)
        uid = plan.model_uid
        if uid in self._reserved:
            raise Conflict(f"model_uid {uid!r} is already being started")
        self._reserved.add(uid)
        try:
            placements = await self._place_launch(
                plan, plan.replica, worker_id=plan.launch_worker_id, n_gpu=plan.launch_n_gpu
            )
            await self.repo.add_replicas(
                uid, [NewReplica(p.replica_index, p.worker_id, p.device) for p in placements]
            )
        except BaseException:
            self._reserved.discard(uid)
            raise
        self._failures.pop(uid, None)
        logger.info(
            "starting %r (%s): %s",
            uid,
            reason,
            ", ".join(f"replica {p.replica_index} on {p.worker_id}" for p in placements),
        )
        task = asyncio.create_task(
            self._run(plan, placements, reason=reason), name=f"natserve-registry start {uid}"
        )
        self._launches[uid] = task
        task.add_done_callback(lambda t: self._done(uid, t))
        self.memory.reserve(placements)
        task.add_done_callback(lambda t: self.memory.release(placements))
        self.metrics.track_launch(task)
        await self.until_ready(uid, task)

    async def terminate_idle(self, worker_id: str, uid: str, index: int, if_idle_for: float) -> None:
        """Ask a worker to stop one replica if it has had no request for ``if_idle_for`` seconds;
        ``Conflict`` when it had one (it keeps running). A worker that does not have it is fine."""
        subject = self.subjects.worker(worker_id, "terminate")
        command = WorkerTerminate(model_uid=uid, replica_index=index, if_idle_for=if_idle_for)
        try:
            await self.transport.request(
                subject, command.model_dump(mode="json"), timeout=self.terminate_timeout, worker_id=worker_id
            )
        except NotFound:
            pass

    @staticmethod
    async def until_ready(uid: str, task: asyncio.Task[None]) -> None:
        """Wait for a launch started by :meth:`start`; raises its error."""
        await asyncio.wait([task])
        if task.cancelled():
            raise Conflict(f"launch of model_uid {uid!r} was cancelled: it was terminated while loading")
        error = task.exception()
        if error is not None:
            raise error

    def _done(self, uid: str, task: asyncio.Task[None]) -> None:
        if self._launches.get(uid) is task:
            del self._launches[uid]
        self._reserved.discard(uid)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so that a wait=False failure is not reported as never retrieved.
            logger.info("launch of %r failed: %s", uid, task.exception())

    async def _run(self, plan: LaunchPlan, placements: list[Placement], *, reason: str | None = None) -> None:
        """Launch ``placements``; ``reason`` is set for a start of a launched model (on demand),
        whose failure removes the replicas started and keeps the model."""
        uid = plan.model_uid
        if not placements:
            # Starts on demand: its subjects are answered by the registry before it is ready.
            if self.scaling is not None:
                await self.scaling.scaled_to_zero(uid)
            await self.repo.set_model_status(uid, "ready")
            logger.info("model %r is ready, scaled to zero: its first request starts it", uid)
            await self.events.model(
                uid,
                "ready",
                model_name=plan.model_name,
                status="ready",
                fraction=1.0,
                reason="scaled_to_zero",
                message="scaled to zero: its first request starts it",
            )
            return
        for p in placements:
            where = f" ({p.device})" if p.device else ""
            await self.events.model(
                uid,
                "placing",
                model_name=plan.model_name,
                replica_index=p.replica_index,
                worker_id=p.worker_id,
                status="launching",
                reason=reason,
                message=f"replica {p.replica_index} placed on worker {p.worker_id}{where}",
            )
        tasks = [
            asyncio.create_task(self.launch_replica(plan, p), name=f"launch {uid}[{p.replica_index}]")
            for p in placements
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:
                error = failed[0].exception()
                assert error is not None
                raise error
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._abort(plan, placements, exc, keep_model=reason is not None)
            raise
        if reason is None:
            # A start on demand finds its model ready already: one SQL write less before the
            # held requests are handed over (a commit is 10 to 40 ms on a loaded SQLite disk).
            await self.repo.set_model_status(uid, "ready")
        logger.info("model %r is ready (%d replica(s))", uid, len(placements))
        await self.events.model(
            uid,
            "ready",
            model_name=plan.model_name,
            status="ready",
            fraction=1.0,
            reason=reason,
            message=f"{len(placements)} replica(s) ready" + (f" ({reason})" if reason else ""),
        )

    async def launch_replica(self, plan: LaunchPlan, placement: Placement) -> None:
        """Ask ``placement``'s worker to load its replica of ``plan`` and record it ready."""
        uid, index, worker_id = plan.model_uid, placement.replica_index, placement.worker_id
        await self.repo.update_replica(uid, index, status="loading")
        await self.events.model(
            uid,
            "loading",
            model_name=plan.model_name,
            replica_index=index,
            worker_id=worker_id,
            status="launching",
            message=f"worker {worker_id} is loading replica {index}",
        )
        command = plan.command(placement)
        subject = self.subjects.worker(worker_id, "launch")
        try:
            raw = await self.transport.request(
                subject, command.model_dump(mode="json"), timeout=plan.timeout, worker_id=worker_id
            )
        except RequestTimeout as exc:
            raise ServerTimeout(
                f"worker {worker_id!r} did not load replica {index} of {uid!r} within {plan.timeout:g} s"
            ) from exc
        except NoResponders as exc:
            raise Unavailable(f"worker {worker_id!r} does not answer on {subject!r}: it has stopped") from exc
        except TransportError as exc:
            raise Unavailable(f"cannot reach worker {worker_id!r}: {exc}") from exc
        try:
            reply = WorkerLaunchReply.model_validate(raw)
        except ValidationError as exc:
            raise InternalError(
                f"worker {worker_id!r} sent an invalid launch reply for {uid!r}: {exc}"
            ) from exc
        await self.repo.update_replica(
            uid, index, status="ready", device=reply.device, memory_bytes=reply.memory_bytes, error=None
        )
        await self.events.model(
            uid,
            "ready",
            model_name=plan.model_name,
            replica_index=index,
            worker_id=worker_id,
            status="launching",
            message=f"replica {index} ready on {worker_id} ({reply.device})",
        )

    async def _abort(
        self, plan: LaunchPlan, placements: list[Placement], exc: BaseException, *, keep_model: bool = False
    ) -> None:
        uid = plan.model_uid
        if isinstance(exc, asyncio.CancelledError):
            message = f"launch of {uid!r} was cancelled"
        elif isinstance(exc, NatserveError):
            message = exc.message
        else:
            message = f"{type(exc).__name__}: {exc}"
        logger.warning("launch of %r failed, removing it: %s", uid, message)
        try:
            await self._terminate_on_workers(uid, {p.worker_id for p in placements})
            if keep_model:
                # A start on demand: the model stays, with no replica, for its next request.
                for p in placements:
                    await self.repo.delete_replica(uid, p.replica_index)
            else:
                await self.repo.delete_model(uid)
        except Exception:
            logger.error("cannot clean up the failed launch of %r", uid, exc_info=True)
        if not isinstance(exc, asyncio.CancelledError):
            self._remember_failure(uid, message)
        await self.events.model(
            uid,
            "failed",
            model_name=plan.model_name,
            status="ready" if keep_model else "failed",
            message=message,
        )

    # ------------------------------------------------------------------ terminate

    async def terminate(self, uid: str) -> None:
        """Terminate model ``uid`` everywhere (a launch in flight is cancelled); 404 when it is
        not running."""
        launch = self._launches.get(uid)
        if launch is not None:
            # Cancelling the launch tells its workers to terminate and removes the rows.
            launch.cancel()
            await asyncio.wait([launch], timeout=self.terminate_timeout + 5)
        row = await self.repo.get_model(uid)
        if row is None:
            if launch is not None:
                if self.scaling is not None:
                    await self.scaling.terminated(uid)
                await self.events.model(
                    uid, "terminated", status="terminated", message="terminated while loading"
                )
                return
            raise self.not_running(uid)
        await self.repo.set_model_status(uid, "terminating")
        await self._terminate_on_workers(uid, {r.worker_id for r in row.replicas})
        await self.repo.delete_model(uid)
        if self.scaling is not None:
            await self.scaling.terminated(uid)
        logger.info("terminated model %r", uid)
        await self.events.model(uid, "terminated", model_name=row.model_name, status="terminated")

    async def _terminate_on_workers(self, uid: str, worker_ids: Iterable[str]) -> None:
        """Ask each worker to drop its replicas of ``uid``; a dead or gone worker is tolerated."""

        async def one(worker_id: str) -> None:
            # A worker that stopped beating is most likely gone: do not wait long on it.
            timeout = self.terminate_timeout if self.directory.is_worker_alive(worker_id) else 2.0
            subject = self.subjects.worker(worker_id, "terminate")
            try:
                await self.transport.request(
                    subject, WorkerTerminate(model_uid=uid).model_dump(mode="json"), timeout=timeout
                )
            except NotFound:
                pass  # the worker holds nothing of it: already the wanted state
            except NatserveError as exc:
                logger.warning("worker %s did not confirm terminating %r: %s", worker_id, uid, exc)

        await asyncio.gather(*(one(w) for w in sorted(set(worker_ids))))

    async def terminate_replica(self, worker_id: str, uid: str, index: int) -> None:
        """Ask one worker to drop one replica; a worker that does not have it is fine."""
        subject = self.subjects.worker(worker_id, "terminate")
        command = WorkerTerminate(model_uid=uid, replica_index=index).model_dump(mode="json")
        try:
            await self.transport.request(subject, command, timeout=5.0, worker_id=worker_id)
        except NotFound:
            pass
        except NatserveError as exc:
            logger.warning("worker %s did not confirm terminating %r[%d]: %s", worker_id, uid, index, exc)

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, uids: Iterable[str]) -> None:
        """Check models of a previous run against what live workers report now."""
        reported: dict[tuple[str, int], str] = {}
        for info in self.directory.alive():
            for replica in info.replicas:
                reported[(replica.model_uid, replica.replica_index)] = info.worker_id
        for uid in sorted(uids):
            if self.launching(uid):
                continue
            row = await self.repo.get_model(uid)
            if row is None:
                continue
            if row.status in ("ready", "failed"):
                continue  # liveness.py keeps what workers report and re-places the rest
            reason = f"model {uid!r} was {row.status} when the registry stopped"
            logger.warning("removing %r: %s", uid, reason)
            await self._terminate_on_workers(uid, {w for (u, _), w in reported.items() if u == uid})
            await self.repo.delete_model(uid)
            self._remember_failure(uid, reason)
            await self.events.model(uid, "failed", model_name=row.model_name, status="failed", message=reason)
