"""The worker's NATS service: launch and terminate commands, heartbeats, model replicas.

One :class:`Worker` is one ``nats.micro`` service named ``natserve-worker`` (metadata:
``worker_id``, ``host``) answering

* ``<prefix>.worker.<id>.launch``     ``WorkerLaunch`` → ``WorkerLaunchReply`` once the replica serves
* ``<prefix>.worker.<id>.terminate``  ``WorkerTerminate`` → ``{}``
* ``<prefix>.worker.<id>.info``       → ``WorkerInfo``

and publishing its ``WorkerInfo`` on ``<prefix>.workers.<id>.heartbeat`` every ``heartbeat_interval``,
at once on start, on every message to ``<prefix>.workers.resync`` and whenever its replicas
change. Launch progress goes to ``<prefix>.events.models.<uid>`` as ``ModelEvent``s (stages
``download``, ``loading``, ``ready``, ``failed``, ``terminated``).

Loading runs on a thread (``asyncio.to_thread``) so the worker keeps answering while a model
loads; a spec whose ``model_uri`` starts with ``echo:`` gets the model-less
:class:`~workers.engines.echo.EchoEngine` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
from pydantic import ValidationError

from broker_client import (
    DEFAULT_PREFIX,
    BadRequest,
    Conflict,
    EmbeddingDefinition,
    LLMDefinition,
    ModelEvent,
    ModelSpec,
    NatsAuth,
    NotFound,
    ReplicaInfo,
    Subjects,
    Unavailable,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    WorkerTerminate,
    __version__,
    check_name,
    codec,
    connect_options,
    format_validation_error,
    parse_definition,
)
from broker_client.runtime import NATSConnection, Responder, ServiceHost, connect

from .devices import best_device, list_devices
from .engines.echo import is_echo_uri
from .limits import WorkerLimits
from .metrics import WorkerMetrics
from .replica import EmbeddingReplica, LLMReplica, Replica, ServedModel

logger = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "Worker", "default_worker_id"]

SERVICE_NAME = "natserve-worker"


def default_worker_id(host: str | None = None) -> str:
    """``<hostname>-<6 hex>``, made a valid name token (no dots, at most 128 characters)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", (host or socket.gethostname()).split(".")[0])
    base = base.strip("-_")[:120] or "worker"
    return f"{base}-{secrets.token_hex(3)}"


@dataclass
class _Pending:
    """A replica being loaded: shown in heartbeats, and where a terminate can reach it."""

    launch: WorkerLaunch
    device: str
    cancelled: str | None = None

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            model_uid=self.launch.model_uid,
            replica_index=self.launch.replica_index,
            model_name=self.launch.model_name,
            model_type=self.launch.model_type,
            device=self.device,
            status="loading",
        )


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()


