"""Models that start on demand and stop when idle, on a real registry and real workers in this
process: a model launched with ``min_replicas=0`` loads nothing, its first request (over raw
nats-py, the natserve client) starts it and is answered; once idle past its timeout it has no
replica again, and the next request starts it again; held requests past the bound get a 429;
a launch that does not fit a worker's memory evicts the least recently used idle model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from broker_client import AsyncClient, codec
from tests.support.pool import echo_definition
from tests.support.system import running_registry_and_workers
from tests.support.waits import eventually, within
from workers import Worker


@pytest.fixture
async def pool(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"od{unique}",
        [f"w-{unique}"],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
    ) as (client, workers):
        yield client, workers


def replicas(worker: Worker, uid: str) -> list[int]:
    served = worker.models.get(uid)
    return sorted(served.replicas) if served is not None else []


async def raw_request(nats_url: str, subject: str, body: dict[str, Any], timeout: float = 30) -> Any:
    """A plain nats-py request, as another service (or `nats req`) would send it."""
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    finally:
        await nc.close()
    assert not (msg.headers or {}).get("Nats-Service-Error-Code"), (msg.headers, msg.data)
    return json.loads(msg.data)


async def test_scale_to_zero_first_request_starts_it_idle_stops_it_next_starts_it_again(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = pool
    await client.register_model("LLM", echo_definition("lazy", "echo:?load=0.3"))
    events: list[dict[str, Any]] = []
    watcher = await nats.connect(nats_url)

    async def on_event(msg: Any) -> None:
        events.append(codec.decode(msg.data, codec.detect(msg.data, msg.headers)))

    await watcher.subscribe(client.subjects.events("lazy"), cb=on_event)
    await watcher.flush()
    uid = await client.launch_model("lazy", min_replicas=0, idle_timeout=1.0, progress=False)
    # Launched, scaled to zero: nothing loaded anywhere.
    assert replicas(worker, uid) == []
    described = await client.describe_model(uid)
    assert (described["state"], described["min_replicas"], described["idle_timeout"]) == (
        "scaled_to_zero",
        0,
        1.0,
    )
    assert described["replicas"] == []

    # The first request, over raw NATS: one slow reply, not an error.
    reply = await within(
        raw_request(nats_url, f"{client.subjects.prefix}.model.{uid}.generate", {"prompt": "a b c"}),
        "the first request to a model scaled to zero",
    )
    assert reply["choices"][0]["text"].split() == ["a", "b", "c"]
    assert replicas(worker, uid) == [0]
    assert (await client.describe_model(uid))["state"] == "running"

    # Idle past its timeout: the model has no replica again.
    async def gone() -> bool:
        return replicas(worker, uid) == [] and (await client.describe_model(uid))["state"] == "scaled_to_zero"

    await eventually(gone, "the idle replica to stop", timeout=20)

    # The next request, through the natserve client, starts it again.
    model = await client.get_model(uid)
    out = await within(model.generate("x y", {"max_tokens": 2}), "the request that starts it again")
    assert out["choices"][0]["text"].split() == ["x", "y"]
    assert replicas(worker, uid) == [0]

    # Each start and stop said why.
    async def reasons() -> list[str]:
        said = [e.get("reason") for e in events if e.get("reason")]
        return said if said.count("on_demand") >= 4 and "idle_timeout" in said else []

    await eventually(reasons, "the events of two starts and one idle stop", timeout=10)
    why = [(e["stage"], e.get("reason")) for e in events if e.get("reason")]
    assert why[0] == ("ready", "scaled_to_zero"), why
    assert ("starting", "on_demand") in why and ("terminated", "idle_timeout") in why, why
    assert ("scaled_to_zero", "idle_timeout") in why, why
    assert [s for s, r in why if r == "on_demand"].count("starting") == 2, why
    await watcher.close()
