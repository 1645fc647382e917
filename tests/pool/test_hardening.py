"""Hostile and oversized requests against a pool of real processes: each is answered with an
error within its timeout, naming what is wrong.

One nats-server (the default ``max_payload`` of 1 MiB), one ``natserve registry`` and one
``natserve worker`` process for the module, serving an echo model; each test talks to them with a
raw nats-py connection, as any service (or `nats req`) would.

- An error reply larger than ``max_payload`` (a validation error listing 30,000 bad chat
  messages, or 60,000 unknown keys of a launch) is cut to fit, not dropped.
- A worker's launch command has the registry's bounds: ``max_batch_size -1`` is a 400, not a
  500; ``request_limits -1``, ``replica_index 2**63`` and device ``"cpu; rm -rf /"`` are 400s.
- The wire types are strict: ``max_tokens: "5"``, ``max_tokens: true``, ``stream: "yes"`` and a
  ``context_length`` of 1e18 are 400s naming the field.
- A definition above 256 KiB, or with 20,000 specs, is refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client as NATS

from broker_client import MAX_DEFINITION_BYTES, Subjects
from tests.support.nats_server import NatsServer
from tests.support.pool import Pool, echo_definition

pytestmark = pytest.mark.slow

# Generous: an error is answered in milliseconds; this only turns a dropped reply into a failure.
TIMEOUT = 10.0
UID = "hard"


class HardPool:
    """The module's registry and worker processes, their prefix and subjects."""

    def __init__(self, pool: Pool, worker_id: str) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.subjects = Subjects(pool.prefix)


@pytest.fixture(scope="module")
def hard(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardPool]:
    tmp = tmp_path_factory.mktemp("hard")
    prefix = f"hard{tmp.name[-6:].replace('-', '')}"
    pool = Pool(Path(tmp), nats_server.url, prefix)
    worker_id = f"hw-{prefix}"
    try:
        registry = pool.registry(NATSERVE_WARM_UP="0")
        worker = pool.worker(worker_id, NATSERVE_WARM_UP="0")
        hard = HardPool(pool, worker_id)

        async def start() -> None:
            await asyncio.gather(registry.wait_ready(), worker.wait_ready())
            nc = await nats.connect(nats_server.url)
            try:
                s = hard.subjects
                for _ in range(200):  # the registry hears the worker's first beat within a second
                    workers = json.loads((await nc.request(s.workers_list, b"{}", timeout=TIMEOUT)).data)
                    if any(w["worker_id"] == worker_id for w in workers["workers"]):
                        break
                    await asyncio.sleep(0.05)  # bounded poll of an observable state
                body = {"model_type": "LLM", "model": echo_definition(UID)}
                reply = await nc.request(s.registry_register, json.dumps(body).encode(), timeout=TIMEOUT)
                assert not reply.headers, reply.data
                launch = {"model_name": UID, "worker_id": worker_id}
                reply = await nc.request(s.models_launch, json.dumps(launch).encode(), timeout=30)
                assert not reply.headers, reply.data
            finally:
                await nc.close()

        asyncio.run(start())
        yield hard
    finally:
        pool.close()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def error_of(nc: NATS, subject: str, body: Any, *, encoding: str = "json") -> tuple[int, str, int]:
    """The error a request gets: its code, message and reply size; fails if it gets none in time."""
    if encoding == "json":
        data, headers = json.dumps(body).encode(), None
    else:
        data, headers = msgpack.packb(body), {"Content-Type": "application/msgpack"}
    try:
        msg = await nc.request(subject, data, timeout=TIMEOUT, headers=headers)
    except TimeoutError:
        pytest.fail(f"no reply on {subject} within {TIMEOUT:g} s: the error was dropped")
    assert msg.headers and "Nats-Service-Error-Code" in msg.headers, f"not an error: {msg.data[:300]!r}"
    error = (json.loads(msg.data) if encoding == "json" else msgpack.unpackb(msg.data))["error"]
    assert str(error["code"]) == msg.headers["Nats-Service-Error-Code"]
    return int(error["code"]), error["message"], len(msg.data)


# ---------------------------------------------------------------------------- item 1


async def test_a_chat_error_above_max_payload_reaches_the_caller_cut_to_fit(hard: HardPool, nc: NATS) -> None:
    messages = [{"role": n} for n in range(30_000)]  # each role a number: 30,000 errors
    code, message, size = await error_of(nc, hard.subjects.model(UID, "chat"), {"messages": messages})
    assert code == 400
    assert message.startswith("invalid request: messages[0].role: ")
    assert "more characters cut" in message
    assert size <= nc.max_payload


async def test_a_registry_error_above_max_payload_reaches_the_caller_cut_to_fit(
    hard: HardPool, nc: NATS
) -> None:
    launch: dict[str, Any] = {"model_name": UID, **{f"k{n}": n for n in range(60_000)}}
    for encoding in ("json", "msgpack"):
        code, message, size = await error_of(nc, hard.subjects.models_launch, launch, encoding=encoding)
        assert code == 400 and "unknown field" in message and "more characters cut" in message
        assert size <= nc.max_payload


