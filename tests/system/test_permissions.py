"""``deploy/nats-server.conf`` itself, on a real nats-server: each role can do its job and no more.

The server runs the file with two more workers' users added where its ``BEGIN WORKERS`` /
``END WORKERS`` lines say, as ``deploy/worker_user.py`` prints them (``w-a`` and ``w-b``; the file's
own ``worker`` entry is the script's output too); its passwords come from the environment
(``NATSERVE_{CLIENT,WORKER,REGISTRY,WORKER_W_A,WORKER_W_B}_PASSWORD``), set here to fixed test
values before the server starts. Denials show up as "permissions violation" errors (the server keeps the
connection open and tells the client through its error callback); deliveries that must not
happen are checked against a permitted sentinel sent after the denied message, so no sleep
stands in for "nothing arrived".
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.micro import ServiceConfig, add_service

from broker_client import AsyncBatchClient, BatchNames, NatsAuth, Subjects, connect_options
from broker_client.codec import MSGPACK, encode
from broker_client.runtime import NATSConnection, NatsTransport, connect
from registry_service import Registry
from tests.support.nats_server import NatsServer
from tests.support.registry import FakeWorker, definition, until_worker_seen
from tests.support.waits import eventually_despite_errors

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "nats-server.conf"
WORKER_USER = ROOT / "deploy" / "worker_user.py"
PASSWORDS = {"client": "client-test-pw", "worker": "worker-test-pw", "registry": "registry-test-pw"}
# Workers whose users the test adds, as an operator would: deploy/worker_user.py w-a w-b.
EXTRA_WORKERS = {"w-a": "wa-test-pw", "w-b": "wb-test-pw"}
TIMEOUT = 5.0
S = Subjects()  # the file spells the default prefix


def worker_users(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(WORKER_USER), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout


def config_with_workers() -> str:
    text = CONFIG.read_text()
    end = text.index("    # END WORKERS")
    return text[:end] + worker_users(*EXTRA_WORKERS) + text[end:]


@pytest.fixture(scope="module")
def server() -> Iterator[NatsServer]:
    with pytest.MonkeyPatch.context() as env:
        for role, password in PASSWORDS.items():
            env.setenv(f"NATSERVE_{role.upper()}_PASSWORD", password)
        for worker_id, password in EXTRA_WORKERS.items():
            env.setenv(f"NATSERVE_WORKER_{worker_id.upper().replace('-', '_')}_PASSWORD", password)
        # Popen copies the environment now; the variables are not needed afterwards.
        nats = NatsServer(config=config_with_workers()).start()
    yield nats
    nats.close()


def auth(role: str) -> NatsAuth:
    return NatsAuth(user=role, password={**PASSWORDS, **EXTRA_WORKERS}[role])


@dataclass
class Session:
    """A connection as one role, with the asynchronous errors the server sent it."""

    role: str
    nc: NATSConnection
    errors: asyncio.Queue[Exception] = field(default_factory=asyncio.Queue)

    async def violation(self) -> str:
        """The next permissions violation reported to this connection (bounded wait)."""
        while True:
            error = await asyncio.wait_for(self.errors.get(), TIMEOUT)
            if "permissions violation" in str(error).lower():
                return str(error).lower()

    def assert_no_violation(self) -> None:
        seen = [str(e) for e in self.errors._queue]  # type: ignore[attr-defined]
        assert not [e for e in seen if "permissions violation" in e.lower()], seen


@pytest.fixture
async def session(server: NatsServer) -> AsyncIterator[Any]:
    opened: list[Session] = []

    async def open_session(role: str) -> Session:
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            errors.put_nowait(exc)

        nc = await asyncio.wait_for(
            connect(server.url, name=f"test-{role}", error_cb=on_error, **connect_options(auth(role))),
            TIMEOUT,
        )
        opened.append(Session(role, nc, errors))
        return opened[-1]

    yield open_session
    for s in opened:
        await s.nc.close()


@pytest.fixture
async def registry(server: NatsServer, sqlite_url: str) -> AsyncIterator[Registry]:
    reg = Registry(nats_url=server.url, db_url=sqlite_url, auth=auth("registry"), resync_window=0.3)
    await reg.start()
    yield reg
    await reg.stop()


def test_every_role_has_a_password_variable() -> None:
    text = CONFIG.read_text()
    for role in PASSWORDS:
        assert f"user: {role}, password: $NATSERVE_{role.upper()}_PASSWORD" in text


def test_the_files_worker_entry_is_what_the_script_prints_for_its_id() -> None:
    text = CONFIG.read_text()
    begin, end = text.index("    # BEGIN WORKERS\n"), text.index("    # END WORKERS")
    shipped = text[begin:end].split("\n", 1)[1]
    assert shipped == worker_users("worker", "--password-var", "NATSERVE_WORKER_PASSWORD")


async def test_wrong_password_is_refused(server: NatsServer) -> None:
    from broker_client import TransportError

    with pytest.raises(TransportError, match="Authorization Violation"):
        bad = NatsAuth(user="client", password="not-it")
        await asyncio.wait_for(connect(server.url, name="t", **connect_options(bad)), TIMEOUT)


async def test_client_cannot_command_a_worker(session: Any) -> None:
    client, worker, registry = await session("client"), await session("worker"), await session("registry")
    worker_id = "worker"  # the worker's user takes its own commands only
    launch = S.worker(worker_id, "launch")
    received: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_command(msg: Msg) -> None:
        received.put_nowait(msg)

    await worker.nc.subscribe(S.worker(worker_id, ">"), cb=on_command)
    await worker.nc.flush()

    await client.nc.publish(launch, b'{"model_uid": "evil"}')
    await client.nc.flush()
    error = await client.violation()
    assert "publish" in error and launch in error

    # The registry may command it; its message comes after the client's would have.
    await registry.nc.publish(launch, b"sentinel")
    await registry.nc.flush()
    first = await asyncio.wait_for(received.get(), TIMEOUT)
    assert first.data == b"sentinel", "the client's launch command reached the worker"
    assert received.empty()
    worker.assert_no_violation()
    registry.assert_no_violation()


@pytest.mark.parametrize(
    ("role", "action", "subject"),
    [
        ("client", "pub", "natserve.workers.heartbeat"),  # fake a worker
        ("client", "pub", "natserve.workers.worker.heartbeat"),
        ("client", "pub", "natserve.workers.resync"),
        ("client", "pub", "natserve.events.models.m1"),  # fake launch progress
        ("client", "pub", "natserve.worker.w1.terminate"),
        ("client", "sub", "natserve.model.>"),  # read, or steal, other clients' requests
        ("client", "sub", "natserve.registry.*"),  # impersonate the registry
        ("client", "sub", "natserve.workers.heartbeat"),
        ("worker", "pub", "natserve.models.launch"),
        ("worker", "pub", "natserve.worker.w2.launch"),  # command another worker
        ("worker", "pub", "natserve.model.m1.generate"),
        ("worker", "pub", "natserve.workers.heartbeat"),
        ("worker", "pub", "natserve.workers.w-a.heartbeat"),  # speak for another worker
        ("w-a", "pub", "natserve.workers.w-b.heartbeat"),
        ("w-a", "pub", "natserve.workers.*.heartbeat"),
        ("w-a", "sub", "natserve.worker.w-b.>"),  # read another worker's commands
        ("w-a", "sub", "natserve.worker.*.>"),
        ("worker", "sub", "natserve.registry.*"),
        ("worker", "sub", "natserve.workers.heartbeat"),
        ("worker", "sub", "natserve.workers.*.heartbeat"),
        ("registry", "pub", "natserve.model.m1.generate"),
        ("registry", "pub", "natserve.workers.heartbeat"),
        ("registry", "pub", "natserve.workers.worker.heartbeat"),
        ("registry", "sub", "natserve.model.>"),
    ],
)
async def test_denied(session: Any, role: str, action: str, subject: str) -> None:
    who = await session(role)
    if action == "pub":
        await who.nc.publish(subject, b"{}")
    else:
        await who.nc.subscribe(subject)
    await who.nc.flush()
    error = await who.violation()
    assert ("publish" if action == "pub" else "subscription") in error
    assert subject in error


async def test_client_uses_the_registry(session: Any, registry: Registry) -> None:
    client = await session("client")
    transport = NatsTransport(client.nc)
    await transport.start()
    reply = await transport.request(S.registry_list, {}, timeout=TIMEOUT)
    assert reply == {"registrations": []}
    client.assert_no_violation()


async def test_whole_launch_flow_under_the_permissions(
    server: NatsServer, session: Any, registry: Registry
) -> None:
    """Register, launch (registry → worker command and reply), events, workers, terminate."""
    host_port = server.url.removeprefix("nats://")
    worker = await FakeWorker(
        f"nats://worker:{PASSWORDS['worker']}@{host_port}", S.prefix, worker_id="worker"
    ).start()
    try:
        client = await session("client")
        transport = NatsTransport(client.nc)
        await transport.start()
        name = f"m{uuid.uuid4().hex[:8]}"
        events: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            events.put_nowait(msg)

        await client.nc.subscribe(S.events(name), cb=on_event)
        await transport.request(
            S.registry_register, {"model_type": "LLM", "model": definition(name)}, timeout=TIMEOUT
        )
        # The heartbeat (worker → registry) was published when the worker started.
        workers = await transport.request(S.workers_list, {}, timeout=TIMEOUT)
        assert worker.worker_id in [w["worker_id"] for w in workers["workers"]]
        reply = await transport.request(
            S.models_launch, {"model_name": name, "worker_id": worker.worker_id}, timeout=TIMEOUT
        )
        assert reply == {"model_uid": name}
        assert [c.model_uid for c in worker.launches] == [name]
        assert (await asyncio.wait_for(events.get(), TIMEOUT)).subject == S.events(name)
        assert await transport.request(S.models_terminate, {"model_uid": name}, timeout=TIMEOUT) == {}
        assert [c.model_uid for c in worker.terminates] == [name]
        client.assert_no_violation()
    finally:
        await worker.stop()


async def test_a_model_that_starts_on_demand_under_the_permissions(
    server: NatsServer, session: Any, registry: Registry
) -> None:
    """The registry answers a model's subjects while it has no replica and hands the request to
    the worker it starts (overflow), each within its user's permissions."""
    from tests.support.pool import echo_definition
    from workers import Worker, WorkerSettings

    worker = Worker(
        WorkerSettings(
            server.url, worker_id="worker", device="cpu", heartbeat_interval=0.5, auth=auth("worker")
        )
    )
    await worker.start()
    try:
        client = await session("client")
        transport = NatsTransport(client.nc)
        await transport.start()
        name = f"od{uuid.uuid4().hex[:8]}"
        await transport.request(
            S.registry_register, {"model_type": "LLM", "model": echo_definition(name)}, timeout=TIMEOUT
        )
        await until_worker_seen(transport, S, "worker")
        reply = await transport.request(
            S.models_launch, {"model_name": name, "min_replicas": 0}, timeout=TIMEOUT
        )
        assert reply == {"model_uid": name} and name not in worker.models
        out = await transport.request(S.model(name, "generate"), {"prompt": "on demand"}, timeout=TIMEOUT)
        assert out["choices"][0]["text"] == "on demand"
        assert list(worker.models[name].replicas) == [0]
        client.assert_no_violation()
    finally:
        await worker.stop(drain_timeout=1)


