"""The worker: one NATS service that loads model replicas and serves them, and its heartbeats.

One :class:`Worker` is one ``nats.micro`` service named ``natserve-worker`` (metadata:
``worker_id``, ``host``). Its endpoints (:mod:`workers.endpoints`) take launch and terminate
commands from the registry and the model requests of the replicas it serves; it publishes its
``WorkerInfo`` on ``<prefix>.workers.<id>.heartbeat`` every ``heartbeat_interval``, at once on start,
on every message to ``<prefix>.workers.resync`` and whenever its replicas change. Launch
progress goes to ``<prefix>.events.models.<uid>`` as ``ModelEvent``s (stages ``download``,
``loading``, ``ready``, ``failed``, ``terminated``).

A launch's replica is built by :mod:`workers.builder` (which engine, on what); loading runs on a
thread so the worker keeps answering while a model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from pydantic import ValidationError

from broker_client import (
    BadRequest,
    BatchNames,
    Conflict,
    DeviceInfo,
    ModelEvent,
    ModelSpec,
    NotFound,
    Subjects,
    Unavailable,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    __version__,
    check_name,
    codec,
    connect_options,
    format_validation_error,
    parse_definition,
)
from broker_client.runtime import NATSConnection, ServiceHost, connect

from .batches import BatchPuller
from .builder import PendingLaunch, build_replica, warm_up
from .devices import best_device, free_memory, list_devices
from .endpoints import ModelEndpoints, WorkerEndpoints
from .metrics import WorkerMetrics
from .replicas import Replica
from .served import ServedModel
from .settings import WorkerSettings

logger = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "Worker", "default_worker_id"]

SERVICE_NAME = "natserve-worker"


def default_worker_id(host: str | None = None) -> str:
    """``<hostname>-<6 hex>``, made a valid name token (no dots, at most 128 characters)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", (host or socket.gethostname()).split(".")[0])
    base = base.strip("-_")[:120] or "worker"
    return f"{base}-{secrets.token_hex(3)}"