@pytest.mark.parametrize(
    ("what", "names"),
    [
        ("a generate with 30,000 stop strings", "generate_config.stop"),
        # 450 KB of specs: above the bound of a definition's size before its specs are read.
        ("a register of 20,000 invalid specs", "model: the definition takes"),
    ],
)
async def test_the_examples_of_the_issue_are_short_400s(
    hard: HardPool, nc: NATS, what: str, names: str
) -> None:
    s = hard.subjects
    if what.startswith("a generate"):
        subject = s.model(UID, "generate")
        body: dict[str, Any] = {"prompt": "hi", "generate_config": {"stop": [f"s{n}" for n in range(30_000)]}}
    else:
        definition = echo_definition("specs")
        definition["model_specs"] = [{"model_format": "bad"}] * 20_000
        subject, body = s.registry_register, {"model_type": "LLM", "model": definition}
    code, message, _ = await error_of(nc, subject, body)
    assert code == 400 and names in message and "at most" in message, message


# ---------------------------------------------------------------------------- item 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", -1),
        ("request_limits", -1),
        ("replica_index", 2**63),
        ("device", "cpu; rm -rf /"),
        ("model_uid", "a.b"),
        ("max_batch_size", 10**9),
    ],
)
async def test_a_worker_launch_command_has_the_registrys_bounds(
    hard: HardPool, nc: NATS, field: str, value: Any
) -> None:
    definition = echo_definition("bounded")
    command = {
        "model_uid": "bounded",
        "model_type": "LLM",
        "model_name": "bounded",
        "definition": definition,
        "spec": definition["model_specs"][0],
        field: value,
    }
    code, message, _ = await error_of(nc, hard.subjects.worker(hard.worker_id, "launch"), command)
    assert code == 400, message
    assert field in message
    # Nothing was launched: the worker reports no replica of it.
    reply = await nc.request(hard.subjects.worker(hard.worker_id, "info"), b"{}", timeout=TIMEOUT)
    assert "bounded" not in {r["model_uid"] for r in json.loads(reply.data)["replicas"]}


# ---------------------------------------------------------------------------- item 5


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"max_tokens": "5"}, "generate_config.max_tokens"),
        ({"max_tokens": True}, "generate_config.max_tokens"),
        ({"max_tokens": 5.0}, "generate_config.max_tokens"),
        ({"stream": "yes"}, "generate_config.stream"),
        ({"temperature": "0.5"}, "generate_config.temperature"),
        ({"seed": 2**64}, "generate_config.seed"),
    ],
)
async def test_a_value_of_the_wrong_type_is_a_400_naming_it(
    hard: HardPool, nc: NATS, config: dict[str, Any], field: str
) -> None:
    for encoding in ("json", "msgpack"):
        if encoding == "msgpack" and config.get("seed") == 2**64:
            continue  # msgpack carries at most 64 bits
        body = {"prompt": "hi", "generate_config": config}
        code, message, _ = await error_of(nc, hard.subjects.model(UID, "generate"), body, encoding=encoding)
        assert code == 400 and field in message, message


@pytest.mark.parametrize("context_length", [1e18, 10**18, 1e30, "2048", True])
async def test_a_definition_takes_no_coerced_or_huge_numbers(
    hard: HardPool, nc: NATS, context_length: Any
) -> None:
    definition = {**echo_definition("ctx"), "context_length": context_length}
    body = {"model_type": "LLM", "model": definition}
    code, message, _ = await error_of(nc, hard.subjects.registry_register, body)
    assert code == 400 and "context_length" in message, message
    reply = await nc.request(hard.subjects.registry_list, b"{}", timeout=TIMEOUT)
    assert "ctx" not in {r["model_name"] for r in json.loads(reply.data)["registrations"]}


# ---------------------------------------------------------------------------- item 10


async def test_a_definition_above_the_bound_is_refused(hard: HardPool, nc: NATS) -> None:
    s = hard.subjects
    big = {**echo_definition("big"), "chat_template": "x" * (MAX_DEFINITION_BYTES + 1)}
    for model in (big, json.dumps(big)):
        code, message, _ = await error_of(nc, s.registry_register, {"model_type": "LLM", "model": model})
        assert code == 400 and f"at most {MAX_DEFINITION_BYTES}" in message, message
    many = {**echo_definition("langs"), "model_lang": ["en"] * 10_000}
    code, message, _ = await error_of(nc, s.registry_register, {"model_type": "LLM", "model": many})
    assert code == 400 and "model_lang" in message, message
    reply = await nc.request(s.registry_list, b"{}", timeout=TIMEOUT)
    assert {"big", "langs"}.isdisjoint(r["model_name"] for r in json.loads(reply.data)["registrations"])
