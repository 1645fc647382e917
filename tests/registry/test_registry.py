"""The registry service against a real nats-server and real databases.

Requests go out the way users send them: raw nats-py requests with a JSON body and no headers
(what ``nats req`` does), msgpack with a Content-Type, and broker_client's ``NatsTransport``.
Launch, terminate and describe run against ``FakeWorker`` (``tests/support/registry.py``, with the
fixtures): a few NATS subscriptions that answer ``worker.<id>.launch|terminate`` and publish
heartbeats, enough to test the registry layer alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client as NATS

from broker_client import (
    BadRequest,
    Conflict,
    NotFound,
    ReplicaInfo,
    Subjects,
    Unavailable,
    WorkerLaunch,
)
from broker_client.codec import MSGPACK
from broker_client.runtime import NatsTransport
from registry_service import Registry
from tests.support.registry import (
    GIB,
    TIMEOUT,
    FakeWorker,
    definition,
    raw_json,
    register,
    until_worker_seen,
    watch,
)
from tests.support.waits import eventually, within

# ---------------------------------------------------------------------------- registrations


async def test_register_list_get_unregister_as_nats_req(
    registry: Registry, nc: NATS, subjects: Subjects, unique: str
) -> None:
    name = f"m-{unique}"
    body = json.dumps({"model_type": "LLM", "model": definition(name), "persist": True}).encode()
    headers, reply = await raw_json(nc, subjects.registry_register, body)
    assert reply == {"model_type": "LLM", "model_name": name}
    # A successful reply has no headers: its body is in the request's encoding (JSON here).
    assert headers == {}

    _, listed = await raw_json(nc, subjects.registry_list, b'{"model_type": "LLM"}')
    [entry] = listed["registrations"]
    assert entry["model_name"] == name
    assert entry["model_type"] == "LLM"
    assert entry["persist"] is True
    assert entry["model_ability"] == ["generate"]
    assert entry["context_length"] == 2048
    _, none_of_type = await raw_json(nc, subjects.registry_list, b'{"model_type": "embedding"}')
    assert none_of_type == {"registrations": []}
    # An empty body means "no parameters": every type.
    _, everything = await raw_json(nc, subjects.registry_list, b"")
    assert [r["model_name"] for r in everything["registrations"]] == [name]

    _, got = await raw_json(nc, subjects.registry_get, json.dumps({"model_name": name}).encode())
    assert got["model_name"] == name
    assert got["model_type"] == "LLM"
    assert got["persist"] is True
    assert got["model_specs"][0]["model_id"] == "NumbersStation/nsql-2B"
    assert got["model_specs"][0]["quantizations"] == ["4-bit", "8-bit", "none"]

    unregister = json.dumps({"model_type": "LLM", "model_name": name}).encode()
    assert (await raw_json(nc, subjects.registry_unregister, unregister))[1] == {}
    headers, error = await raw_json(nc, subjects.registry_get, unregister)
    assert headers["Nats-Service-Error-Code"] == "404"
    assert error["error"]["type"] == "NotFound"
    assert repr(name) in error["error"]["message"]
    headers, _ = await raw_json(nc, subjects.registry_unregister, unregister)
    assert headers["Nats-Service-Error-Code"] == "404"


async def test_msgpack_request_gets_a_msgpack_reply(
    registry: Registry, nc: NATS, subjects: Subjects, unique: str
) -> None:
    name = f"m-{unique}"
    payload = msgpack.packb({"model_type": "LLM", "model": definition(name)})
    msg = await nc.request(
        subjects.registry_register, payload, timeout=TIMEOUT, headers={"Content-Type": MSGPACK}
    )
    assert not msg.headers, "a successful reply is in the request's encoding, without headers"
    assert msgpack.unpackb(msg.data) == {"model_type": "LLM", "model_name": name}
    # Undeclared msgpack is recognised too: its first byte is not '{' or '['.
    msg = await nc.request(subjects.registry_list, msgpack.packb({}), timeout=TIMEOUT)
    assert [r["model_name"] for r in msgpack.unpackb(msg.data)["registrations"]] == [name]


async def test_duplicate_registration_is_a_409_naming_it(
    registry: Registry, transport: NatsTransport, subjects: Subjects, unique: str
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    with pytest.raises(Conflict) as info:
        await register(transport, subjects, name)
    assert repr(name) in info.value.message and info.value.code == 409
    # The same name under another type is a different registration.
    embedding = {"model_name": name, "model_id": "BAAI/bge-small-en"}
    reply = await transport.request(
        subjects.registry_register, {"model_type": "embedding", "model": embedding}, timeout=TIMEOUT
    )
    assert reply == {"model_type": "embedding", "model_name": name}


async def test_malformed_json_is_a_400_with_headers_and_body(
    registry: Registry, nc: NATS, subjects: Subjects
) -> None:
    headers, body = await raw_json(nc, subjects.registry_register, b'{"model_type": "LLM", ')
    assert headers["Nats-Service-Error-Code"] == "400"
    assert "malformed JSON" in headers["Nats-Service-Error"]
    assert "\n" not in headers["Nats-Service-Error"]
    assert body["error"]["type"] == "BadRequest"
    assert body["error"]["code"] == 400
    assert body["error"]["message"].startswith("malformed JSON body")


async def test_msgpack_garbage_is_a_400(registry: Registry, nc: NATS, subjects: Subjects) -> None:
    msg = await nc.request(
        subjects.registry_list, b"\xc1\xc1garbage", timeout=TIMEOUT, headers={"Content-Type": MSGPACK}
    )
    assert msg.headers is not None
    assert msg.headers["Nats-Service-Error-Code"] == "400"
    error = msgpack.unpackb(msg.data)["error"]
    assert error["type"] == "BadRequest" and "malformed msgpack" in error["message"]
    # Undeclared garbage most likely came from a person: the error comes back as JSON.
    headers, body = await raw_json(nc, subjects.registry_list, b"hello registry")
    assert headers["Nats-Service-Error-Code"] == "400"
    assert "malformed msgpack" in body["error"]["message"]


async def test_unknown_keys_and_bad_definitions_are_400s_naming_them(
    registry: Registry, nc: NATS, transport: NatsTransport, subjects: Subjects, unique: str
) -> None:
    name = f"m-{unique}"
    body = json.dumps({"model": definition(name), "persistt": True}).encode()
    headers, error = await raw_json(nc, subjects.registry_register, body)
    assert headers["Nats-Service-Error-Code"] == "400"
    assert "persistt: unknown field" in error["error"]["message"]

    with pytest.raises(BadRequest, match=r"model_specs\[0\]\.quantizations\[0\]"):
        await transport.request(
            subjects.registry_register,
            {
                "model": definition(
                    name,
                    model_specs=[
                        {"model_size_in_billions": 1, "model_id": "a/b", "quantizations": ["2-bit"]}
                    ],
                )
            },
            timeout=TIMEOUT,
        )
    with pytest.raises(BadRequest, match="model_name"):
        await transport.request(
            subjects.registry_register, {"model": definition("has space")}, timeout=TIMEOUT
        )
    with pytest.raises(BadRequest, match="model_type"):
        await transport.request(
            subjects.registry_register,
            {"model_type": "rerank", "model": definition(name)},
            timeout=TIMEOUT,
        )
    with pytest.raises(BadRequest, match="replicas: unknown field"):
        await transport.request(subjects.models_launch, {"model_name": name, "replicas": 2}, timeout=TIMEOUT)
    # Nothing was registered by the failed attempts.
    assert (await transport.request(subjects.registry_list, {}, timeout=TIMEOUT))["registrations"] == []


async def test_launch_of_an_unregistered_model_is_a_404(
    registry: Registry, transport: NatsTransport, subjects: Subjects, unique: str
) -> None:
    name = f"never-{unique}"
    with pytest.raises(NotFound) as info:
        await transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)
    assert repr(name) in info.value.message
    with pytest.raises(NotFound, match="model_type 'embedding'"):
        await transport.request(
            subjects.models_launch, {"model_name": name, "model_type": "embedding"}, timeout=TIMEOUT
        )


async def test_launch_without_a_live_worker_is_a_503(
    registry: Registry, nc: NATS, transport: NatsTransport, subjects: Subjects, unique: str
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    headers, body = await raw_json(nc, subjects.models_launch, json.dumps({"model_name": name}).encode())
    assert headers["Nats-Service-Error-Code"] == "503"
    assert body["error"]["type"] == "Unavailable"
    assert "no live worker" in body["error"]["message"]
    assert (await transport.request(subjects.models_list, {}, timeout=TIMEOUT)) == {"models": {}}
    with pytest.raises(NotFound, match="no worker 'nobody'"):
        await transport.request(
            subjects.models_launch, {"model_name": name, "worker_id": "nobody"}, timeout=TIMEOUT
        )


async def test_persist_true_survives_a_restart_and_persist_false_does_not(
    nats_url: str, db_url: str, prefix: str, subjects: Subjects, transport: NatsTransport, unique: str
) -> None:
    kept, dropped = f"kept-{unique}", f"dropped-{unique}"
    async with Registry(nats_url=nats_url, db_url=db_url, prefix=prefix):
        await register(transport, subjects, kept, persist=True)
        await register(transport, subjects, dropped, persist=False)
        listed = await transport.request(subjects.registry_list, {}, timeout=TIMEOUT)
        assert {r["model_name"] for r in listed["registrations"]} == {kept, dropped}

    async with Registry(nats_url=nats_url, db_url=db_url, prefix=prefix):
        listed = await transport.request(subjects.registry_list, {}, timeout=TIMEOUT)
        assert [(r["model_name"], r["persist"]) for r in listed["registrations"]] == [(kept, True)]
        got = await transport.request(
            subjects.registry_get, {"model_type": "LLM", "model_name": kept}, timeout=TIMEOUT
        )
        assert got["model_description"] == "a test model"
        with pytest.raises(NotFound):
            await transport.request(
                subjects.registry_get, {"model_type": "LLM", "model_name": dropped}, timeout=TIMEOUT
            )
        # The transient name is free again.
        await register(transport, subjects, dropped)


async def test_nats_micro_discovery_lists_the_endpoints(own_nats_server: Any, sqlite_url: str) -> None:
    async with Registry(nats_url=own_nats_server.url, db_url=sqlite_url, prefix="natserve") as reg:
        assert reg.service is not None
        service_id = reg.service.service_id
        conn = await nats.connect(own_nats_server.url)
        try:
            msg = await conn.request("$SRV.INFO.natserve-registry", b"", timeout=TIMEOUT)
            info = json.loads(msg.data)
            ping = json.loads((await conn.request("$SRV.PING", b"", timeout=TIMEOUT)).data)
        finally:
            await conn.close()
    assert info["type"] == "io.nats.micro.v1.info_response"
    assert info["name"] == "natserve-registry"
    assert info["id"] == service_id
    assert info["version"]
    assert info["metadata"] == {"prefix": "natserve"}
    subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert subjects == {
        "register": "natserve.registry.register",
        "unregister": "natserve.registry.unregister",
        "list_registrations": "natserve.registry.list",
        "get_registration": "natserve.registry.get",
        "launch": "natserve.models.launch",
        "list_models": "natserve.models.list",
        "describe": "natserve.models.describe",
        "terminate": "natserve.models.terminate",
        "list_workers": "natserve.workers.list",
        "batches_create": "natserve.batches.create",
        "batches_get": "natserve.batches.get",
        "batches_list": "natserve.batches.list",
        "batches_cancel": "natserve.batches.cancel",
    }
    assert ping["name"] == "natserve-registry"


# ---------------------------------------------------------------------------- launches


async def test_launch_describe_and_terminate(
    registry: Registry,
    nc: NATS,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    worker = await workers()
    await until_worker_seen(transport, subjects, worker.worker_id)
    uid = f"uid-{unique}"
    events = await watch(nc, subjects, uid)

    body = json.dumps(
        {"model_name": name, "model_uid": uid, "replica": 2, "quantization": "8-bit", "request_limits": 3}
    ).encode()
    headers, reply = await raw_json(nc, subjects.models_launch, body)
    assert reply == {"model_uid": uid}, headers

    assert sorted(c.replica_index for c in worker.launches) == [0, 1]
    command = worker.launches[0]
    assert command.model_uid == uid and command.model_name == name and command.model_type == "LLM"
    assert command.quantization == "8-bit" and command.request_limits == 3
    assert command.spec["model_id"] == "NumbersStation/nsql-2B"
    assert command.definition["model_name"] == name

    description = await transport.request(subjects.models_describe, {"model_uid": uid}, timeout=TIMEOUT)
    assert description["model_uid"] == uid
    assert description["model_name"] == name
    assert description["model_type"] == "LLM"
    assert description["model_ability"] == ["generate"]
    assert description["model_format"] == "pytorch"
    assert description["model_size_in_billions"] == 2
    assert description["quantization"] == "8-bit"
    assert description["replica"] == 2
    assert description["status"] == "ready"
    assert description["error"] is None
    assert description["request_limits"] == 3
    assert description["context_length"] == 2048
    assert [
        (r["replica_index"], r["worker_id"], r["status"], r["memory_bytes"]) for r in description["replicas"]
    ] == [
        (0, worker.worker_id, "ready", GIB),
        (1, worker.worker_id, "ready", GIB),
    ]
    assert all(r["device"] == "cuda:0" for r in description["replicas"])
    assert description["workers"] == [{"worker_id": worker.worker_id, "host": "fake-host", "alive": True}]

    listed = await transport.request(subjects.models_list, {}, timeout=TIMEOUT)
    assert listed == {"models": {uid: description}}

    ready = await events.wait_for("ready", "ready")
    assert ready.model_name == name and ready.replica_index is None
    stages = [e.stage for e in events.events]
    assert stages.index("placing") < stages.index("loading") < stages.index("ready")
    assert {e.replica_index for e in events.events if e.stage == "loading"} == {0, 1}

    with pytest.raises(Conflict, match=repr(uid)):
        await transport.request(
            subjects.models_launch, {"model_name": name, "model_uid": uid}, timeout=TIMEOUT
        )

    assert await transport.request(subjects.models_terminate, {"model_uid": uid}, timeout=TIMEOUT) == {}
    assert [t.model_uid for t in worker.terminates] == [uid]
    await events.wait_for("terminated")
    assert (await transport.request(subjects.models_list, {}, timeout=TIMEOUT)) == {"models": {}}
    with pytest.raises(NotFound, match=repr(uid)):
        await transport.request(subjects.models_describe, {"model_uid": uid}, timeout=TIMEOUT)
    with pytest.raises(NotFound, match=repr(uid)):
        await transport.request(subjects.models_terminate, {"model_uid": uid}, timeout=TIMEOUT)
    # The uid is free again; it defaults to the model name.
    assert (await transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)) == {
        "model_uid": name
    }


async def test_replicas_spread_over_workers_most_free_memory_first(
    registry: Registry,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    # One replica of the 2B 4-bit test model needs about 5.2 GiB (registry_service/memory.py).
    small = await workers(free_memory=8 * GIB)
    big = await workers(free_memory=40 * GIB)
    for w in (small, big):
        await until_worker_seen(transport, subjects, w.worker_id)
    await transport.request(subjects.models_launch, {"model_name": name, "replica": 3}, timeout=TIMEOUT)
    assert sorted(c.replica_index for c in big.launches) == [0, 2]
    assert [c.replica_index for c in small.launches] == [1]

    pinned = f"pinned-{unique}"
    await transport.request(
        subjects.models_launch,
        {"model_name": name, "model_uid": pinned, "worker_id": small.worker_id, "n_gpu": None},
        timeout=TIMEOUT,
    )
    [command] = [c for c in small.launches if c.model_uid == pinned]
    assert command.device == "cpu"


async def test_a_worker_launch_failure_comes_back_and_leaves_nothing(
    registry: Registry,
    nc: NATS,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    good = await workers(free_memory=40 * GIB)
    bad = await workers(
        free_memory=10 * GIB, fail=NotFound("model_id 'NumbersStation/nsql-2B' was not found on the hub")
    )
    for w in (good, bad):
        await until_worker_seen(transport, subjects, w.worker_id)
    events = await watch(nc, subjects, name)

    with pytest.raises(NotFound) as info:
        await transport.request(subjects.models_launch, {"model_name": name, "replica": 2}, timeout=TIMEOUT)
    assert info.value.message == "model_id 'NumbersStation/nsql-2B' was not found on the hub"

    # Every worker that got a replica was told to drop it, and nothing is recorded.
    assert [t.model_uid for t in good.terminates] == [name]
    assert [t.model_uid for t in bad.terminates] == [name]
    assert (await transport.request(subjects.models_list, {}, timeout=TIMEOUT)) == {"models": {}}
    failed = await events.wait_for("failed")
    assert failed.status == "failed" and "not found on the hub" in (failed.message or "")
    # describe says why the uid is gone.
    with pytest.raises(NotFound, match="its launch failed: model_id"):
        await transport.request(subjects.models_describe, {"model_uid": name}, timeout=TIMEOUT)
    # The raw error as `nats req` shows it carries the same class and message.
    request = {"model_name": name, "worker_id": bad.worker_id}
    headers, body = await raw_json(nc, subjects.models_launch, json.dumps(request).encode())
    assert headers["Nats-Service-Error-Code"] == "404"
    assert body["error"] == {"type": "NotFound", "code": 404, "message": info.value.message}


async def test_launch_with_wait_false_replies_at_once(
    registry: Registry,
    nc: NATS,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    worker = await workers(hold=True)
    await until_worker_seen(transport, subjects, worker.worker_id)
    events = await watch(nc, subjects, name)

    reply = await transport.request(
        subjects.models_launch, {"model_name": name, "wait": False}, timeout=TIMEOUT
    )
    assert reply == {"model_uid": name}
    await within(worker.launched.wait(), "the worker to receive the launch", TIMEOUT)
    description = await transport.request(subjects.models_describe, {"model_uid": name}, timeout=TIMEOUT)
    assert description["status"] == "launching"
    assert description["replicas"][0]["status"] == "loading"
    # A second launch of the same uid while it loads is a conflict.
    with pytest.raises(Conflict):
        await transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)

    worker.release.set()
    await events.wait_for("ready", "ready")
    description = await transport.request(subjects.models_describe, {"model_uid": name}, timeout=TIMEOUT)
    assert description["status"] == "ready"
    assert description["replicas"][0]["status"] == "ready"


async def test_terminate_while_loading_cancels_the_launch(
    registry: Registry,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    worker = await workers(hold=True)
    await until_worker_seen(transport, subjects, worker.worker_id)

    launch = asyncio.create_task(
        transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)
    )
    await within(worker.launched.wait(), "the worker to receive the launch", TIMEOUT)
    assert await transport.request(subjects.models_terminate, {"model_uid": name}, timeout=TIMEOUT) == {}
    with pytest.raises(Conflict, match="terminated while loading"):
        await within(launch, "the launch reply", TIMEOUT)
    assert [t.model_uid for t in worker.terminates] == [name]
    assert (await transport.request(subjects.models_list, {}, timeout=TIMEOUT)) == {"models": {}}


async def test_concurrent_launches_of_one_uid_give_one_winner(
    registry: Registry,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    worker = await workers()
    await until_worker_seen(transport, subjects, worker.worker_id)
    results = await asyncio.gather(
        *(transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT) for _ in range(5)),
        return_exceptions=True,
    )
    assert results.count({"model_uid": name}) == 1
    assert all(isinstance(r, Conflict) for r in results if r != {"model_uid": name})
    assert len(worker.launches) == 1


async def test_terminate_tolerates_a_dead_worker(
    registry: Registry,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    name = f"m-{unique}"
    await register(transport, subjects, name)
    worker = await workers()
    await until_worker_seen(transport, subjects, worker.worker_id)
    await transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)
    await worker.stop()
    assert await transport.request(subjects.models_terminate, {"model_uid": name}, timeout=TIMEOUT) == {}
    assert (await transport.request(subjects.models_list, {}, timeout=TIMEOUT)) == {"models": {}}


# ---------------------------------------------------------------------------- workers


async def test_workers_list_shows_heartbeats_and_a_silent_worker_dies(
    nats_url: str,
    sqlite_url: str,
    prefix: str,
    nc: NATS,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
) -> None:
    async with Registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, heartbeat_dead_after=0.5):
        worker = await workers(heartbeat_interval=0.1)
        seen = await until_worker_seen(transport, subjects, worker.worker_id)
        assert seen["alive"] is True
        assert seen["host"] == "fake-host"
        assert [d["name"] for d in seen["devices"]] == ["cuda:0", "cpu"]
        assert seen["devices"][0]["free_memory"] == 20 * GIB
        assert seen["replicas"] == []
        assert abs(seen["last_seen"] - time.time()) < 5

        # As `nats req` sees it.
        _, raw = await raw_json(nc, subjects.workers_list, b"{}")
        assert [w["worker_id"] for w in raw["workers"]] == [worker.worker_id]

        # No more heartbeats: the worker turns dead and is not used for launches.
        async def dead() -> dict[str, Any] | None:
            reply = await transport.request(subjects.workers_list, {}, timeout=TIMEOUT)
            return next((w for w in reply["workers"] if not w["alive"]), None)

        gone = await eventually(dead, f"worker {worker.worker_id} to be reported dead", TIMEOUT)
        assert gone["worker_id"] == worker.worker_id
        name = f"m-{unique}"
        await register(transport, subjects, name)
        with pytest.raises(Unavailable, match="no live worker"):
            await transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)
        with pytest.raises(Unavailable, match=f"worker '{worker.worker_id}' is not alive"):
            await transport.request(
                subjects.models_launch, {"model_name": name, "worker_id": worker.worker_id}, timeout=TIMEOUT
            )
        # A new heartbeat brings it back.
        await worker.beat()
        await until_worker_seen(transport, subjects, worker.worker_id)


async def test_restart_reconciles_models_with_what_workers_report(
    nats_url: str,
    sqlite_url: str,
    prefix: str,
    transport: NatsTransport,
    subjects: Subjects,
    workers: Callable[..., Awaitable[FakeWorker]],
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept, lost = f"kept-{unique}", f"lost-{unique}"
    worker = await workers(beating=True, heartbeat_interval=0.2)
    async with Registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix):
        await register(transport, subjects, kept, persist=True)
        await until_worker_seen(transport, subjects, worker.worker_id)
        for uid in (kept, lost):
            await transport.request(
                subjects.models_launch, {"model_name": kept, "model_uid": uid}, timeout=TIMEOUT
            )

    # While the registry was down the worker lost one replica and gained one nobody launched.
    del worker.replicas[(lost, 0)]
    stray = f"stray-{unique}"
    worker.extra_replicas.append(
        ReplicaInfo(
            model_uid=stray,
            replica_index=0,
            model_name=kept,
            model_type="LLM",
            device="cuda:0",
            status="ready",
        )
    )
    caplog.set_level(logging.WARNING, logger="registry_service")
    launched = len(worker.launches)
    async with Registry(
        nats_url=nats_url, db_url=sqlite_url, prefix=prefix, resync_window=0.3, heartbeat_dead_after=1.0
    ):
        # The lost replica is launched again (registry_service/liveness.py); the kept one is
        # adopted as the worker reports it, without a second load.
        async def relaunched() -> list[WorkerLaunch] | None:
            return worker.launches[launched:] or None

        [again] = await eventually(relaunched, f"{lost!r} to be launched again after the restart", TIMEOUT)
        assert (again.model_uid, again.replica_index) == (lost, 0)

        async def both_ready() -> dict[str, Any] | None:
            listed = await transport.request(subjects.models_list, {}, timeout=TIMEOUT)
            models = listed["models"]
            ready = set(models) == {kept, lost} and all(m["status"] == "ready" for m in models.values())
            return listed if ready else None

        await eventually(both_ready, "both models ready after the restart", TIMEOUT)
        # The stray nobody launched is terminated after one dead window.
        await eventually(
            lambda: asyncio.sleep(0, [t for t in worker.terminates if t.model_uid == stray]),
            f"the stray replica {stray!r} to be terminated",
            TIMEOUT,
        )
        assert len(worker.launches) == launched + 1
    assert any(stray in r.getMessage() and "does not know" in r.getMessage() for r in caplog.records)


async def test_a_launch_as_the_registry_starts_waits_for_the_first_worker(
    nats_url: str, sqlite_url: str, prefix: str, subjects: Subjects, transport: NatsTransport, unique: str
) -> None:
    # A worker that starts together with the registry can miss its resync (it subscribed too
    # late) and have sent its first heartbeat before the registry listened: the registry hears
    # of it one heartbeat interval later. A launch sent in that gap waits for the first worker
    # within the resync window instead of failing with "no live worker".
    reg = Registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, resync_window=TIMEOUT)
    await reg.start()
    worker: FakeWorker | None = None
    try:
        name = f"m-{unique}"
        await register(transport, subjects, name)
        launch = asyncio.create_task(
            transport.request(subjects.models_launch, {"model_name": name}, timeout=TIMEOUT)
        )
        # Connecting takes longer than the launch takes to reach the registry.
        worker = await FakeWorker(nats_url, prefix).start()
        reply = await within(launch, "the launch sent before any worker was heard")
        assert reply["model_uid"] == name
        assert [c.model_uid for c in worker.launches] == [name]
    finally:
        if worker is not None:
            await worker.stop()
        await reg.stop()
