"""A worker's side of models that stop when idle: the idleness its heartbeats report, the
terminate that says ``if_idle_for`` (refused with a 409 while a request runs or came too
recently, so that an idle stop ends no request), and the memory a ``memory_limit`` offers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import nats.errors
import pytest

from broker_client import Conflict
from tests.support.waits import eventually, within
from tests.support.worker import Harness, llm_definition, running_harness


@pytest.fixture
async def harness(nats_url: str, unique: str) -> AsyncIterator[Harness]:
    async with running_harness(nats_url, f"i{unique}", memory_limit=10**9) as h:
        yield h


async def test_an_idle_stop_is_refused_while_a_request_runs_or_came_too_recently(harness: Harness) -> None:
    uid = "paced"
    await harness.launch(uid, llm_definition("paced", "echo:?delay=0.05"))
    terminate = harness.subjects.worker(harness.worker.worker_id, "terminate")
    stream = await harness.open_stream(
        harness.subjects.model(uid, "generate"),
        {"prompt": "a b c d e f g h", "generate_config": {"stream": True}},
    )
    await within(stream.get(), "the first chunk")
    replica = harness.worker.models[uid].replicas[0]
    assert replica.info().idle_for == 0.0  # busy: never idle
    with pytest.raises(Conflict, match=r"1 request\(s\) in flight.*if_idle_for 0 s"):
        await harness.transport.request(terminate, {"model_uid": uid, "if_idle_for": 0}, timeout=10)
    # The request it refused for runs to its end, untouched.
    rest = await harness.read_to_end(stream)
    assert [json.loads(m.data)["choices"][0]["text"] for m in rest[:-1]][-1].strip() == "h"

    async def idle() -> bool:
        return (replica.info().idle_for or 0) > 0

    await eventually(idle, "the replica to report idleness")
    with pytest.raises(Conflict, match=r"less than if_idle_for 3600 s"):
        await harness.transport.request(terminate, {"model_uid": uid, "if_idle_for": 3600}, timeout=10)
    assert harness.worker.models[uid].replicas[0] is replica

    # Idle long enough: stopped, its subjects gone.
    assert await harness.transport.request(terminate, {"model_uid": uid, "if_idle_for": 0}, timeout=10) == {}
    assert uid not in harness.worker.models
    with pytest.raises(nats.errors.NoRespondersError):
        await harness.nc.request(harness.subjects.model(uid, "generate"), b'{"prompt": "hi"}', timeout=10)


async def test_memory_limit_caps_what_the_heartbeat_offers_less_what_replicas_take(harness: Harness) -> None:
    [cpu] = [d for d in harness.worker.info().devices if d.name == "cpu"]
    assert cpu.total_memory <= 10**9 and cpu.free_memory <= 10**9
    await harness.launch("heavy", llm_definition("heavy", "echo:?memory=3e8"))
    [cpu] = [d for d in harness.worker.info().devices if d.name == "cpu"]
    assert cpu.free_memory <= 7 * 10**8
    [replica] = harness.worker.info().replicas
    assert replica.memory_bytes == 3 * 10**8