async def test_a_stream_of_50_chunks_reaches_the_client_whole(session: Any) -> None:
    """A worker answers one request with 51 messages: allow_responses must not stop at one."""
    client, worker = await session("client"), await session("worker")
    uid = f"m{uuid.uuid4().hex[:8]}"
    subject = S.model(uid, "generate")

    async def generate(msg: Msg) -> None:
        assert msg.reply
        for seq in range(1, 51):
            chunk = {"choices": [{"text": f"t{seq} ", "index": 0}], "seq": seq}
            await worker.nc.publish(
                msg.reply, encode(chunk, MSGPACK), headers={"Content-Type": MSGPACK, "Natserve-Seq": str(seq)}
            )
        await worker.nc.publish(msg.reply, b"")

    await worker.nc.subscribe(subject, queue=S.model_queue_group(uid), cb=generate)
    await worker.nc.flush()
    transport = NatsTransport(client.nc)
    await transport.start()
    chunks = [
        c
        async for c in transport.stream(
            subject, {"prompt": "hi", "generate_config": {"stream": True}}, timeout=TIMEOUT
        )
    ]
    assert [c["seq"] for c in chunks] == list(range(1, 51))
    # The client may cancel a stream too, and acknowledge its chunks (the keepalive).
    await transport.publish(S.model(uid, "cancel"), {"request_id": "r1"})
    await transport.publish(S.model_keepalive(uid, "worker"), {"reply": "_INBOX.x.1", "received": 16})
    await client.nc.flush()
    client.assert_no_violation()
    worker.assert_no_violation()


