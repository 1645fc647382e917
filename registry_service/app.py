"""Running the registry: connect to NATS, migrate the database, serve until told to stop.

``Registry`` is the class form (``start``/``stop`` or ``async with``) used by tests and by
``natserve up``; ``run_registry`` is the long-running form for ``natserve registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from broker_client import DEFAULT_PREFIX, NatsAuth, connect_options
from broker_client.runtime import NATSConnection, connect

from . import db
from .batches import BatchLimits
from .launcher import DEFAULT_LAUNCH_TIMEOUT
from .ondemand import DEFAULT_HOLD_MAX_AGE, DEFAULT_HOLD_MAX_REQUESTS
from .repository import RegistryRepository
from .service import RegistryService

__all__ = ["Registry", "run_registry"]

logger = logging.getLogger(__name__)


class Registry:
    """The registry service with its own NATS connection and database engine."""

    def __init__(
        self,
        *,
        nats_url: str | list[str],
        db_url: str,
        prefix: str = DEFAULT_PREFIX,
        heartbeat_dead_after: float | None = None,
        resync_window: float | None = None,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
        migrate: bool = True,
        name: str = "natserve-registry",
        auth: NatsAuth | None = None,
        metrics_registry: CollectorRegistry | None = None,
        batch_limits: BatchLimits | None = None,
        hold_max_requests: int = DEFAULT_HOLD_MAX_REQUESTS,
        hold_max_age: float = DEFAULT_HOLD_MAX_AGE,
    ) -> None:
        self.batch_limits = batch_limits
        """``hold_max_requests`` and ``hold_max_age``: how many requests the registry holds for
        a model starting on demand, and how long each may wait (``ondemand/``)."""
        self.hold_max_requests = hold_max_requests
        self.hold_max_age = hold_max_age
        self.nats_url = nats_url
        self.auth = auth
        self.metrics_registry = metrics_registry
        self.db_url = db_url
        self.prefix = prefix
        self.heartbeat_dead_after = heartbeat_dead_after
        self.resync_window = resync_window
        self.launch_timeout = launch_timeout
        self.migrate = migrate
        self.name = name
        self.nc: NATSConnection | None = None
        self.engine: AsyncEngine | None = None
        self.service: RegistryService | None = None

    async def start(self) -> None:
        engine = db.make_engine(self.db_url)
        nc: NATSConnection | None = None
        try:
            if self.migrate:
                await db.upgrade(engine)
            nc = await connect(self.nats_url, name=self.name, **connect_options(self.auth))
            service = RegistryService(
                nc,
                RegistryRepository(engine),
                prefix=self.prefix,
                dead_after=self.heartbeat_dead_after,
                resync_window=self.resync_window,
                launch_timeout=self.launch_timeout,
                metrics_registry=self.metrics_registry,
                batch_limits=self.batch_limits,
                hold_max_requests=self.hold_max_requests,
                hold_max_age=self.hold_max_age,
            )
            await service.start()
        except BaseException:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            await engine.dispose()
            raise
        self.engine, self.nc, self.service = engine, nc, service

    async def stop(self) -> None:
        service, nc, engine = self.service, self.nc, self.engine
        self.service = self.nc = self.engine = None
        if service is not None:
            await service.stop()
        if nc is not None:
            # Drain delivers what is already buffered and flushes the replies before closing.
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_registry(
    *,
    nats_url: str,
    db_url: str,
    prefix: str = DEFAULT_PREFIX,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    heartbeat_dead_after: float | None = None,
    migrate: bool = True,
    auth: NatsAuth | None = None,
    metrics_registry: CollectorRegistry | None = None,
    hold_max_requests: int = DEFAULT_HOLD_MAX_REQUESTS,
    hold_max_age: float = DEFAULT_HOLD_MAX_AGE,
) -> None:
    """Serve the registry until ``stop`` is set; ``ready`` is set once it answers requests.

    ``metrics_registry``: the prometheus_client ``CollectorRegistry`` its metrics go to."""
    registry = Registry(
        nats_url=nats_url,
        db_url=db_url,
        prefix=prefix,
        heartbeat_dead_after=heartbeat_dead_after,
        migrate=migrate,
        auth=auth,
        metrics_registry=metrics_registry,
        hold_max_requests=hold_max_requests,
        hold_max_age=hold_max_age,
    )
    await registry.start()
    try:
        if ready is not None:
            ready.set()
        await stop.wait()
        logger.info("registry stopping")
    finally:
        await registry.stop()
