"""The registry's NATS service: registrations, launches, running models and live workers.

Endpoints (``nats micro`` service ``natserve-registry``), subjects under the prefix:

    registry.register / unregister / list / get      custom-model registrations (SQL)
    models.launch / list / describe / terminate      running models and their replicas (SQL)
    workers.list                                     the workers' last heartbeats (memory)

Behaviours worth knowing:

* Registrations made with ``persist=False`` do not survive a restart: when the registry
  starts it deletes them (Xinference's semantics; ``persist=True`` ones stay). A registry
  restarted alone counts as a restart too; one that starts while another instance already
  serves the prefix (``$SRV.PING``) is joining it, and deletes nothing.
* Several instances may serve one prefix over one database: their endpoints share the default
  nats.micro queue group, each hears every heartbeat, and a uid is claimed by its primary key
  before anything is launched, so concurrent launches of one uid load it once.
* Workers publish ``WorkerInfo`` on ``workers.heartbeat``; a worker unseen for ``dead_after``
  seconds (default 3 heartbeat intervals, at least 6 s; the *dead window*) is dead: listed with
  ``alive: false`` and never chosen for a launch. On start the registry publishes on
  ``workers.resync`` so that workers beat at once instead of at their next interval. What
  follows from a death (notices on ``workers.events``, lost replicas re-placed or marked failed,
  orphans terminated) is ``liveness.py``.
* A launch estimates what one replica needs (``memory.py``) and places its replicas on devices
  with room (``placement.py``); when none has room it fails at once with a 503 naming the need
  and the most free memory seen. It records them as ``launching``, asks each
  worker over ``worker.<id>.launch`` in parallel and waits for all of them. If any fails the
  others are told to terminate, the rows are deleted and the worker's error goes back to the
  caller with its class and message: nothing is left half-launched. Progress goes out as
  ``ModelEvent``s on ``events.models.<uid>``; events about one replica carry
  ``replica_index``, the model-wide ones (``ready``, ``failed``, ``terminated``) do not and
  carry ``status``.
* Reconcile on start: after the resync window, a model a previous run left ``launching`` or
  ``terminating`` is removed (its stray replicas told to terminate) unless another registry
  instance is serving. Running models are left to ``liveness.py``: replicas their workers still
  report are kept as they are (no second load), lost ones are re-placed, and replicas workers
  report that the database does not know are terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from broker_client import (
    BadRequest,
    Conflict,
    DescribeRequest,
    GetRegistrationRequest,
    InternalError,
    LaunchRequest,
    ListRegistrationsRequest,
    ModelEvent,
    NatserveError,
    NoResponders,
    NotFound,
    RegisterRequest,
    RequestTimeout,
    ServerTimeout,
    Subjects,
    TerminateRequest,
    TransportError,
    Unavailable,
    UnregisterRequest,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    WorkerTerminate,
    __version__,
    codec,
    parse_definition,
)
from broker_client.runtime import NATSConnection, Responder, ServiceHost, Transport

from .liveness import Liveness, other_registries, replica_need
from .metrics import RegistryMetrics
from .models import ModelRow, Registration, ReplicaRow
from .placement import Placement, place_replicas, worker_state
from .repository import NewReplica, RegistryRepository

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_LAUNCH_TIMEOUT",
    "SERVICE_NAME",
    "RegistryService",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = "natserve-registry"
DEFAULT_LAUNCH_TIMEOUT = 600.0
# What the registry assumes of workers it has not heard from yet (for the resync window).
DEFAULT_HEARTBEAT_INTERVAL = 5.0
MIN_DEAD_AFTER = 6.0
# Failed launches remembered so that describe can say why a uid is gone.
_FAILURES_KEPT = 256


def _size(spec: dict[str, Any]) -> str:
    size = spec.get("model_size_in_billions")
    return f"{size:g}B parameters" if isinstance(size, int | float) else "size unknown"


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


@dataclass
class _Worker:
    info: WorkerInfo
    received: float  # time.monotonic() of the last heartbeat: immune to clock jumps and skew
    seen_at: float  # wall clock of the same moment, for display


@dataclass(frozen=True)
class _Launch:
    model_uid: str
    model_type: str
    model_name: str
    definition: dict[str, Any]
    spec: dict[str, Any]
    quantization: str
    placements: list[Placement]
    request_limits: int | None
    max_batch_size: int | None
    timeout: float
    max_tokens_limit: int | None = None
    rate_limit: float | None = None


@dataclass
class _State:
    """What only this process knows: reservations, launches in flight, recent failures."""

    reserved: set[str] = field(default_factory=set)
    launches: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    failures: OrderedDict[str, str] = field(default_factory=OrderedDict)
    known_uids: set[str] = field(default_factory=set)


class RegistryService:
    """The registry's endpoints and worker tracking over one NATS connection and one database."""

    def __init__(
        self,
        nc: NATSConnection,
        repository: RegistryRepository,
        *,
        prefix: str = "natserve",
        dead_after: float | None = None,
        resync_window: float | None = None,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
        terminate_timeout: float = 30.0,
        metrics_registry: Any = None,
    ) -> None:
        self.nc = nc
        self.repo = repository
        # Prometheus metrics on metrics_registry (a private CollectorRegistry by default).
        self.metrics = RegistryMetrics(metrics_registry)
        self.subjects = Subjects(prefix)
        self.dead_after = dead_after
        if resync_window is None:
            # Workers answer the resync at once; a configured dead window is a fine bound.
            resync_window = dead_after if dead_after is not None else 2 * DEFAULT_HEARTBEAT_INTERVAL
        self.resync_window = resync_window
        self.launch_timeout = launch_timeout
        self.terminate_timeout = terminate_timeout
        self._workers: dict[str, _Worker] = {}
        self._state = _State()
        self._transport = Transport(nc)
        self._host: ServiceHost | None = None
        self._heartbeat_sub: Any = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self._pending_writes: dict[str, _Worker] = {}
        self._writer: asyncio.Task[None] | None = None
        # Dead workers, lost replicas, orphans; and the memory promised to loading replicas.
        self.liveness = Liveness(self)
        self.metrics.attach(self)

    # ------------------------------------------------------------------ lifecycle

    @property
    def service_id(self) -> str | None:
        return self._host.id if self._host is not None else None

    async def start(self) -> None:
        others = await other_registries(self.nc, self.subjects.prefix, window=0.25)
        if others:
            # Joining a running pool, not restarting it: its transient registrations and its
            # launches in flight belong to the instances already serving.
            logger.info(
                "joining %d registry instance(s) already serving %r", len(others), self.subjects.prefix
            )
        else:
            dropped = await self.repo.delete_transient_registrations()
            if dropped:
                logger.info("dropped %d registration(s) made with persist=False", dropped)
        previous = {row.model_uid for row in await self.repo.list_models()}
        self._state.known_uids = set(previous)
        if others:
            previous = set()

        await self._transport.start()
        self._heartbeat_sub = await self.nc.subscribe(self.subjects.workers_heartbeat, cb=self._on_heartbeat)
        host = ServiceHost(
            self.nc,
            name=SERVICE_NAME,
            version=__version__,
            description="natserve registry: model registrations, launches and workers",
            metadata={"prefix": self.subjects.prefix},
        )
        host.observer = self.metrics.observe_request
        await host.start()
        s = self.subjects
        endpoints: list[tuple[str, str, Callable[[Responder], Awaitable[None]]]] = [
            ("register", s.registry_register, self._register),
            ("unregister", s.registry_unregister, self._unregister),
            ("list_registrations", s.registry_list, self._list_registrations),
            ("get_registration", s.registry_get, self._get_registration),
            ("launch", s.models_launch, self._launch),
            ("list_models", s.models_list, self._list_models),
            ("describe", s.models_describe, self._describe),
            ("terminate", s.models_terminate, self._terminate),
            ("list_workers", s.workers_list, self._list_workers),
        ]
        for name, subject, handler in endpoints:
            await host.add_endpoint(name, subject, handler)
        self._host = host
        await host.until_subscribed()
        # Workers answer with an immediate heartbeat, so placement works within a round trip.
        await self._transport.publish(s.workers_resync, {})
        await self.nc.flush()
        self._reconcile_task = asyncio.create_task(
            self._reconcile_later(previous), name="natserve-registry reconcile"
        )
        self.liveness.start(judge_after=self.resync_window)
        logger.info("registry serving on %s.* (service id %s)", s.prefix, host.id)

    async def stop(self, *, grace: float = 1.0) -> None:
        await self.liveness.stop()
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconcile_task
        if self._host is not None:
            await self._host.stop(grace=grace)
            self._host = None
        # Launches in flight are aborted (their workers told to terminate) rather than left
        # half-launched for the next run to clean up.
        launches = list(self._state.launches.values())
        for task in launches:
            task.cancel()
        if launches:
            await asyncio.wait(launches, timeout=self.terminate_timeout + 5)
        if self._heartbeat_sub is not None:
            with contextlib.suppress(Exception):
                await self._heartbeat_sub.unsubscribe()
            self._heartbeat_sub = None
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=5)
        await self._transport.close()

    # ------------------------------------------------------------------ workers

    def _dead_after(self, info: WorkerInfo) -> float:
        if self.dead_after is not None:
            return self.dead_after
        return max(MIN_DEAD_AFTER, 3 * info.heartbeat_interval)

    def _is_alive(self, worker: _Worker, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - worker.received <= self._dead_after(worker.info)

    def alive_workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        return [w.info for w in self._workers.values() if self._is_alive(w, now)]

    def _worker_alive(self, worker_id: str) -> bool:
        worker = self._workers.get(worker_id)
        return worker is not None and self._is_alive(worker)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            body = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
            info = WorkerInfo.model_validate(body)
        except (BadRequest, ValidationError) as exc:
            logger.warning("ignoring a malformed heartbeat on %s: %s", msg.subject, exc)
            return
        previous = self._workers.get(info.worker_id)
        worker = _Worker(info=info, received=time.monotonic(), seen_at=time.time())
        if previous is None or not self._is_alive(previous, worker.received):
            logger.info(
                "worker %s on %s is alive (%s)",
                info.worker_id,
                info.host,
                ", ".join(d.name for d in info.devices) or "no devices",
            )
        self._workers[info.worker_id] = worker
        if previous is None or worker_state(previous.info) != worker_state(info):
            self.liveness.wake()  # a worker joined, or says it is stopping or stopped
        self._pending_writes[info.worker_id] = worker
        # The database write is off the heartbeat path: a slow database must not delay
        # heartbeats and make live workers look dead.
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_workers(), name="natserve-registry workers")

    async def _write_workers(self) -> None:
        while self._pending_writes:
            worker_id, worker = self._pending_writes.popitem()
            try:
                await self.repo.upsert_worker(
                    worker_id,
                    worker.info.host,
                    worker.info.model_dump(mode="json"),
                    datetime.fromtimestamp(worker.seen_at, UTC),
                )
            except Exception:
                logger.warning("cannot record worker %s in the database", worker_id, exc_info=True)

    def _worker_view(self, worker: _Worker, now: float) -> dict[str, Any]:
        view = worker.info.model_dump(mode="json")
        view["last_seen"] = worker.seen_at
        view["alive"] = self._is_alive(worker, now)
        view["dead_after"] = self._dead_after(worker.info)
        view["state"] = self.liveness.state_of(worker.info.worker_id)
        return view

    async def _list_workers(self, resp: Responder) -> None:
        resp.body()  # a malformed body is still a 400, even with nothing to read from it
        now = time.monotonic()
        workers = [self._worker_view(self._workers[k], now) for k in sorted(self._workers)]
        # The registry's last launch failures ride along for `natserve status`.
        await resp.respond({"workers": workers, "recent_failures": self.metrics.recent_failures()})

    # ------------------------------------------------------------------ registrations

    async def _register(self, resp: Responder) -> None:
        req = resp.parse(RegisterRequest)
        definition = parse_definition(req.model_type, req.model)
        stored = definition.model_dump(mode="json", exclude_none=True)
        await self.repo.add_registration(req.model_type, definition.model_name, stored, req.persist)
        logger.info("registered %s model %r (persist=%s)", req.model_type, definition.model_name, req.persist)
        await resp.respond({"model_type": req.model_type, "model_name": definition.model_name})

    async def _unregister(self, resp: Responder) -> None:
        req = resp.parse(UnregisterRequest)
        if not await self.repo.delete_registration(req.model_type, req.model_name):
            raise NotFound(
                f"model_name {req.model_name!r} is not registered for model_type {req.model_type!r}"
            )
        logger.info("unregistered %s model %r", req.model_type, req.model_name)
        await resp.respond({})

    @staticmethod
    def _summary(row: Registration) -> dict[str, Any]:
        d = row.definition
        summary: dict[str, Any] = {
            "model_type": row.model_type,
            "model_name": row.model_name,
            "persist": row.persist,
            "is_builtin": False,
            "model_ability": d.get("model_ability", []),
            "model_description": d.get("model_description"),
            "model_lang": d.get("model_lang") or d.get("language"),
            "created_at": _ts(row.created_at),
        }
        if "context_length" in d:
            summary["context_length"] = d["context_length"]
        return summary

    async def _list_registrations(self, resp: Responder) -> None:
        req = resp.parse(ListRegistrationsRequest)
        rows = await self.repo.list_registrations(req.model_type)
        await resp.respond({"registrations": [self._summary(r) for r in rows]})

    async def _get_registration(self, resp: Responder) -> None:
        req = resp.parse(GetRegistrationRequest)
        row = await self.repo.get_registration(req.model_type, req.model_name)
        if row is None:
            raise NotFound(
                f"model_name {req.model_name!r} is not registered for model_type {req.model_type!r}"
            )
        await resp.respond(
            {**row.definition, "model_type": row.model_type, "persist": row.persist, "is_builtin": False}
        )

    async def _find_registration(self, model_name: str, model_type: str | None) -> Registration:
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

    # ------------------------------------------------------------------ launch

    async def _launch(self, resp: Responder) -> None:
        req = resp.parse(LaunchRequest)
        registration = await self._find_registration(req.model_name, req.model_type)
        definition = parse_definition(registration.model_type, registration.definition)
        spec, quantization = definition.spec_for(
            req.model_format, req.model_size_in_billions, req.quantization
        )
        uid = req.model_uid or req.model_name
        state = self._state
        # Requests run concurrently: the in-memory reservation closes the gap between the
        # check below and the insert; the primary key guards against other processes.
        if uid in state.reserved:
            raise Conflict(f"model_uid {uid!r} is already being launched")
        state.reserved.add(uid)
        try:
            if await self.repo.get_model(uid) is not None:
                raise Conflict(
                    f"model_uid {uid!r} is already running; terminate it first or give another model_uid"
                )
            spec_json = spec.model_dump(mode="json", exclude_none=True)
            sizing = ModelRow(
                model_type=registration.model_type,
                definition=registration.definition,
                spec=spec_json,
                quantization=quantization,
                max_batch_size=req.max_batch_size,
            )
            placements = place_replicas(
                self.alive_workers(),
                req.replica,
                worker_id=req.worker_id,
                n_gpu=req.n_gpu,
                known=list(self._workers),
                need=lambda kind: replica_need(sizing, kind),
                reserved=self.liveness.memory.snapshot(),
                what=f"{uid!r} ({_size(spec_json)}, {quantization})",
            )
            plan = _Launch(
                model_uid=uid,
                model_type=registration.model_type,
                model_name=registration.model_name,
                definition=registration.definition,
                spec=spec.model_dump(mode="json", exclude_none=True),
                quantization=quantization,
                placements=placements,
                request_limits=req.request_limits,
                max_batch_size=req.max_batch_size,
                timeout=req.timeout or self.launch_timeout,
                max_tokens_limit=req.max_tokens_limit,
                rate_limit=req.rate_limit,
            )
            await self.repo.create_model(
                ModelRow(
                    model_uid=uid,
                    model_name=plan.model_name,
                    model_type=plan.model_type,
                    definition=plan.definition,
                    spec=plan.spec,
                    quantization=quantization,
                    replica=req.replica,
                    request_limits=req.request_limits,
                    max_batch_size=req.max_batch_size,
                    max_tokens_limit=req.max_tokens_limit,
                    rate_limit=req.rate_limit,
                    status="launching",
                ),
                [NewReplica(p.replica_index, p.worker_id, p.device) for p in placements],
            )
        except BaseException:
            state.reserved.discard(uid)
            raise
        state.known_uids.add(uid)
        state.failures.pop(uid, None)
        logger.info(
            "launching %r as %r: %s",
            plan.model_name,
            uid,
            ", ".join(f"replica {p.replica_index} on {p.worker_id}" for p in placements),
        )
        # The launch runs in a task of its own so that terminate can cancel it and a
        # wait=False launch outlives its request.
        task = asyncio.create_task(self._run_launch(plan), name=f"natserve-registry launch {uid}")
        state.launches[uid] = task
        task.add_done_callback(lambda t: self._launch_done(uid, t))
        # Until it is loaded, the heartbeats do not show the memory it takes.
        self.liveness.memory.reserve(placements)
        task.add_done_callback(lambda t: self.liveness.memory.release(placements))
        self.metrics.track_launch(task)
        if not req.wait:
            await resp.respond({"model_uid": uid})
            return
        await asyncio.wait([task])
        if task.cancelled():
            raise Conflict(f"launch of model_uid {uid!r} was cancelled: it was terminated while loading")
        error = task.exception()
        if error is not None:
            raise error
        await resp.respond({"model_uid": uid})

    def _launch_done(self, uid: str, task: asyncio.Task[None]) -> None:
        state = self._state
        if state.launches.get(uid) is task:
            del state.launches[uid]
        state.reserved.discard(uid)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so that a wait=False failure is not reported as never retrieved.
            logger.info("launch of %r failed: %s", uid, task.exception())

    async def _run_launch(self, plan: _Launch) -> None:
        uid = plan.model_uid
        for p in plan.placements:
            where = f" ({p.device})" if p.device else ""
            await self._event(
                uid,
                "placing",
                model_name=plan.model_name,
                replica_index=p.replica_index,
                worker_id=p.worker_id,
                status="launching",
                message=f"replica {p.replica_index} placed on worker {p.worker_id}{where}",
            )
        tasks = [
            asyncio.create_task(self._launch_replica(plan, p), name=f"launch {uid}[{p.replica_index}]")
            for p in plan.placements
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
            await self._abort_launch(plan, exc)
            raise
        await self.repo.set_model_status(uid, "ready")
        logger.info("model %r is ready (%d replica(s))", uid, len(plan.placements))
        await self._event(
            uid,
            "ready",
            model_name=plan.model_name,
            status="ready",
            fraction=1.0,
            message=f"{len(plan.placements)} replica(s) ready",
        )

    async def _launch_replica(self, plan: _Launch, placement: Placement) -> None:
        uid, index, worker_id = plan.model_uid, placement.replica_index, placement.worker_id
        await self.repo.update_replica(uid, index, status="loading")
        await self._event(
            uid,
            "loading",
            model_name=plan.model_name,
            replica_index=index,
            worker_id=worker_id,
            status="launching",
            message=f"worker {worker_id} is loading replica {index}",
        )
        command = WorkerLaunch(
            model_uid=uid,
            replica_index=index,
            model_type=plan.model_type,  # type: ignore[arg-type]
            model_name=plan.model_name,
            definition=plan.definition,
            spec=plan.spec,
            quantization=plan.quantization,  # type: ignore[arg-type]
            device=placement.device,
            request_limits=plan.request_limits,
            max_batch_size=plan.max_batch_size,
            max_tokens_limit=plan.max_tokens_limit,
            rate_limit=plan.rate_limit,
        )
        subject = self.subjects.worker(worker_id, "launch")
        try:
            raw = await self._transport.request(
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
        await self._event(
            uid,
            "ready",
            model_name=plan.model_name,
            replica_index=index,
            worker_id=worker_id,
            status="launching",
            message=f"replica {index} ready on {worker_id} ({reply.device})",
        )

    async def _abort_launch(self, plan: _Launch, exc: BaseException) -> None:
        uid = plan.model_uid
        if isinstance(exc, asyncio.CancelledError):
            message = f"launch of {uid!r} was cancelled"
        elif isinstance(exc, NatserveError):
            message = exc.message
        else:
            message = f"{type(exc).__name__}: {exc}"
        logger.warning("launch of %r failed, removing it: %s", uid, message)
        try:
            await self._terminate_on_workers(uid, {p.worker_id for p in plan.placements})
            await self.repo.delete_model(uid)
        except Exception:
            logger.error("cannot clean up the failed launch of %r", uid, exc_info=True)
        self._state.known_uids.discard(uid)
        if not isinstance(exc, asyncio.CancelledError):
            self._remember_failure(uid, message)
        await self._event(uid, "failed", model_name=plan.model_name, status="failed", message=message)

    def _remember_failure(self, uid: str, message: str) -> None:
        self.metrics.note_failure(uid, message)
        failures = self._state.failures
        failures[uid] = message
        failures.move_to_end(uid)
        while len(failures) > _FAILURES_KEPT:
            failures.popitem(last=False)

    async def _terminate_on_workers(self, uid: str, worker_ids: Iterable[str]) -> None:
        """Ask each worker to drop its replicas of ``uid``; a dead or gone worker is tolerated."""

        async def one(worker_id: str) -> None:
            # A worker that stopped beating is most likely gone: do not wait long on it.
            timeout = self.terminate_timeout if self._worker_alive(worker_id) else 2.0
            subject = self.subjects.worker(worker_id, "terminate")
            try:
                await self._transport.request(
                    subject, WorkerTerminate(model_uid=uid).model_dump(mode="json"), timeout=timeout
                )
            except NotFound:
                pass  # the worker holds nothing of it: already the wanted state
            except NatserveError as exc:
                logger.warning("worker %s did not confirm terminating %r: %s", worker_id, uid, exc)

        await asyncio.gather(*(one(w) for w in sorted(set(worker_ids))))

    # ------------------------------------------------------------------ models

    def _description(self, row: ModelRow) -> dict[str, Any]:
        d, spec = row.definition, row.spec
        now = time.monotonic()
        worker_ids = sorted({r.worker_id for r in row.replicas})
        workers = []
        for worker_id in worker_ids:
            worker = self._workers.get(worker_id)
            workers.append(
                {
                    "worker_id": worker_id,
                    "host": worker.info.host if worker else None,
                    "alive": worker is not None and self._is_alive(worker, now),
                }
            )
        description: dict[str, Any] = {
            "model_uid": row.model_uid,
            "model_name": row.model_name,
            "model_type": row.model_type,
            "model_ability": d.get("model_ability", []),
            "model_description": d.get("model_description"),
            "model_lang": d.get("model_lang") or d.get("language"),
            "model_format": spec.get("model_format"),
            "model_size_in_billions": spec.get("model_size_in_billions"),
            "model_id": spec.get("model_id"),
            "model_uri": spec.get("model_uri"),
            "quantization": row.quantization,
            "replica": row.replica,
            "status": row.status,
            "error": row.error,
            "request_limits": row.request_limits,
            "max_batch_size": row.max_batch_size,
            "context_length": d.get("context_length", d.get("max_tokens")),
            "replicas": [self._replica_view(r) for r in row.replicas],
            "workers": workers,
            "created_at": _ts(row.created_at),
            "updated_at": _ts(row.updated_at),
        }
        if row.model_type == "embedding":
            description["dimensions"] = d.get("dimensions")
            description["max_tokens"] = d.get("max_tokens")
        return description

    @staticmethod
    def _replica_view(r: ReplicaRow) -> dict[str, Any]:
        return {
            "replica_index": r.replica_index,
            "worker_id": r.worker_id,
            "device": r.device,
            "status": r.status,
            "memory_bytes": r.memory_bytes,
            "error": r.error,
        }

    async def _list_models(self, resp: Responder) -> None:
        resp.body()
        rows = await self.repo.list_models()
        await resp.respond({"models": {row.model_uid: self._description(row) for row in rows}})

    def _not_running(self, uid: str) -> NotFound:
        failure = self._state.failures.get(uid)
        if failure is not None:
            return NotFound(f"model_uid {uid!r} is not running: its launch failed: {failure}")
        return NotFound(f"model_uid {uid!r} is not running")

    async def _describe(self, resp: Responder) -> None:
        req = resp.parse(DescribeRequest)
        row = await self.repo.get_model(req.model_uid)
        if row is None:
            raise self._not_running(req.model_uid)
        await resp.respond(self._description(row))

    async def _terminate(self, resp: Responder) -> None:
        req = resp.parse(TerminateRequest)
        uid = req.model_uid
        launch = self._state.launches.get(uid)
        if launch is not None:
            # Cancelling the launch tells its workers to terminate and removes the rows.
            launch.cancel()
            await asyncio.wait([launch], timeout=self.terminate_timeout + 5)
        row = await self.repo.get_model(uid)
        if row is None:
            if launch is not None:
                await self._event(uid, "terminated", status="terminated", message="terminated while loading")
                await resp.respond({})
                return
            raise self._not_running(uid)
        await self.repo.set_model_status(uid, "terminating")
        await self._terminate_on_workers(uid, {r.worker_id for r in row.replicas})
        await self.repo.delete_model(uid)
        self._state.known_uids.discard(uid)
        logger.info("terminated model %r", uid)
        await self._event(uid, "terminated", model_name=row.model_name, status="terminated")
        await resp.respond({})

    # ------------------------------------------------------------------ reconcile

    async def _reconcile_later(self, uids: set[str]) -> None:
        if not uids:
            return
        # A service timer, not a test barrier: workers answer the resync within this window.
        await asyncio.sleep(self.resync_window)
        try:
            await self.reconcile(uids)
        except Exception:
            logger.error("reconciling models after start failed", exc_info=True)

    async def reconcile(self, uids: Iterable[str]) -> None:
        """Check models of a previous run against what live workers report now."""
        reported: dict[tuple[str, int], str] = {}
        for info in self.alive_workers():
            for replica in info.replicas:
                reported[(replica.model_uid, replica.replica_index)] = info.worker_id
        for uid in sorted(uids):
            if uid in self._state.launches or uid in self._state.reserved:
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
            self._state.known_uids.discard(uid)
            self._remember_failure(uid, reason)
            await self._event(uid, "failed", model_name=row.model_name, status="failed", message=reason)

    # ------------------------------------------------------------------ events

    async def _event(self, uid: str, stage: str, **fields: Any) -> None:
        event = ModelEvent(model_uid=uid, stage=stage, ts=time.time(), **fields)
        try:
            await self._transport.publish(
                self.subjects.events(uid), event.model_dump(mode="json", exclude_none=True)
            )
        except Exception as exc:
            # Events are progress reports; losing one must not fail the operation.
            logger.debug("cannot publish %s event for %r: %s", stage, uid, exc)