def run_healthcheck(server: NatsServer, role: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NATSERVE_NATS_URL": server.url,
        "NATSERVE_NATS_USER": role,
        "NATSERVE_NATS_PASSWORD": PASSWORDS[role],
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "healthcheck.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_healthchecks_work_with_each_services_own_user(
    server: NatsServer, session: Any, registry: Registry
) -> None:
    result = await asyncio.to_thread(run_healthcheck, server, "registry", "natserve-registry")
    assert result.returncode == 0, result.stderr
    # A worker's ping goes to the nats.micro service a worker runs, under the worker's user.
    worker = await session("worker")
    import socket

    service = await add_service(
        worker.nc,
        ServiceConfig(name="natserve-worker", version="0.0.0", metadata={"host": socket.gethostname()}),
    )
    try:
        await worker.nc.flush()
        result = await asyncio.to_thread(run_healthcheck, server, "worker", "natserve-worker", "--this-host")
        assert result.returncode == 0, result.stderr
        worker.assert_no_violation()
    finally:
        await service.stop()


def beat_of(worker_id: str, **changes: Any) -> bytes:
    """A heartbeat body for ``worker_id`` (80 GiB free on a GPU: placement's first choice)."""
    body: dict[str, Any] = {
        "worker_id": worker_id,
        "host": "h",
        "pid": 1,
        "version": "0.1.0",
        "devices": [
            {"name": "cuda:0", "kind": "cuda", "total_memory": 80 << 30, "free_memory": 80 << 30},
            {"name": "cpu", "kind": "cpu", "total_memory": 64 << 30, "free_memory": 32 << 30},
        ],
        "replicas": [],
        "started_at": 1.0,
        "last_seen": 2.0,
        "heartbeat_interval": 1.0,
    }
    body.update(changes)
    return encode(body, MSGPACK)


