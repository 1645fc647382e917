"""Launch progress and control across two workers: progress events until every replica is ready,
``wait=False``, cancelling a launch while it loads (nothing is left anywhere), and terminate
freeing every worker. The registry and workers run in this process; the ``echo:?load=N`` model
takes N seconds to "load", with progress, and can be cancelled like a real load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker_client import AsyncClient, Conflict, ModelEvent, NotFound
from tests.support.pool import echo_definition
from tests.support.system import running_registry_and_workers
from tests.support.waits import eventually_despite_errors, within
from workers import Worker


@pytest.fixture
async def pool(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"l{unique}",
        [f"w{i}-{unique}" for i in range(2)],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
    ) as (client, workers):
        yield client, workers


def held(worker: Worker) -> list[tuple[str, int]]:
    """What a worker holds or is loading."""
    loading = list(worker._pending)
    serving = [(uid, i) for uid, served in worker.models.items() for i in served.replicas]
    return sorted(loading + serving)


async def test_launch_reports_progress_and_returns_when_every_replica_is_ready(
    pool: tuple[AsyncClient, list[Worker]],
) -> None:
    client, workers = pool
    await client.register_model("LLM", echo_definition("loads", "echo:?load=1"))
    events: list[ModelEvent] = []
    started = time.monotonic()
    uid = await client.launch_model("loads", replica=2, progress=events.append)
    assert time.monotonic() - started >= 1.0
    # Returned once both replicas serve, one on each worker.
    assert [held(w) for w in workers] in ([[(uid, 0)], [(uid, 1)]], [[(uid, 1)], [(uid, 0)]])
    assert all(r.status == "ready" for w in workers for r in w.models[uid].replicas.values())
    for index in (0, 1):
        mine = [e for e in events if e.replica_index == index]
        stages = [e.stage for e in mine]
        assert stages[0] == "placing" and "loading" in stages and stages[-1] == "ready", stages
        fractions = [e.fraction for e in mine if e.stage == "loading" and e.fraction is not None]
        assert len(fractions) >= 5 and fractions == sorted(fractions), fractions
    final = events[-1]
    assert (final.stage, final.status, final.replica_index) == ("ready", "ready", None)


async def test_wait_false_returns_at_once(pool: tuple[AsyncClient, list[Worker]]) -> None:
    client, _ = pool
    await client.register_model("LLM", echo_definition("loads", "echo:?load=2"))
    started = time.monotonic()
    uid = await client.launch_model("loads", wait=False)
    assert time.monotonic() - started < 1.0
    assert (await client.describe_model(uid))["status"] == "launching"

    async def ready() -> bool:
        return (await client.describe_model(uid))["status"] == "ready"

    await eventually_despite_errors(ready, "the launch to finish in the background", timeout=20)


async def test_a_launch_cancelled_while_loading_leaves_nothing_behind(
    pool: tuple[AsyncClient, list[Worker]],
) -> None:
    client, workers = pool
    await client.register_model("LLM", echo_definition("slow-load", "echo:?load=60"))
    # A caller waiting on the launch hears that it was cancelled.
    launch = asyncio.create_task(client.launch_model("slow-load", replica=2, progress=False))

    async def loading_everywhere() -> bool:
        return all(w._pending for w in workers)

    await eventually_despite_errors(loading_everywhere, "both workers to be loading")
    started = time.monotonic()
    await client.terminate_model("slow-load")
    with pytest.raises(Conflict, match="terminated while loading"):
        await within(launch, "the cancelled launch to return")

    async def nothing_left() -> bool:
        return all(held(w) == [] for w in workers)

    await eventually_despite_errors(nothing_left, "the workers to drop the cancelled loads", timeout=10)
    # Cancelled within a progress tick, not after the 60 s load.
    assert time.monotonic() - started < 10
    assert await client.list_models() == {}
    with pytest.raises(NotFound):
        await client.describe_model("slow-load")

    async def heartbeats_empty() -> bool:
        return all(not x["replicas"] for x in await client.list_workers())

    await eventually_despite_errors(heartbeats_empty, "the heartbeats to show no replica")
    # The uid is free again.
    await client.register_model("LLM", echo_definition("quick"))
    assert await client.launch_model("quick", model_uid="slow-load", progress=False) == "slow-load"


async def test_terminate_frees_the_replicas_on_every_worker(pool: tuple[AsyncClient, list[Worker]]) -> None:
    client, workers = pool
    await client.register_model("LLM", echo_definition("echo"))
    uid = await client.launch_model("echo", replica=2, progress=False)
    replicas: list[Any] = [r for w in workers for r in w.models[uid].replicas.values()]
    assert len(replicas) == 2
    await client.terminate_model(uid)
    assert [held(w) for w in workers] == [[], []]
    assert all(r.status == "closed" and r.engine is None for r in replicas)
    with pytest.raises(NotFound):
        await (await client.get_model(uid)).generate("hi")  # type: ignore[union-attr]
