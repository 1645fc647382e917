"""Support for the registry tests: a fake worker, the registry's fixtures, requests and events.

``FakeWorker`` is a few NATS subscriptions that answer ``worker.<id>.launch|terminate`` and
publish heartbeats, enough to test the registry layer alone. The fixtures (``registry``, ``nc``,
``transport``, ``workers``; ``prefix`` and ``subjects`` come from ``tests.support.names``) reach
every test through the root conftest; a module tunes them by overriding ``registry_options``
(keyword arguments of ``Registry``) or ``worker_options`` (defaults of each ``FakeWorker``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker_client import (
    DeviceInfo,
    ModelEvent,
    ReplicaInfo,
    ServiceError,
    Subjects,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    WorkerTerminate,
)
from broker_client.codec import MSGPACK
from broker_client.runtime import NatsTransport, Responder
from registry_service import Registry
from tests.support.waits import eventually, within

# The registry answers in milliseconds; a wait on it is bounded tighter than the pool's.
TIMEOUT = 10.0
GIB = 1 << 30


def definition(name: str, **changes: Any) -> dict[str, Any]:
    model: dict[str, Any] = {
        "version": 1,
        "context_length": 2048,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "model_description": "a test model",
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": 2,
                "quantizations": ["4-bit", "8-bit", "none"],
                "model_id": "NumbersStation/nsql-2B",
            }
        ],
        "prompt_style": None,
    }
    model.update(changes)
    return model


class FakeWorker:
    """Answers the registry's worker commands and publishes heartbeats; records what it got."""

    def __init__(
        self,
        nats_url: str,
        prefix: str,
        worker_id: str | None = None,
        *,
        free_memory: int = 20 * GIB,
        fail: ServiceError | None = None,
        hold: bool = False,
        heartbeat_interval: float = 1.0,
        beating: bool = False,
    ) -> None:
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}"
        self.free_memory = free_memory
        self.fail = fail
        self.heartbeat_interval = heartbeat_interval
        # False: it beats only on start, on resync and when told, so a test can silence it.
        self.beating = beating
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.launches: list[WorkerLaunch] = []
        self.terminates: list[WorkerTerminate] = []
        self.launched = asyncio.Event()
        self.terminated = asyncio.Event()
        self.replicas: dict[tuple[str, int], ReplicaInfo] = {}
        self.extra_replicas: list[ReplicaInfo] = []
        self.nc: NATS | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.time()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            host="fake-host",
            pid=4242,
            version="0.1.0",
            devices=[
                DeviceInfo(name="cuda:0", kind="cuda", total_memory=24 * GIB, free_memory=self.free_memory),
                DeviceInfo(name="cpu", kind="cpu", total_memory=64 * GIB, free_memory=32 * GIB),
            ],
            replicas=[*self.replicas.values(), *self.extra_replicas],
            started_at=self.started_at,
            last_seen=time.time(),
            heartbeat_interval=self.heartbeat_interval,
        )

    async def start(self) -> FakeWorker:
        self.nc = await nats.connect(self.nats_url)
        await self.nc.subscribe(self.subjects.worker(self.worker_id, "launch"), cb=self._spawn_launch)
        await self.nc.subscribe(self.subjects.worker(self.worker_id, "terminate"), cb=self._on_terminate)
        await self.nc.subscribe(self.subjects.workers_resync, cb=self._on_resync)
        await self.beat()
        if self.beating:
            task = asyncio.create_task(self._beat_forever())
            self._tasks.add(task)
        return self

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)  # the heartbeat period itself
            await self.beat()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def beat(self) -> None:
        assert self.nc is not None
        await self.nc.publish(
            self.subjects.worker_heartbeat(self.worker_id),
            msgpack.packb(self.info().model_dump(mode="json")),
            headers={"Content-Type": MSGPACK},
        )
        await self.nc.flush()

    async def _on_resync(self, msg: Msg) -> None:
        await self.beat()

    async def _spawn_launch(self, msg: Msg) -> None:
        # A held launch must not block the next one: nats-py runs callbacks one at a time.
        task = asyncio.create_task(self._on_launch(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_launch(self, msg: Msg) -> None:
        assert self.nc is not None
        resp = Responder(msg, self.nc)
        command = resp.parse(WorkerLaunch)
        self.launches.append(command)
        self.launched.set()
        if self.fail is not None:
            await resp.respond_error(self.fail)
            return
        await self.release.wait()
        device = command.device or "cuda:0"
        self.replicas[(command.model_uid, command.replica_index)] = ReplicaInfo(
            model_uid=command.model_uid,
            replica_index=command.replica_index,
            model_name=command.model_name,
            model_type=command.model_type,
            device=device,
            status="ready",
            memory_bytes=GIB,
        )
        await resp.respond(
            WorkerLaunchReply(
                model_uid=command.model_uid,
                replica_index=command.replica_index,
                device=device,
                memory_bytes=GIB,
            ).model_dump()
        )

    async def _on_terminate(self, msg: Msg) -> None:
        assert self.nc is not None
        resp = Responder(msg, self.nc)
        command = resp.parse(WorkerTerminate)
        self.terminates.append(command)
        for key in [k for k in self.replicas if k[0] == command.model_uid]:
            del self.replicas[key]
        await resp.respond({})
        self.terminated.set()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def registry_options() -> dict[str, Any]:
    """Keyword arguments of the ``registry`` fixture's ``Registry``, on top of the defaults."""
    return {}


@pytest.fixture
async def registry(
    nats_url: str, sqlite_url: str, prefix: str, registry_options: dict[str, Any]
) -> AsyncIterator[Registry]:
    options: dict[str, Any] = {"resync_window": 0.3, **registry_options}
    reg = Registry(nats_url=nats_url, db_url=sqlite_url, prefix=prefix, **options)
    await reg.start()
    yield reg
    await reg.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def transport(nc: NATS) -> AsyncIterator[NatsTransport]:
    t = NatsTransport(nc)
    await t.start()
    yield t
    await t.close()


@pytest.fixture
def worker_options() -> dict[str, Any]:
    """Defaults of each ``FakeWorker`` the ``workers`` fixture starts."""
    return {}


@pytest.fixture
async def workers(
    nats_url: str, prefix: str, worker_options: dict[str, Any]
) -> AsyncIterator[Callable[..., Awaitable[FakeWorker]]]:
    started: list[FakeWorker] = []

    async def make(**options: Any) -> FakeWorker:
        worker = await FakeWorker(nats_url, prefix, **{**worker_options, **options}).start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


async def raw_json(nc: NATS, subject: str, body: bytes) -> tuple[dict[str, str], Any]:
    """A request as `nats req` sends it: bytes, no headers; the reply decoded as JSON."""
    msg = await nc.request(subject, body, timeout=TIMEOUT)
    return dict(msg.headers or {}), json.loads(msg.data)


async def until_worker_seen(transport: NatsTransport, subjects: Subjects, worker_id: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        reply = await transport.request(subjects.workers_list, {}, timeout=TIMEOUT)
        return next((w for w in reply["workers"] if w["worker_id"] == worker_id and w["alive"]), None)

    return await eventually(probe, f"worker {worker_id} in workers.list", TIMEOUT)


async def register(transport: NatsTransport, subjects: Subjects, name: str, **options: Any) -> None:
    payload = {"model_type": "LLM", "model": json.dumps(definition(name)), **options}
    reply = await transport.request(subjects.registry_register, payload, timeout=TIMEOUT)
    assert reply == {"model_type": "LLM", "model_name": name}


class EventLog:
    """The ModelEvents published on one model's subject, in arrival order."""

    def __init__(self) -> None:
        self.events: list[ModelEvent] = []
        self._changed = asyncio.Condition()

    async def on_msg(self, msg: Msg) -> None:
        self.events.append(ModelEvent.model_validate(msgpack.unpackb(msg.data)))
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, stage: str, status: str | None = None) -> ModelEvent:
        def find() -> ModelEvent | None:
            return next(
                (e for e in self.events if e.stage == stage and (status is None or e.status == status)),
                None,
            )

        async def wait() -> ModelEvent:
            async with self._changed:
                await self._changed.wait_for(lambda: find() is not None)
            event = find()
            assert event is not None
            return event

        return await within(wait(), f"a {stage!r} event (got {[e.stage for e in self.events]})", TIMEOUT)


async def subscribed(nc: NATS) -> None:
    """Return once the server has this connection's subscriptions.

    ``nc.flush()`` does not promise it: nats-py writes the PING straight to the socket while
    SUBs wait in its pending buffer. A message to ourselves queues behind them.
    """
    subject = nc.new_inbox()
    probe = await nc.subscribe(subject, max_msgs=1)
    await nc.publish(subject, b"")
    await within(probe.next_msg(timeout=TIMEOUT), "our own probe message", TIMEOUT)


async def watch(nc: NATS, subjects: Subjects, uid: str) -> EventLog:
    log = EventLog()
    await nc.subscribe(subjects.events(uid), cb=log.on_msg)
    await subscribed(nc)
    return log
