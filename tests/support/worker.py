"""An in-process ``Worker`` and a client connection to drive it as the registry and clients do.

``Harness`` holds both and sends what a test needs: a ``WorkerLaunch`` on the worker's subject,
model requests through the transport, raw nats-py requests (JSON without headers, msgpack with)
and raw streams. ``running_harness`` starts a worker (CPU, slow heartbeats) with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
from nats.aio.msg import Msg

from broker_client.runtime import NatsTransport, connect
from tests.support.waits import within
from workers import Worker, WorkerSettings


def llm_definition(
    name: str, model_uri: str | None = None, *, model_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A custom LLM definition (generate and chat) serving ``model_uri`` or ``model_id``."""
    spec: dict[str, Any] = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"]}
    if model_uri:
        spec["model_uri"] = model_uri
    if model_id:
        spec["model_id"] = model_id
    return {
        "version": 1,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "model_specs": [spec],
        **extra,
    }


def launch_message(
    uid: str, definition: dict[str, Any], *, model_type: str = "LLM", **options: Any
) -> dict[str, Any]:
    """The body of a ``WorkerLaunch`` of replica 0 of ``definition`` on the CPU."""
    specs = definition.get("model_specs")
    spec: dict[str, Any] = (
        specs[0]
        if specs
        else {
            "model_size_in_billions": 0.1,
            **{k: definition[k] for k in ("model_id", "model_uri") if k in definition},
        }
    )
    return {
        "model_uid": uid,
        "replica_index": 0,
        "model_type": model_type,
        "model_name": definition["model_name"],
        "definition": definition,
        "spec": spec,
        "device": "cpu",
        **options,
    }


class Harness:
    """A worker, a client connection and the helpers a test needs to drive them."""

    def __init__(self, worker: Worker, nc: Any, transport: NatsTransport) -> None:
        self.worker = worker
        self.nc = nc
        self.transport = transport
        self.subjects = worker.subjects

    async def launch(self, uid: str, definition: dict[str, Any], **options: Any) -> dict[str, Any]:
        reply = await self.transport.request(
            self.subjects.worker(self.worker.worker_id, "launch"),
            launch_message(uid, definition, **options),
            timeout=120,
        )
        assert isinstance(reply, dict)
        return reply

    async def call(self, uid: str, op: str, body: dict[str, Any], timeout: float = 60) -> Any:
        return await self.transport.request(self.subjects.model(uid, op), body, timeout=timeout)

    async def raw(
        self, subject: str, body: dict[str, Any], *, encoding: str = "json", timeout: float = 60
    ) -> Msg:
        if encoding == "json":
            return await self.nc.request(subject, json.dumps(body).encode(), timeout=timeout)
        return await self.nc.request(
            subject,
            msgpack.packb(body),
            timeout=timeout,
            headers={"Content-Type": "application/msgpack"},
        )

    async def open_stream(
        self, subject: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> asyncio.Queue[Msg]:
        """Publish a request with a reply inbox and return the queue its messages land in."""
        inbox = self.nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            await queue.put(msg)

        await self.nc.subscribe(inbox, cb=on_msg)
        await self.nc.publish(subject, json.dumps(body).encode(), reply=inbox, headers=headers)
        return queue

    @staticmethod
    async def read_to_end(queue: asyncio.Queue[Msg], timeout: float = 60) -> list[Msg]:
        """Messages up to and including the empty end message."""
        msgs: list[Msg] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = await within(
                queue.get(), f"stream message #{len(msgs) + 1}", max(0.1, deadline - time.monotonic())
            )
            msgs.append(msg)
            if not msg.data:
                return msgs


@contextlib.asynccontextmanager
async def client_connection(nats_url: str) -> AsyncIterator[tuple[Any, NatsTransport]]:
    """A connection and a JSON transport on it, as a client of the worker."""
    nc = await connect(nats_url, name="test-client")
    transport = NatsTransport(nc, encoding="application/json")
    await transport.start()
    try:
        yield nc, transport
    finally:
        await transport.close()
        await nc.close()


@contextlib.asynccontextmanager
async def running_harness(nats_url: str, prefix: str, **settings: Any) -> AsyncIterator[Harness]:
    """A started worker (CPU, slow heartbeats; ``settings`` adds to its ``WorkerSettings``) and a
    client connection, stopped afterwards."""
    async with client_connection(nats_url) as (nc, transport):
        worker = Worker(
            WorkerSettings(
                nats_url, prefix=prefix, device="cpu", heartbeat_interval=30, drain_timeout=5, **settings
            )
        )
        await worker.start()
        try:
            yield Harness(worker, nc, transport)
        finally:
            await within(worker.stop(), "worker stop", 30)