async def test_forged_heartbeats_are_refused_or_ignored_and_launches_go_on(
    server: NatsServer, session: Any, registry: Registry
) -> None:
    """Under the file's permissions nobody speaks for another worker: a client or worker ``w-a``
    publishing for someone else is refused by the server; what ``w-a`` may publish on its own
    subject counts only when it is a valid beat of ``w-a``. Meanwhile unpinned launches go to
    the real worker (forged beats of a roomier worker made every one of them a 503)."""
    host_port = server.url.removeprefix("nats://")
    real = await FakeWorker(
        f"nats://worker:{PASSWORDS['worker']}@{host_port}", S.prefix, worker_id="worker", beating=True
    ).start()
    try:
        client, refused, forger = await session("client"), await session("w-a"), await session("w-a")
        headers = {"Content-Type": MSGPACK}
        # Refused by the server: no message reaches the registry.
        for who, subject in [
            (client, S.worker_heartbeat("ghost")),
            (refused, S.worker_heartbeat("w-b")),
            (refused, "natserve.workers.heartbeat"),
        ]:
            await who.nc.publish(subject, beat_of("ghost"), headers=headers)
            await who.nc.flush()
            assert subject in await who.violation()

        # Let through (w-a's own subject) but ignored by the registry, field by field.
        forgeries = [
            beat_of("ghost"),  # another worker's id
            beat_of("*"),
            beat_of(">"),
            beat_of("a.b"),
            beat_of("w-a", heartbeat_interval=1e300),  # never dead
            beat_of("w-a", heartbeat_interval="2"),
            beat_of("w-a", last_seen=float("nan")),
            beat_of(
                "w-a", devices=[{"name": "cpu; rm -rf /", "kind": "cpu", "total_memory": 1, "free_memory": 1}]
            ),
            beat_of(
                "w-a", devices=[{"name": "cuda:0", "kind": "cuda", "total_memory": 1, "free_memory": -1}]
            ),
            beat_of("w-a", pid=True),
            beat_of("w-a", note="x" * 100_000),
            b"not a heartbeat",
        ]
        mine = S.worker_heartbeat("w-a")
        transport = NatsTransport(client.nc)
        await transport.start()
        stop = asyncio.Event()

        async def keep_forging() -> None:
            while not stop.is_set():
                for body in forgeries:
                    await forger.nc.publish(mine, body, headers=headers)
                await forger.nc.flush()
                await asyncio.sleep(0.02)  # a steady stream of forgeries, not a synchronisation

        forging = asyncio.create_task(keep_forging())
        try:
            name = f"m{uuid.uuid4().hex[:8]}"
            await transport.request(
                S.registry_register, {"model_type": "LLM", "model": definition(name)}, timeout=TIMEOUT
            )
            reply = await transport.request(S.models_launch, {"model_name": name}, timeout=TIMEOUT)
            assert reply == {"model_uid": name}
            assert [c.model_uid for c in real.launches] == [name]
        finally:
            stop.set()
            await forging
        # A valid beat of w-a, after every forgery on the same connection: once it is listed, the
        # registry has judged them all.
        await forger.nc.publish(mine, beat_of("w-a", devices=[]), headers=headers)
        await forger.nc.flush()
        await until_worker_seen(transport, S, "w-a")
        listed = {
            w["worker_id"] for w in (await transport.request(S.workers_list, {}, timeout=TIMEOUT))["workers"]
        }
        assert listed == {"worker", "w-a"}
        [w_a] = [
            w
            for w in (await transport.request(S.workers_list, {}, timeout=TIMEOUT))["workers"]
            if w["worker_id"] == "w-a"
        ]
        assert w_a["heartbeat_interval"] == 1.0 and w_a["devices"] == []
        forger.assert_no_violation()
        client.assert_no_violation()
    finally:
        await real.stop()


