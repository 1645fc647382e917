"""The whole system in this process: the registry and a worker as ``natserve up`` runs them
(``run_registry`` and ``run_worker`` on one loop), or a ``Registry`` and several ``Worker``s
started by hand, and an ``AsyncClient`` in front of them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker_client import AsyncClient
from tests.support.waits import eventually_despite_errors, within


@contextlib.asynccontextmanager
async def running_system(
    nats_url: str, db_url: str, prefix: str, *, client_timeout: float = 120, **worker_settings: Any
) -> AsyncIterator[AsyncClient]:
    """A registry on ``db_url`` and a CPU worker (``worker_settings`` add to its
    ``WorkerSettings``) under ``prefix``, ready; stopped when the block ends."""
    from registry_service.app import run_registry
    from workers import WorkerSettings
    from workers.app import run_worker

    stop = asyncio.Event()
    registry_ready, worker_ready = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_registry(nats_url=nats_url, db_url=db_url, prefix=prefix, stop=stop, ready=registry_ready)
        ),
        asyncio.create_task(
            run_worker(
                WorkerSettings(nats_url, prefix=prefix, device="cpu", **worker_settings),
                stop=stop,
                ready=worker_ready,
            )
        ),
    ]
    client = AsyncClient(nats_url, prefix=prefix, timeout=client_timeout)
    try:
        await within(asyncio.gather(registry_ready.wait(), worker_ready.wait()), "registry and worker", 60)
        yield client
    finally:
        await client.close()
        stop.set()
        await within(asyncio.gather(*tasks), "registry and worker to stop", 60)


@pytest.fixture
async def system(nats_url: str, sqlite_url: str, unique: str) -> AsyncIterator[AsyncClient]:
    """The client of a registry (SQLite) and a worker in this process."""
    async with running_system(nats_url, sqlite_url, f"s{unique}") as client:
        yield client


@contextlib.asynccontextmanager
async def running_registry_and_workers(
    nats_url: str,
    db_url: str,
    prefix: str,
    worker_ids: list[str],
    *,
    heartbeat_interval: float = 0.5,
    worker_options: dict[str, Any] | None = None,
    **registry_options: Any,
) -> AsyncIterator[tuple[AsyncClient, list[Any]]]:
    """A ``Registry`` (``registry_options`` add to it) and one CPU ``Worker`` per id in this
    process (``worker_options`` add to their ``WorkerSettings``), and a client; yielded once the
    registry lists every worker alive, stopped after."""
    from registry_service import Registry
    from workers import Worker, WorkerSettings

    registry = Registry(nats_url=nats_url, db_url=db_url, prefix=prefix, **registry_options)
    await registry.start()
    workers = [
        Worker(
            WorkerSettings(
                nats_url,
                prefix=prefix,
                device="cpu",
                worker_id=worker_id,
                heartbeat_interval=heartbeat_interval,
                **(worker_options or {}),
            )
        )
        for worker_id in worker_ids
    ]
    client = AsyncClient(nats_url, prefix=prefix, timeout=60)
    try:
        for w in workers:
            await w.start()

        async def every_worker() -> bool:
            alive = {x["worker_id"] for x in await client.list_workers() if x["alive"]}
            return set(worker_ids) <= alive

        await eventually_despite_errors(every_worker, f"workers {worker_ids} in the registry")
        yield client, workers
    finally:
        await client.close()
        for w in workers:
            await w.stop(drain_timeout=1)
        await registry.stop()
