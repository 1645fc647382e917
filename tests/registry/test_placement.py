"""Placement by memory, and what the registry does when a worker dies: the registry with fake
workers that beat, fall silent and join. The estimate and the placement rules alone are
tests/unit/test_registry_memory.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client as NATS

from broker_client import NotFound, Subjects, Unavailable
from broker_client.runtime import Transport
from registry_service import Registry
from registry_service.memory import GIB, estimate_bytes, format_bytes
from tests.support.registry import (
    TIMEOUT,
    FakeWorker,
    definition,
    register,
    subscribed,
    until_worker_seen,
)
from tests.support.waits import eventually

# ---------------------------------------------------------------------------- the registry


@pytest.fixture
def registry_options() -> dict[str, Any]:
    # A dead window of 1 s; replicas are judged 0.3 s after start.
    return {"heartbeat_dead_after": 1.0, "resync_window": 0.3}


@pytest.fixture
def worker_options() -> dict[str, Any]:
    # Workers that beat on their own, five times a second: silenced, they die within the window.
    return {"beating": True, "heartbeat_interval": 0.2}


@contextlib.asynccontextmanager
async def worker_notices(nc: NATS, subjects: Subjects) -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def on_msg(msg: Any) -> None:
        seen.append(msgpack.unpackb(msg.data))

    sub = await nc.subscribe(subjects.workers_events, cb=on_msg)
    await subscribed(nc)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


async def silence(w: FakeWorker) -> None:
    """The worker dies: no more heartbeats, no more answers."""
    await w.stop()


async def describe(transport: Transport, subjects: Subjects, uid: str) -> dict[str, Any]:
    reply: dict[str, Any] = await transport.request(
        subjects.models_describe, {"model_uid": uid}, timeout=TIMEOUT
    )
    return reply


async def test_a_launch_nothing_can_hold_fails_at_once_naming_the_need(
    registry: Registry,
    transport: Transport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"huge-{unique}"
    await register(transport, subjects, name)
    w = await workers(free_memory=20 * GIB)
    await until_worker_seen(transport, subjects, w.worker_id)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await transport.request(
            subjects.models_launch,
            {"model_name": name, "model_size_in_billions": 2, "quantization": "4-bit", "replica": 5},
            timeout=TIMEOUT,
        )
    # Five replicas of 5.2 GiB: three fit on the worker's 20 GiB GPU, the fourth does not.
    assert time.monotonic() - started < 2
    assert "replica 3 of" in info.value.message and "needs about 5.2 GiB on a GPU" in info.value.message
    assert w.launches == []
    # The seed's model at 1000B: nothing anywhere.
    huge = definition(
        f"t{unique}",
        model_specs=[
            {
                "model_format": "pytorch",
                "model_size_in_billions": 1000,
                "quantizations": ["4-bit"],
                "model_id": "org/huge",
            }
        ],
    )
    await transport.request(subjects.registry_register, {"model_type": "LLM", "model": huge}, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await transport.request(subjects.models_launch, {"model_name": f"t{unique}"}, timeout=TIMEOUT)
    assert time.monotonic() - started < 2
    need = estimate_bytes(
        {"model_size_in_billions": 1000}, quantization="4-bit", device_kind="cuda", context_length=2048
    )
    assert f"needs about {format_bytes(need)} on a GPU" in info.value.message
    assert f"most free memory seen is 20.0 GiB (cuda:0 of worker '{w.worker_id}')" in info.value.message
    assert w.launches == []
    with pytest.raises(NotFound):
        await describe(transport, subjects, f"t{unique}")


async def test_a_dead_workers_replica_moves_to_a_worker_with_room(
    registry: Registry,
    nc: NATS,
    transport: Transport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    a = await workers(free_memory=40 * GIB)
    tiny = await workers(free_memory=2 * GIB)  # alive, but too small for the 5.2 GiB replica
    b = await workers(free_memory=20 * GIB)
    for w in (a, tiny, b):
        await until_worker_seen(transport, subjects, w.worker_id)
    await transport.request(
        subjects.models_launch, {"model_name": name, "worker_id": a.worker_id}, timeout=TIMEOUT
    )

    async with worker_notices(nc, subjects) as seen:
        await silence(a)

        async def moved() -> dict[str, Any] | None:
            d = await describe(transport, subjects, name)
            [r] = d["replicas"]
            return d if r["worker_id"] == b.worker_id and r["status"] == "ready" else None

        described = await eventually(moved, "the replica to move to worker b", TIMEOUT)
        assert described["status"] == "ready"

        # The notice comes on its own subject: it may reach this connection after the reply.
        async def noticed() -> dict[str, Any] | None:
            return next((n for n in seen if n["worker_id"] == a.worker_id), None)

        notice = await eventually(noticed, f"the notice that worker {a.worker_id} is dead", TIMEOUT)
        assert {"worker_id": a.worker_id, "state": "dead"}.items() <= notice.items()
    [command] = b.launches
    assert (command.model_uid, command.replica_index) == (name, 0)
    assert tiny.launches == []
    listed = await transport.request(subjects.workers_list, {}, timeout=TIMEOUT)
    [dead] = [x for x in listed["workers"] if x["worker_id"] == a.worker_id]
    assert (dead["alive"], dead["state"]) == (False, "dead")


async def test_a_moved_replica_is_launched_with_every_option_of_its_launch(
    registry: Registry,
    transport: Transport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    a = await workers(free_memory=40 * GIB)
    b = await workers(free_memory=40 * GIB)
    for w in (a, b):
        await until_worker_seen(transport, subjects, w.worker_id)
    options = {"request_limits": 3, "max_batch_size": 4, "max_tokens_limit": 5, "rate_limit": 2.5}
    await transport.request(
        subjects.models_launch, {"model_name": name, "worker_id": a.worker_id, **options}, timeout=TIMEOUT
    )
    [first] = a.launches
    await silence(a)

    async def launched_on_b() -> bool:
        return bool(b.launches)

    await eventually(launched_on_b, "the replica to be launched again on worker b", TIMEOUT)
    [again] = b.launches
    # The command is rebuilt from the model's row in SQL: the same in every field but the device.
    assert again.model_dump(exclude={"device"}) == first.model_dump(exclude={"device"})
    assert {k: getattr(again, k) for k in options} == options


async def test_with_no_room_left_the_replica_fails_with_the_reason_until_a_worker_joins(
    registry: Registry,
    transport: Transport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    a = await workers(free_memory=40 * GIB)
    small = await workers(free_memory=2 * GIB)
    for w in (a, small):
        await until_worker_seen(transport, subjects, w.worker_id)
    await transport.request(
        subjects.models_launch, {"model_name": name, "worker_id": a.worker_id}, timeout=TIMEOUT
    )
    await silence(a)

    async def failed() -> dict[str, Any] | None:
        d = await describe(transport, subjects, name)
        return d if d["status"] == "failed" else None

    described = await eventually(failed, "the model to be marked failed", TIMEOUT)
    [replica] = described["replicas"]
    assert replica["status"] == "failed"
    assert f"worker {a.worker_id!r} died" in replica["error"]
    assert "no live worker has room" in replica["error"] and "needs about 5.2 GiB" in replica["error"]
    assert replica["error"] in described["error"]
    assert small.launches == []

    # A worker with room joins: the failed replica is placed on it.
    c = await workers(free_memory=40 * GIB)

    async def ready() -> dict[str, Any] | None:
        d = await describe(transport, subjects, name)
        return d if d["status"] == "ready" and d["replicas"][0]["worker_id"] == c.worker_id else None

    await eventually(ready, "the replica to be placed on the new worker", TIMEOUT)
    assert len(c.launches) == 1
