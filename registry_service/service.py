"""The registry's NATS service: its parts put together over one connection and one database.

:class:`RegistryService` builds the parts and runs their lifecycle:

    directory.py    the workers heard from, and who is alive (memory)
    launcher.py     launches, terminations and the commands to workers; plan.py, placement.py
    liveness.py     dead workers, lost replicas re-placed, orphans
    ondemand/       models that start on demand and stop when idle; evictions for launches
    events.py       model events and worker notices
    endpoints.py    the ``nats micro`` endpoints (service ``natserve-registry``) and heartbeats
    records.py      the workers table, written behind the heartbeats
    repository.py   SQL
    batches/        batch jobs on JetStream (``batches.*``): records, files, streams, trackers

Behaviours worth knowing:

* Registrations made with ``persist=False`` do not survive a restart: when the registry
  starts it deletes them (Xinference's semantics; ``persist=True`` ones stay). A registry
  restarted alone counts as a restart too; one that starts while another instance already
  serves the prefix (``$SRV.PING``, :func:`other_registries`) is joining it, and deletes nothing.
* Several instances may serve one prefix over one database: their endpoints share the default
  nats.micro queue group, each hears every heartbeat, and a uid is claimed by its primary key
  before anything is launched, so concurrent launches of one uid load it once.
* Workers publish ``WorkerInfo`` on ``workers.<id>.heartbeat``; a worker unseen for its dead window
  is dead (``directory.py``): listed with ``alive: false`` and never chosen for a launch. On
  start the registry publishes on ``workers.resync`` so that workers beat at once instead of at
  their next interval.
* Reconcile on start: after the resync window, a model a previous run left ``launching`` or
  ``terminating`` is removed unless another registry instance is serving
  (``Launcher.reconcile``). Running models are left to ``liveness.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry

from broker_client import Subjects, __version__
from broker_client.runtime import NATSConnection, NatsTransport, ServiceHost

from .batches import BatchEndpoints, BatchJobs, BatchLimits
from .directory import WorkerDirectory
from .endpoints import RegistryEndpoints
from .events import RegistryEvents
from .launcher import DEFAULT_LAUNCH_TIMEOUT, Launcher
from .liveness import Liveness
from .metrics import RegistryMetrics
from .ondemand import DEFAULT_HOLD_MAX_AGE, DEFAULT_HOLD_MAX_REQUESTS, OnDemand
from .records import WorkerRecords
from .repository import RegistryRepository

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_LAUNCH_TIMEOUT",
    "SERVICE_NAME",
    "RegistryService",
    "other_registries",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = "natserve-registry"
# What the registry assumes of workers it has not heard from yet (for the resync window).
DEFAULT_HEARTBEAT_INTERVAL = 5.0


async def other_registries(nc: NATSConnection, prefix: str, *, window: float = 0.5) -> list[str]:
    """Ids of the registry instances already serving ``prefix`` (``$SRV.PING`` answers that
    arrive within ``window`` seconds; a registry of another prefix is not counted)."""
    inbox = nc.new_inbox()
    found: list[str] = []

    async def on_reply(msg: Msg) -> None:
        try:
            info = json.loads(msg.data)
        except ValueError:
            return
        if (info.get("metadata") or {}).get("prefix") == prefix and info.get("id"):
            found.append(str(info["id"]))

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(f"$SRV.PING.{SERVICE_NAME}", b"", reply=inbox)
        await nc.flush()
        # A bounded collection window: every instance answers, and there is no "last" answer.
        await asyncio.sleep(window)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


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
        metrics_registry: CollectorRegistry | None = None,
        batch_limits: BatchLimits | None = None,
        hold_max_requests: int = DEFAULT_HOLD_MAX_REQUESTS,
        hold_max_age: float = DEFAULT_HOLD_MAX_AGE,
    ) -> None:
        self.nc = nc
        self.repo = repository
        # Prometheus metrics on metrics_registry (a private CollectorRegistry by default).
        self.metrics = RegistryMetrics(metrics_registry)
        self.subjects = Subjects(prefix)
        if resync_window is None:
            # Workers answer the resync at once; a configured dead window is a fine bound.
            resync_window = dead_after if dead_after is not None else 2 * DEFAULT_HEARTBEAT_INTERVAL
        self.resync_window = resync_window
        self.transport = NatsTransport(nc)
        self.directory = WorkerDirectory(dead_after)
        self.events = RegistryEvents(self.transport, self.subjects)
        self.launcher = Launcher(
            repository,
            self.directory,
            self.transport,
            self.subjects,
            self.events,
            self.metrics,
            launch_timeout=launch_timeout,
            terminate_timeout=terminate_timeout,
        )
        # Dead workers, lost replicas, orphans.
        self.liveness = Liveness(nc, self.directory, self.launcher, repository, self.events)
        # Starts on demand, idle stops, evictions (it sets itself as the launcher's scaling).
        self.ondemand = OnDemand(
            nc,
            repository,
            self.directory,
            self.launcher,
            self.events,
            self.subjects,
            max_requests=hold_max_requests,
            max_age=hold_max_age,
        )
        self.records = WorkerRecords(repository)
        self.endpoints = RegistryEndpoints(
            repository,
            self.directory,
            self.launcher,
            self.liveness,
            self.records,
            self.metrics,
            self.subjects,
            ondemand=self.ondemand,
        )
        self.metrics.attach(self.directory, self.launcher.launches_in_flight)
        self.batches = BatchJobs(nc, prefix, model_exists=self._model_exists, limits=batch_limits)
        self.batch_endpoints = BatchEndpoints(self.batches)
        self._host: ServiceHost | None = None
        self._heartbeat_sub: Subscription | None = None
        self._reconcile_task: asyncio.Task[None] | None = None

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
        previous = set() if others else {row.model_uid for row in await self.repo.list_models()}

        await self.transport.start()
        self._heartbeat_sub = await self.nc.subscribe(
            self.subjects.workers_heartbeats, cb=self.endpoints.on_heartbeat
        )
        host = ServiceHost(
            self.nc,
            name=SERVICE_NAME,
            version=__version__,
            description="natserve registry: model registrations, launches and workers",
            metadata={"prefix": self.subjects.prefix},
        )
        host.observer = self.metrics.observe_request
        await host.start()
        for name, subject, handler in self.endpoints.routes(self.subjects):
            await host.add_endpoint(name, subject, handler)
        for name, subject, handler in self.batch_endpoints.routes(self.subjects):
            await host.add_endpoint(name, subject, handler)
        self._host = host
        await host.until_subscribed()
        # Workers answer with an immediate heartbeat, so placement works within a round trip.
        self.directory.settle(self.resync_window)
        await self.transport.publish(self.subjects.workers_resync, {})
        await self.nc.flush()
        self._reconcile_task = asyncio.create_task(
            self._reconcile_later(previous), name="natserve-registry reconcile"
        )
        self.liveness.start(judge_after=self.resync_window)
        await self.ondemand.start()
        await self.batches.start()
        logger.info("registry serving on %s.* (service id %s)", self.subjects.prefix, host.id)

    async def stop(self, *, grace: float = 1.0) -> None:
        await self.batches.stop()
        await self.ondemand.stop()
        await self.liveness.stop()
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconcile_task
        if self._host is not None:
            await self._host.stop(grace=grace)
            self._host = None
        await self.launcher.stop()
        if self._heartbeat_sub is not None:
            with contextlib.suppress(Exception):
                await self._heartbeat_sub.unsubscribe()
            self._heartbeat_sub = None
        await self.records.stop()
        await self.transport.close()

    async def _model_exists(self, model_uid: str) -> bool:
        return await self.repo.get_model(model_uid) is not None

    async def _reconcile_later(self, uids: set[str]) -> None:
        if not uids:
            return
        # A service timer, not a test barrier: workers answer the resync within this window.
        await asyncio.sleep(self.resync_window)
        try:
            await self.launcher.reconcile(uids)
        except Exception:
            logger.error("reconciling models after start failed", exc_info=True)