async def test_a_worker_with_its_own_user_serves_under_its_id(server: NatsServer, registry: Registry) -> None:
    """A real worker, logged in as w-b: its beats are heard and its commands reach it."""
    from workers import Worker, WorkerSettings

    worker = Worker(
        WorkerSettings(server.url, worker_id="w-b", device="cpu", auth=auth("w-b"), heartbeat_interval=0.5)
    )
    await worker.start()
    try:
        nc = await connect(server.url, name="t", **connect_options(auth("client")))
        try:
            transport = NatsTransport(nc)
            await transport.start()
            await until_worker_seen(transport, S, "w-b")
            name = f"m{uuid.uuid4().hex[:8]}"
            echo = definition(name, model_specs=[{"model_size_in_billions": 1, "model_uri": "echo:"}])
            await transport.request(
                S.registry_register, {"model_type": "LLM", "model": echo}, timeout=TIMEOUT
            )
            await transport.request(
                S.models_launch, {"model_name": name, "worker_id": "w-b"}, timeout=TIMEOUT
            )
            out = await transport.request(S.model(name, "generate"), {"prompt": "one two"}, timeout=TIMEOUT)
            assert out["choices"][0]["text"] == "one two"
        finally:
            await nc.close()
    finally:
        await worker.stop()


# -- batch jobs (JetStream): each role's part of a job, and nothing of the others'

B = BatchNames(S.prefix)