class Worker:
    """One worker process's service. ``await start()``, then ``await stop()`` to drain and leave."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        on_warm: Callable[[], None] | None = None,
        warm_up_after: asyncio.Event | None = None,
    ) -> None:
        """``settings``: what the worker is configured with (:class:`WorkerSettings`).
        ``warm_up_after``: start the warm-up only once this event is set (``natserve up``: once
        the registry answers too, since the imports hold the GIL for most of their time).
        ``on_warm`` runs once those imports are done (by the warm-up, or by the first launch
        without one), before any model is built."""
        self.settings = settings
        self.subjects = Subjects(settings.prefix)
        self.worker_id = settings.worker_id or default_worker_id()
        self.host = socket.gethostname()
        # The default device of launches; resolved (the best local one) at start.
        self.device = settings.device
        self.limits = settings.limits
        self._on_warm = on_warm
        self._warm_up_after = warm_up_after
        self._warming: asyncio.Future[None] | None = None
        self.metrics = WorkerMetrics(settings.metrics_registry)
        self.metrics.attach(self)
        self.started_at = time.time()
        self.nc: NATSConnection | None = None
        self.service: ServiceHost | None = None
        self._endpoints: WorkerEndpoints | None = None
        self._batches: BatchPuller | None = None
        self._models: dict[str, ServedModel] = {}
        self._pending: dict[tuple[str, int], PendingLaunch] = {}
        self._beat_now = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._status = "created"
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._status != "created":
            raise RuntimeError(f"worker {self.worker_id} was already started")
        self._status = "starting"
        self.started_at = time.time()
        await self._start()
        self._status = "running"
        await self._publish_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="natserve-heartbeat")
        if self.settings.warm_up:
            # On a thread of its own: nothing waits for it but loads (builder.warm_up).
            self._warming = asyncio.ensure_future(self._warm_up())
        logger.info(
            "worker %s serving on %s (prefix %r, device %s)",
            self.worker_id,
            self.settings.nats_url,
            self.subjects.prefix,
            self.device,
        )

    async def _warm_up(self) -> None:
        if self._warm_up_after is not None:
            await self._warm_up_after.wait()
        try:
            seconds = await asyncio.to_thread(warm_up, self._on_warm)
        except Exception as exc:
            # The first launch imports the same code and reports what is wrong with it.
            logger.warning("worker %s: warming up the model loader failed: %r", self.worker_id, exc)
            return
        if seconds:
            logger.info("worker %s: model loader warmed up in %.2f s", self.worker_id, seconds)

    async def _start(self) -> None:
        # CUDA discovery can take a while on first use: off the loop.
        if self.device is None:
            self.device = await asyncio.to_thread(best_device)
        else:
            known = await asyncio.to_thread(list_devices)
            wanted = "cuda:0" if self.device == "cuda" else self.device
            if wanted not in {d.name for d in known}:
                self._status = "stopped"
                raise ValueError(
                    f"device {self.device!r} is not on this machine; it has "
                    f"{', '.join(d.name for d in known)}"
                )
            self.device = wanted
        try:
            self.nc = await connect(
                self.settings.nats_url,
                name=f"{SERVICE_NAME}-{self.worker_id}",
                **connect_options(self.settings.auth),
            )
        except BaseException:
            self._status = "stopped"
            raise
        try:
            self.service = ServiceHost(
                self.nc,
                name=SERVICE_NAME,
                version=__version__,
                description="natserve inference worker",
                metadata={"worker_id": self.worker_id, "host": self.host},
            )
            self.service.observer = self.metrics.observe_request
            await self.service.start()
            self._endpoints = WorkerEndpoints(self.service, self.nc, self.subjects, self.worker_id, self)
            await self._endpoints.open()
            self._batches = BatchPuller(
                self.nc,
                BatchNames(self.subjects.prefix),
                lambda: self._models,
                slots=self.settings.batch_slots,
                pause_at=self.settings.batch_pause_at,
            )
        except BaseException:
            self._status = "stopped"
            await self._close_connection()
            raise

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish (bounded), unload everything, leave."""
        if self._status == "stopping":
            await self._stopped.wait()
            return
        if self._status != "running":
            self._status = "stopped"
            return
        self._status = "stopping"
        if self._warming is not None:
            self._warming.cancel()  # its thread runs on to its end; nobody waits for it now
        grace = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        service, endpoints = self.service, self._endpoints
        assert service is not None and endpoints is not None
        # New launches and new requests go elsewhere from here on.
        await endpoints.stop_launches()
        if self._batches is not None:
            # Batch requests still running finish within the grace; the rest are redelivered.
            await self._batches.stop(grace)
        for served in self._models.values():
            await served.stop_accepting()
        for pending in self._pending.values():
            pending.cancelled = f"worker {self.worker_id} is shutting down"
        self._beat_now.set()

        replicas = [r for served in self._models.values() for r in served.replicas.values()]
        if replicas:
            deadline = time.monotonic() + grace
            for replica in replicas:
                if not await replica.wait_idle(max(0.0, deadline - time.monotonic())):
                    logger.warning("%s: drain timeout of %.1f s reached", replica.label, grace)
                    break
        for uid in list(self._models):
            await self._terminate(uid, None, reason=f"worker {self.worker_id} is shutting down")

        beating, self._heartbeat_task = self._heartbeat_task, None
        if beating is not None:
            # The loop exits on its own once _heartbeat_task is cleared and it is woken.
            self._beat_now.set()
            _, late = await asyncio.wait({beating}, timeout=5)
            for task in late:
                task.cancel()
        with contextlib.suppress(Exception):
            await self._publish_heartbeat(status="stopped")
        await service.stop()
        if self._background:
            # Let the last events (terminated) go out before the connection closes.
            _, late = await asyncio.wait(set(self._background), timeout=2)
            for task in late:
                task.cancel()
        await self._close_connection()
        self._status = "stopped"
        self._stopped.set()
        logger.info("worker %s stopped", self.worker_id)

    async def _close_connection(self) -> None:
        if self._endpoints is not None:
            await self._endpoints.close()
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                # Drain flushes what is still buffered (final replies, the last heartbeat).
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception:
                # No server to drain to (it died first): closing is all that is left.
                with contextlib.suppress(Exception):
                    await nc.close()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ state

    @property
    def models(self) -> dict[str, ServedModel]:
        return self._models

    def info(self, *, status: str | None = None) -> WorkerInfo:
        replicas = [p.info() for p in self._pending.values()]
        for served in self._models.values():
            replicas.extend(r.info() for r in served.replicas.values())
        return WorkerInfo.model_validate(
            {
                "worker_id": self.worker_id,
                "host": self.host,
                "pid": os.getpid(),
                "version": __version__,
                "devices": self._devices(),
                "replicas": replicas,
                "started_at": self.started_at,
                "last_seen": time.time(),
                "heartbeat_interval": self.settings.heartbeat_interval,
                # Extra keys WorkerInfo keeps: "stopping" tells the registry to place elsewhere.
                "status": status or self._status,
                "default_device": self.device,
                "recent_errors": self.metrics.recent_errors(),
            }
        )

    def _devices(self) -> list[DeviceInfo]:
        """The devices with their memory, within ``memory_limit`` when one is set."""
        devices = list_devices()
        limit = self.settings.memory_limit
        if limit is None:
            return devices
        used: dict[str, int] = {}
        for served in self._models.values():
            for replica in served.replicas.values():
                used[replica.device] = used.get(replica.device, 0) + replica.memory_bytes
        return [
            d.model_copy(
                update={
                    "total_memory": min(d.total_memory, limit),
                    "free_memory": max(0, min(d.free_memory, limit - used.get(d.name, 0))),
                }
            )
            for d in devices
        ]

    # ------------------------------------------------------------------ heartbeat and events

    async def _publish(self, subject: str, payload: Any) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        data = codec.encode(payload, codec.MSGPACK)
        await self.nc.publish(subject, data, headers={codec.CONTENT_TYPE: codec.MSGPACK})

    async def _publish_heartbeat(self, *, status: str | None = None) -> None:
        # list_devices reads /proc and asks CUDA: cheap, but not free; fine at heartbeat rates.
        info = self.info(status=status)
        await self._publish(self.subjects.worker_heartbeat(self.worker_id), info.model_dump(mode="json"))

    async def _heartbeat_loop(self) -> None:
        me = asyncio.current_task()
        while self._heartbeat_task is me:
            # asyncio.timeout rather than wait_for: on 3.11, wait_for can swallow a cancel that
            # arrives together with the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval):
                    await self._beat_now.wait()
            if self._heartbeat_task is not me:
                return
            self._beat_now.clear()
            if self._batches is not None and self._status == "running":
                self._batches.sync()
            try:
                await self._publish_heartbeat()
            except nats.errors.Error:
                # Disconnected: the client reconnects by itself and the next beat goes out.
                logger.debug("heartbeat not sent", exc_info=True)
            except Exception:
                logger.exception("heartbeat failed")

    def resync(self) -> None:
        """Send a heartbeat now (a registry asked, on ``workers.resync``)."""
        self._beat_now.set()

    async def _event(self, launch: WorkerLaunch, stage: str, **fields: Any) -> None:
        await self._model_event(launch.model_uid, launch.model_name, launch.replica_index, stage, **fields)

    async def _model_event(
        self, model_uid: str, model_name: str, replica_index: int, stage: str, **fields: Any
    ) -> None:
        event = ModelEvent(
            model_uid=model_uid,
            model_name=model_name,
            stage=stage,
            replica_index=replica_index,
            worker_id=self.worker_id,
            ts=time.time(),
            **fields,
        )
        try:
            await self._publish(self.subjects.events(model_uid), event.model_dump(mode="json"))
        except Exception:
            logger.debug("publishing %s event for %s failed", stage, model_uid, exc_info=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ launch

    async def launch(self, launch: WorkerLaunch) -> WorkerLaunchReply:
        """Load one replica and serve it; errors are the loader's (404, 400, 503...) unchanged.
        Counted in the launch metrics either way, a failure among the recent errors."""
        started = time.monotonic()
        try:
            reply = await self._launch(launch)
        except BaseException as exc:
            self.metrics.observe_launch(time.monotonic() - started, exc)
            self.metrics.note_error(
                code=getattr(exc, "code", 500) if isinstance(exc, Exception) else 503,
                message=getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}",
                model_uid=launch.model_uid,
                endpoint="launch",
            )
            raise
        self.metrics.observe_launch(time.monotonic() - started, None)
        return reply

    async def _launch(self, launch: WorkerLaunch) -> WorkerLaunchReply:
        if self._status != "running":
            raise Unavailable(f"worker {self.worker_id} is {self._status} and takes no launches")
        uid = check_name(launch.model_uid, "model_uid")
        key = (uid, launch.replica_index)
        if launch.replica_index < 0:
            raise BadRequest(f"replica_index must be >= 0, got {launch.replica_index}")
        existing = self._models.get(uid)
        if key in self._pending or (existing and launch.replica_index in existing.replicas):
            status = "loading" if key in self._pending else "running"
            raise Conflict(
                f"replica {launch.replica_index} of model {uid!r} is already {status} on "
                f"worker {self.worker_id!r}"
            )
        definition = parse_definition(launch.model_type, launch.definition)
        try:
            spec = ModelSpec.model_validate(launch.spec)
        except ValidationError as exc:
            raise BadRequest(f"invalid spec: {format_validation_error(exc, 'spec')}") from exc
        self.limits.check_launch(
            model_name=launch.model_name,
            trust_remote_code=definition.trust_remote_code,
            model_uri=spec.model_uri,
            worker_id=self.worker_id,
        )
        device = launch.device or self.device or "cpu"
        pending = PendingLaunch(launch, device)
        self._pending[key] = pending
        self._beat_now.set()
        replica: Replica | None = None
        try:
            replica = await build_replica(
                pending,
                definition,
                spec,
                settings=self.settings,
                event=functools.partial(self._event, launch),
                spawn=self._spawn,
                on_first_token=self.metrics.first_token_observer(uid),
                on_warm=self._on_warm,
            )
            pending.check()
            await self._served(uid).add(replica)
        except BaseException as exc:
            served = self._models.get(uid)
            if replica is not None:
                if served is not None and served.replicas.get(launch.replica_index) is replica:
                    await served.remove(launch.replica_index, "launch failed")
                else:
                    await replica.close("launch failed")
            loading = any(k[0] == uid and k != key for k in self._pending)
            if served is not None and not served.replicas and not loading:
                await served.close_endpoints()
                self._models.pop(uid, None)
            replica = None
            free_memory(device)
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.CancelledError):
                message = "launch was cancelled"
            self._spawn(self._event(launch, "failed", message=message))
            logger.warning("launch of %s replica %d failed: %s", uid, launch.replica_index, message)
            raise
        finally:
            self._pending.pop(key, None)
            self._beat_now.set()
        await self._event(launch, "ready", fraction=1.0)
        logger.info("serving %s replica %d (%s) on %s", uid, launch.replica_index, launch.model_name, device)
        return WorkerLaunchReply(
            model_uid=uid,
            replica_index=launch.replica_index,
            device=device,
            memory_bytes=replica.memory_bytes,
        )

    def _served(self, model_uid: str) -> ServedModel:
        """The served model of ``model_uid``, made with its endpoints when it is new."""
        served = self._models.get(model_uid)
        if served is None:
            assert self.service is not None
            served = self._models[model_uid] = ServedModel(model_uid, self.worker_id)
            served.endpoints = ModelEndpoints(
                self.service,
                self.subjects,
                served,
                limits=self.limits,
                keepalive_silence=self.settings.keepalive_silence,
            )
        return served

    # ------------------------------------------------------------------ terminate

    async def terminate(
        self, model_uid: str, replica_index: int | None = None, *, if_idle_for: float | None = None
    ) -> None:
        """Remove the endpoints, end in-flight requests with 503, close the engines, free memory.

        ``if_idle_for``: an idle stop (:meth:`_terminate_idle`), which ends no request."""
        if if_idle_for is not None:
            await self._terminate_idle(model_uid, replica_index, if_idle_for)
            return
        found = False
        for (uid, index), pending in self._pending.items():
            if uid == model_uid and (replica_index is None or index == replica_index):
                pending.cancelled = "terminated while loading"
                found = True
        served = self._models.get(model_uid)
        if served is not None and (replica_index is None or replica_index in served.replicas):
            found = True
            await self._terminate(model_uid, replica_index, reason=f"model {model_uid!r} was terminated")
        if not found:
            which = "" if replica_index is None else f" replica {replica_index}"
            raise NotFound(f"model {model_uid!r}{which} is not on worker {self.worker_id!r}")

    async def _terminate_idle(self, model_uid: str, replica_index: int | None, if_idle_for: float) -> None:
        """Stop replicas that have had no request for ``if_idle_for`` seconds, losing none.

        409 when one had a request more recently (or has one now): the registry decided on a
        heartbeat, and a request may have come since. The check and what makes new requests
        go elsewhere run without an await between them. A replica that is not the uid's last
        here stops taking requests at once (``pick`` skips it); with the last one the uid's
        subjects are drained, so that the requests NATS already routed here are still served
        (the registry answers the subjects meanwhile), and they finish before it closes."""
        served = self._models.get(model_uid)
        if served is None or (replica_index is not None and replica_index not in served.replicas):
            which = "" if replica_index is None else f" replica {replica_index}"
            raise NotFound(f"model {model_uid!r}{which} is not on worker {self.worker_id!r}")
        indexes = list(served.replicas) if replica_index is None else [replica_index]
        now = time.monotonic()
        for index in indexes:
            replica = served.replicas[index]
            idle = replica.idle_for(now)
            if replica.flights or idle < if_idle_for or replica.status != "ready":
                raise Conflict(
                    f"replica {index} of model {model_uid!r} on worker {self.worker_id!r} has been "
                    f"idle {idle:.2f} s ({len(replica.flights)} request(s) in flight), less than "
                    f"if_idle_for {if_idle_for:g} s: it keeps running"
                )
        replicas = [served.replicas[i] for i in indexes]
        if len(indexes) < len(served.replicas):
            for replica in replicas:
                replica.status = "stopping"
        else:
            await served.drain()
            deadline = time.monotonic() + self.settings.drain_timeout
            for replica in replicas:
                await replica.wait_idle(max(0.0, deadline - time.monotonic()))
        reason = f"model {model_uid!r} was idle for {if_idle_for:g} s"
        for index in indexes:
            await self._terminate(model_uid, index, reason=reason)

    async def _terminate(self, model_uid: str, replica_index: int | None, *, reason: str) -> None:
        served = self._models.get(model_uid)
        if served is None:
            return
        indexes = list(served.replicas) if replica_index is None else [replica_index]
        for index in indexes:
            replica = await served.remove(index, reason)
            if replica is None:
                continue
            # Replica.close unloaded the model (gc and the CUDA cache included).
            name = replica.model_name
            del replica
            self._spawn(self._model_event(model_uid, name, index, "terminated", message=reason))
        if not served.replicas:
            self._models.pop(model_uid, None)
        self._beat_now.set()
        logger.info(
            "terminated %s%s: %s",
            model_uid,
            "" if replica_index is None else f" replica {replica_index}",
            reason,
        )