class Worker:
    """One worker process's service. ``await start()``, then ``await stop()`` to drain and leave."""

    def __init__(
        self,
        nats_url: str | list[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        device: str | None = None,
        worker_id: str | None = None,
        heartbeat_interval: float = 2.0,
        drain_timeout: float = 30.0,
        cache_dir: str | Path | None = None,
        auth: NatsAuth | None = None,
        limits: WorkerLimits | None = None,
        metrics_registry: Any = None,
        warm_up: bool = False,
        on_warm: Callable[[], None] | None = None,
        warm_up_after: asyncio.Event | None = None,
    ) -> None:
        """``limits``: the operator's policy (remote code, model roots, request limits; none by
        default, see :mod:`workers.limits`); ``metrics_registry``: the prometheus_client
        ``CollectorRegistry`` for this worker's metrics (a private one by default); ``warm_up``:
        import torch and the model-loading code on a thread once the worker answers
        (:func:`workers.loader.warm_up`), so that a launch after it (3 s or more on two cores) pays
        only for its model; a launch that comes sooner waits for it. ``warm_up_after``: start it
        only once this event is set (``natserve up``: once the registry answers too, since the
        imports hold the GIL for most of their time). ``on_warm`` runs once those imports are
        done (by the warm-up, or by the first launch without one), before any model is built."""
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.worker_id = check_name(worker_id, "worker_id") if worker_id else default_worker_id()
        self.host = socket.gethostname()
        self.device = device
        self.heartbeat_interval = heartbeat_interval
        self.drain_timeout = drain_timeout
        self.cache_dir = cache_dir
        self.auth = auth
        self.limits = limits or WorkerLimits()
        self.warm_up = warm_up
        self._on_warm = on_warm
        self._warm_up_after = warm_up_after
        self._warming: asyncio.Future[None] | None = None
        self.metrics = WorkerMetrics(metrics_registry)
        self.metrics.attach(self)
        self.started_at = time.time()
        self.nc: NATSConnection | None = None
        self.service: ServiceHost | None = None
        self._models: dict[str, ServedModel] = {}
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._beat_now = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._resync_sub: Any = None
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
        if self.warm_up:
            # On a thread of its own: nothing waits for it but loads (loader.warm_up).
            self._warming = asyncio.ensure_future(self._warm_up())
        logger.info(
            "worker %s serving on %s (prefix %r, device %s)",
            self.worker_id,
            self.nats_url,
            self.subjects.prefix,
            self.device,
        )

    async def _warm_up(self) -> None:
        from .loader import warm_up

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
                self.nats_url, name=f"{SERVICE_NAME}-{self.worker_id}", **connect_options(self.auth)
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
            meta = {"worker_id": self.worker_id}
            for verb, handler in (
                ("launch", self._on_launch),
                ("terminate", self._on_terminate),
                ("info", self._on_info),
            ):
                await self.service.add_endpoint(
                    verb, self.subjects.worker(self.worker_id, verb), handler, metadata=meta
                )
            self._resync_sub = await self.nc.subscribe(self.subjects.workers_resync, cb=self._on_resync)
            await self.service.until_subscribed()
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
        grace = self.drain_timeout if drain_timeout is None else drain_timeout
        service = self.service
        assert service is not None
        # New launches and new requests go elsewhere from here on.
        await service.remove_endpoints({self.subjects.worker(self.worker_id, "launch")})
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
        if self._resync_sub is not None:
            with contextlib.suppress(Exception):
                await self._resync_sub.unsubscribe()
            self._resync_sub = None
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
                "devices": list_devices(),
                "replicas": replicas,
                "started_at": self.started_at,
                "last_seen": time.time(),
                "heartbeat_interval": self.heartbeat_interval,
                # Extra keys WorkerInfo keeps: "stopping" tells the registry to place elsewhere.
                "status": status or self._status,
                "default_device": self.device,
                "recent_errors": self.metrics.recent_errors(),
            }
        )

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
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._beat_now.wait()
            if self._heartbeat_task is not me:
                return
            self._beat_now.clear()
            try:
                await self._publish_heartbeat()
            except nats.errors.Error:
                # Disconnected: the client reconnects by itself and the next beat goes out.
                logger.debug("heartbeat not sent", exc_info=True)
            except Exception:
                logger.exception("heartbeat failed")

    async def _on_resync(self, msg: Any) -> None:
        self._beat_now.set()
        if msg.reply and self.nc is not None:
            with contextlib.suppress(Exception):
                await Responder(msg, self.nc).respond(self.info().model_dump(mode="json"))

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ handlers

    async def _on_info(self, resp: Responder) -> None:
        await resp.respond(self.info().model_dump(mode="json"))

    async def _on_launch(self, resp: Responder) -> None:
        launch = resp.parse(WorkerLaunch)
        started = time.monotonic()
        try:
            reply = await self.launch(launch)
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
        await resp.respond(reply.model_dump(mode="json"))

    async def _on_terminate(self, resp: Responder) -> None:
        req = resp.parse(WorkerTerminate)
        await self.terminate(req.model_uid, req.replica_index)
        await resp.respond({})

    # ------------------------------------------------------------------ launch

    async def launch(self, launch: WorkerLaunch) -> WorkerLaunchReply:
        """Load one replica and serve it; errors are the loader's (404, 400, 503...) unchanged."""
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
        pending = _Pending(launch, device)
        self._pending[key] = pending
        self._beat_now.set()
        replica: Replica | None = None
        try:
            replica = await self._build_replica(launch, definition, spec, device, pending)
            if pending.cancelled:
                raise Unavailable(f"launch of replica {launch.replica_index} of {uid!r}: {pending.cancelled}")
            served = self._models.get(uid)
            if served is None:
                assert self.service is not None
                served = ServedModel(self.service, self.subjects, uid, self.worker_id, limits=self.limits)
                self._models[uid] = served
            await served.add(replica)
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
            _free_memory(device)
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

    async def _build_replica(
        self,
        launch: WorkerLaunch,
        definition: LLMDefinition | EmbeddingDefinition,
        spec: ModelSpec,
        device: str,
        pending: _Pending,
    ) -> Replica:
        common: dict[str, Any] = {
            "model_uid": launch.model_uid,
            "replica_index": launch.replica_index,
            "model_name": launch.model_name,
            "definition": definition,
            "device": device,
            "request_limits": launch.request_limits,
            "limits": self.limits.for_replica(
                max_tokens_limit=launch.max_tokens_limit, rate_limit=launch.rate_limit
            ),
            "on_first_token": self.metrics.first_token_observer(launch.model_uid),
        }
        if is_echo_uri(spec.model_uri):
            if not isinstance(definition, LLMDefinition):
                raise BadRequest("model_uri 'echo:' serves LLM models only")
            from .echo_launch import build_echo_replica

            return await build_echo_replica(
                launch,
                definition,
                spec,
                common,
                event=lambda stage, **fields: self._event(launch, stage, **fields),
                cancelled=lambda: pending.cancelled,
            )

        from .loader import load_embedding, load_llm, resolve_source, warm_up

        # Without a warm-up (or before it is over) the imports happen here, and on_warm follows
        # them before the model is built, as it would have after the warm-up.
        await asyncio.to_thread(warm_up, self._on_warm)
        loop = asyncio.get_running_loop()

        def progress(update: dict[str, Any]) -> None:
            # Called on download threads.
            total = update.get("total") or 0
            fraction = update.get("bytes", 0) / total if total else None
            loop.call_soon_threadsafe(
                self._spawn,
                self._event(
                    launch,
                    "download",
                    fraction=fraction,
                    message=f"{update.get('bytes', 0)} of {total} bytes",
                ),
            )

        ref = spec.model_uri or spec.model_id
        await self._event(launch, "download", message=f"resolving {ref}")
        # Read at launch time, not import time, like HF_HUB_OFFLINE in the loader.
        cache_dir = self.cache_dir or os.environ.get("HF_HUB_CACHE") or None
        source = await asyncio.to_thread(
            resolve_source,
            spec.model_id,
            spec.model_uri,
            revision=spec.model_revision,
            cache_dir=cache_dir,
            progress=progress,
        )
        if pending.cancelled:
            raise Unavailable(f"launch of {launch.model_uid!r}: {pending.cancelled}")
        await self._event(launch, "loading", message=f"loading {source.path} on {device}")

        loaded: Any = None
        try:
            if isinstance(definition, LLMDefinition):
                loaded = await asyncio.to_thread(
                    load_llm,
                    source,
                    quantization=launch.quantization,
                    device=device,
                    # Both switches: the definition asks, the operator allows (checked at launch).
                    trust_remote_code=self.limits.trust_remote_code(definition.trust_remote_code),
                )
                return self._llm_replica(launch, definition, loaded, common)
            loaded = await asyncio.to_thread(load_embedding, source, device=device)
            from .engines.embedding import EmbeddingEngine

            embedder = EmbeddingEngine(loaded, max_batch_size=launch.max_batch_size or 64)
            return EmbeddingReplica(
                engine=embedder,
                dimensions=loaded.dimensions,
                max_length=loaded.max_length,
                memory_bytes=loaded.memory_bytes,
                loaded=loaded,
                **common,
            )
        except BaseException:
            if loaded is not None:
                loaded.unload()
            del loaded
            _free_memory(device)
            raise

    @staticmethod
    def _llm_replica(
        launch: WorkerLaunch, definition: LLMDefinition, loaded: Any, common: dict[str, Any]
    ) -> LLMReplica:
        from .engines.batching import BatchingEngine

        context = loaded.context_length
        if "context_length" in definition.model_fields_set:
            # The definition may narrow the model's window (memory), never widen it.
            context = min(context, definition.context_length)
        max_batch_size = launch.max_batch_size or 32
        engine: BatchingEngine
        if loaded.device.type == "cuda":
            # On a GPU kernel launches dominate an ungraphed decode step, so the engine with
            # static KV slots and one CUDA graph per batch-size bucket wins there; on the CPU
            # the left-padded dynamic cache measured as fast and needs no per-slot memory.
            from .engines.static import StaticBatchingEngine

            engine = StaticBatchingEngine(
                loaded.model,
                loaded.tokenizer,
                max_batch_size=max_batch_size,
                context_length=context,
                max_seq_len=context,
                capture_at_start=True,
            )
            context = engine.context_length
        else:
            engine = BatchingEngine(
                loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, context_length=context
            )
        return LLMReplica(
            engine=engine,
            tokenizer=loaded.tokenizer,
            context_length=context,
            max_batch_size=max_batch_size,
            memory_bytes=loaded.memory_bytes,
            loaded=loaded,
            **common,
        )

    # ------------------------------------------------------------------ terminate

    async def terminate(self, model_uid: str, replica_index: int | None = None) -> None:
        """Remove the endpoints, end in-flight requests with 503, close the engines, free memory."""
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