def violations(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The permissions violations reported to the in-process registry's and workers' connections
    (broker_client logs each asynchronous error of a connection at debug level)."""
    return [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage().lower()]


async def test_a_batch_job_runs_to_completion_under_the_permissions(
    server: NatsServer, session: Any, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """The client uploads an input file and submits a job, the registry queues it on the model's
    work-queue stream, the worker (its own user) pulls, acks and stores results, the registry
    writes the output file, and the client downloads it and follows the job's events."""
    from tests.support.batches import ECHO_CHAT_TEMPLATE, chat_lines, finished, jsonl, output_lines
    from tests.support.pool import echo_definition
    from workers import Worker, WorkerSettings

    caplog.set_level(logging.DEBUG, logger="broker_client._connect")
    worker = Worker(
        WorkerSettings(
            server.url, worker_id="worker", device="cpu", heartbeat_interval=0.5, auth=auth("worker")
        )
    )
    await worker.start()
    try:
        client = await session("client")
        transport = NatsTransport(client.nc)
        await transport.start()
        name = f"bj{uuid.uuid4().hex[:8]}"
        await transport.request(
            S.registry_register,
            {"model_type": "LLM", "model": echo_definition(name, chat_template=ECHO_CHAT_TEMPLATE)},
            timeout=TIMEOUT,
        )
        await until_worker_seen(transport, S, "worker")
        launched = await transport.request(
            S.models_launch, {"model_name": name, "worker_id": "worker"}, timeout=30
        )
        uid = launched["model_uid"]
        events: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            events.put_nowait(msg)

        batches = AsyncBatchClient(client.nc, timeout=30)
        lines = chat_lines(6, uid)
        # The registry makes the object store when it starts; the client waits for it.
        file_id = await eventually_despite_errors(
            lambda: batches.upload(jsonl(lines), filename="jobs.jsonl"), "the batch files store", 30
        )
        await client.nc.subscribe(B.events("*"), cb=on_event)
        await client.nc.flush()
        job = await batches.create(input_file_id=file_id, endpoint="/v1/chat/completions")
        done = await finished(batches, job["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        out = output_lines(await batches.download(done["output_file_id"]))
        assert sorted(line["custom_id"] for line in out) == [f"r{i}" for i in range(6)]
        assert all(line["response"]["status_code"] == 200 for line in out)
        assert (await batches.file(done["output_file_id"]))["bytes"] > 0
        # A file of many chunks (128 KiB each) comes back whole: the ordered consumer's flow
        # control replies are the client's to send.
        big = os.urandom(6 << 20)
        assert await batches.download(await batches.upload(big, filename="big.bin")) == big
        # Listing and cancelling a finished job go through the registry too.
        assert job["id"] in [b["id"] for b in (await batches.list())["data"]]
        assert (await batches.cancel(job["id"]))["status"] == "completed"
        # The job's progress events reach the client.
        assert (await asyncio.wait_for(events.get(), TIMEOUT)).subject == B.events(job["id"])
        client.assert_no_violation()
        assert violations(caplog) == []
    finally:
        await worker.stop(drain_timeout=1)


@pytest.mark.parametrize(
    ("role", "subject"),
    [
        # A client queues nothing itself: the registry checks every line and the stream's room.
        ("client", "natserve.batches.requests.m1.batch_000000000000000000000000"),
        ("client", "natserve.batches.results.batch_000000000000000000000000"),  # fake a result
        # Nor reads or writes the job records, nor manages streams or the workers' consumer.
        ("client", "$KV.natserve_batches.batch_000000000000000000000000"),
        ("client", "$JS.API.STREAM.INFO.KV_natserve_batches"),
        ("client", "$JS.API.DIRECT.GET.KV_natserve_batches.$KV.natserve_batches.>"),
        ("client", "$JS.API.STREAM.MSG.GET.KV_natserve_batches"),
        ("client", "$JS.API.CONSUMER.CREATE.KV_natserve_batches"),
        ("client", "$JS.API.STREAM.PURGE.OBJ_natserve_files"),  # everybody's files
        ("client", "$JS.API.STREAM.DELETE.OBJ_natserve_files"),
        ("client", "$JS.API.CONSUMER.MSG.NEXT.natserve_batch_m1.workers"),  # steal requests
        ("worker", "$JS.API.STREAM.DELETE.natserve_batch_m1"),
        ("worker", "$JS.API.STREAM.PURGE.natserve_batch_m1"),
        ("worker", "$JS.API.CONSUMER.DELETE.natserve_batch_m1.workers"),
        ("worker", "$JS.API.STREAM.INFO.KV_natserve_batches"),
        ("worker", "natserve.batches.requests.m1.batch_000000000000000000000000"),
        ("worker", "natserve.batches.create"),
        ("registry", "$JS.API.STREAM.DELETE.natserve_batch_m1"),
        ("registry", "$KV.other_bucket.k"),  # JetStream names natserve does not use
        ("registry", "$JS.API.DIRECT.GET.KV_other_bucket.$KV.other_bucket.k"),
    ],
)
async def test_batch_jetstream_subjects_denied(session: Any, role: str, subject: str) -> None:
    who = await session(role)
    await who.nc.publish(subject, b"{}", reply=who.nc.new_inbox())
    await who.nc.flush()
    error = await who.violation()
    assert "publish" in error and subject.lower() in error


async def test_a_client_cannot_read_the_jobs_bucket_nor_write_to_a_work_queue(
    session: Any, registry: Registry
) -> None:
    """Through nats-py's own JetStream API, as a curious client would try it; and a worker
    cannot delete a stream."""
    client = await session("client")
    js = client.nc.jetstream(timeout=1)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
        kv = await js.key_value(B.jobs_bucket)
        await kv.get("batch_000000000000000000000000")
    assert f"stream.info.kv_{B.jobs_bucket}" in await client.violation()
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
        await js.publish(B.requests_subject("m1", "batch_000000000000000000000000"), b"{}", timeout=1)
    assert "natserve.batches.requests.m1" in await client.violation()
    worker = await session("worker")
    wjs = worker.nc.jetstream(timeout=1)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.Error)):
        await wjs.delete_stream(B.results_stream)
    assert "stream.delete" in await worker.violation()
