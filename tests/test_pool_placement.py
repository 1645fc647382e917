"""Placement by memory, and what the registry does when a worker dies: the estimate (pure), the
placement rules (pure), then the registry with fake workers that beat, fall silent and join."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client as NATS

from broker_client import DeviceInfo, NotFound, Subjects, Unavailable, WorkerInfo
from broker_client.runtime import Transport
from registry_service import Registry
from registry_service.memory import GIB, estimate_bytes, format_bytes
from registry_service.placement import place_replicas
from tests._registry import (
    TIMEOUT,
    FakeWorker,
    definition,
    eventually,
    register,
    subscribed,
    until_worker_seen,
)

# ---------------------------------------------------------------------------- the estimate


def spec(size: float, **extra: Any) -> dict[str, Any]:
    return {"model_format": "pytorch", "model_size_in_billions": size, "model_id": "org/m", **extra}


def test_weights_follow_the_quantization_and_the_device() -> None:
    def need(q: str, kind: str) -> int:
        return estimate_bytes(spec(7), quantization=q, device_kind=kind, model_type="embedding")

    # Weights and overhead only for an embedding model: 2 B/param fp16 on a GPU, fp32 on the CPU.
    assert abs(need("none", "cpu") - 2 * (need("none", "cuda") - (512 << 20))) <= 2
    assert need("8-bit", "cuda") < need("none", "cuda") / 1.6
    assert need("4-bit", "cuda") < need("8-bit", "cuda") / 1.4
    assert 7e9 * 2 < need("none", "cuda") < 7e9 * 2 * 1.3


def test_the_kv_cache_grows_with_the_context_and_the_batch() -> None:
    def need(**kw: Any) -> int:
        return estimate_bytes(spec(8), quantization="none", device_kind="cuda", **kw)

    assert need(context_length=1024) < need(context_length=2048)
    # The static engine's KV length is capped at 2048 positions per slot.
    assert need(context_length=2048) == need(context_length=32768)
    assert need(context_length=2048, max_batch_size=8) < need(context_length=2048, max_batch_size=32)
    # An 8B fp16 model with 32 slots of 2048 tokens: ~27 GiB (the real Llama 3 8B: ~25 GiB).
    assert 24 * GIB < need(context_length=8192) < 30 * GIB


def test_echo_and_unsized_models_need_nothing() -> None:
    assert estimate_bytes(spec(70, model_uri="echo:"), quantization="none", device_kind="cuda") == 0
    assert estimate_bytes({"model_id": "org/m"}, quantization="none", device_kind="cuda") == 0


# ---------------------------------------------------------------------------- placement


def worker(worker_id: str, *gpus: float, cpu: float = 8, status: str | None = None) -> WorkerInfo:
    devices = [
        DeviceInfo(name=f"cuda:{i}", kind="cuda", total_memory=80 * GIB, free_memory=int(free * GIB))
        for i, free in enumerate(gpus)
    ]
    devices.append(DeviceInfo(name="cpu", kind="cpu", total_memory=64 * GIB, free_memory=int(cpu * GIB)))
    extra = {"status": status} if status else {}
    return WorkerInfo.model_validate(
        {
            "worker_id": worker_id,
            "host": "h",
            "pid": 1,
            "version": "0",
            "devices": devices,
            "started_at": 0,
            "last_seen": 0,
            "heartbeat_interval": 2,
            **extra,
        }
    )


def gib(n: float) -> Callable[[str], int]:
    return lambda kind: int(n * GIB)


def test_replicas_go_where_they_fit() -> None:
    alive = [worker("big", 30), worker("small", 6)]
    # 10 GiB fits on big only: both replicas there, one per worker when it can.
    assert [p.worker_id for p in place_replicas(alive, 2, need=gib(10))] == ["big", "big"]
    assert [p.worker_id for p in place_replicas(alive, 2, need=gib(5))] == ["big", "small"]
    # What this registry promised to replicas still loading counts as taken.
    with pytest.raises(Unavailable, match=r"most free memory seen is 6\.0 GiB"):
        place_replicas(alive, 1, need=gib(10), reserved={("big", "cuda:0"): 25 * GIB})
    # And one launch's replicas count against each other.
    assert [p.worker_id for p in place_replicas([worker("one", 25)], 2, need=gib(10))] == ["one", "one"]
    with pytest.raises(Unavailable, match="replica 2"):
        place_replicas([worker("one", 25)], 3, need=gib(10))


def test_replicas_of_one_model_go_to_different_workers_while_there_are_enough() -> None:
    alive = [worker("a", 30), worker("b", 20), worker("c", 10)]
    # A launch spreads its replicas, whatever the memory says.
    assert sorted(p.worker_id for p in place_replicas(alive, 3, need=gib(5))) == ["a", "b", "c"]
    # A re-placed replica counts the siblings it still has: replica 1, lost, while replica 0 is
    # on a (the most free memory), goes to b; with siblings on a and b, to c.
    [p] = place_replicas(alive, 1, need=gib(5), first_index=1, siblings={"a": 1})
    assert (p.replica_index, p.worker_id) == (1, "b")
    [p] = place_replicas(alive, 1, need=gib(5), first_index=2, siblings={"a": 1, "b": 1})
    assert p.worker_id == "c"
    # A preference: with room only beside a sibling, it shares that worker rather than fail.
    [p] = place_replicas(alive, 1, need=gib(25), first_index=1, siblings={"a": 1})
    assert p.worker_id == "a"
    # And with every worker holding one, the one with the most room takes the next.
    [p] = place_replicas(alive, 1, need=gib(5), first_index=3, siblings={"a": 1, "b": 1, "c": 1})
    assert p.worker_id == "a"


def test_nothing_has_room_names_the_need_and_the_most_free_memory() -> None:
    alive = [worker("a", 20), worker("b", 40), worker("c", cpu=100)]
    with pytest.raises(Unavailable) as info:
        place_replicas(alive, 1, need=gib(767.1), what="'huge' (1000B parameters, 4-bit)")
    message = info.value.message
    assert "replica 0 of 'huge' (1000B parameters, 4-bit)" in message
    # The device with the most free memory is c's CPU (a CPU-only worker is a candidate too).
    assert "needs about 767.1 GiB on the CPU" in message
    assert "most free memory seen is 100.0 GiB (cpu of worker 'c')" in message
    with pytest.raises(
        Unavailable, match=r"on a GPU; the most free memory seen is 40.0 GiB \(cuda:0 of worker 'b'\)"
    ):
        place_replicas(alive[:2], 1, need=gib(767.1))


def test_stopping_workers_take_no_replicas() -> None:
    alive = [worker("leaving", 80, status="stopping"), worker("staying", 10)]
    assert [p.worker_id for p in place_replicas(alive, 2)] == ["staying", "staying"]
    with pytest.raises(Unavailable, match="is stopping"):
        place_replicas(alive, 1, worker_id="leaving")


def test_a_pinned_worker_without_room_is_a_503() -> None:
    with pytest.raises(Unavailable, match=r"needs about 50\.0 GiB"):
        place_replicas([worker("a", 80), worker("b", 10)], 1, worker_id="b", need=gib(50))


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

        described = await eventually(moved, "the replica to move to worker b")
        assert described["status"] == "ready"
        assert {"worker_id": a.worker_id, "state": "dead"}.items() <= next(
            n for n in seen if n["worker_id"] == a.worker_id
        ).items()
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

    await eventually(launched_on_b, "the replica to be launched again on worker b")
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

    described = await eventually(failed, "the model to be marked failed")
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

    await eventually(ready, "the replica to be placed on the new worker")
    assert len(c.launches) == 1
