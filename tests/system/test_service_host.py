"""ServiceHost's eager requests: started in the subscription's task, moved to a Task of their own
at their first wait, with their context, cancellation and errors intact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from broker_client import ServiceError, logcontext
from broker_client.runtime import (
    ACCEPTED_HEADER,
    ACK_DELAY,
    ACK_HEADER,
    ERROR_CODE_HEADER,
    REQUEST_ID_HEADER,
    Responder,
    ServiceHost,
    connect,
    current_request,
)
from tests.support.waits import within


@pytest.fixture
async def host(nats_url: str, unique: str) -> AsyncIterator[tuple[ServiceHost, Any]]:
    nc = await connect(nats_url, name=f"host-{unique}")
    host = ServiceHost(nc, name=f"eager-{unique}", version="0.0.1", metadata={"worker_id": "w-eager"})
    await host.start()
    try:
        yield host, nc
    finally:
        await host.stop()
        await nc.close()


async def test_a_request_that_never_waits_gets_no_task(host: tuple[ServiceHost, Any], unique: str) -> None:
    service, nc = host
    seen: dict[str, Any] = {}

    async def handler(resp: Responder) -> None:
        seen["task"] = current_request().task
        seen["context"] = logcontext.current()
        await resp.respond({"ok": True})

    await service.add_endpoint("now", f"{unique}.now", handler, eager=True, metadata={"model_uid": "m1"})
    await service.until_subscribed()
    reply = await nc.request(f"{unique}.now", b"{}", timeout=10, headers={REQUEST_ID_HEADER: "r-now"})
    assert reply.data == b'{"ok":true}'
    assert seen["task"] is None, "a request that ran to its end at once needs no task"
    assert seen["context"] == {"worker_id": "w-eager", "model_uid": "m1", "request_id": "r-now"}
    # Its request id did not leak into the subscription's own context.
    again = await nc.request(f"{unique}.now", b"{}", timeout=10)
    assert again.data == b'{"ok":true}' and "request_id" not in seen["context"]


async def test_a_waiting_request_moves_to_its_own_task(host: tuple[ServiceHost, Any], unique: str) -> None:
    service, nc = host
    seen: dict[str, Any] = {}

    async def handler(resp: Responder) -> None:
        seen["before"] = current_request().task
        await asyncio.sleep(0.01)
        seen["after"] = current_request().task
        seen["current"] = asyncio.current_task()
        seen["request_id"] = logcontext.get("request_id")
        await resp.respond({"waited": True})

    await service.add_endpoint("wait", f"{unique}.wait", handler, eager=True)
    await service.until_subscribed()
    replies = await within(
        asyncio.gather(
            *(
                nc.request(f"{unique}.wait", b"{}", timeout=10, headers={REQUEST_ID_HEADER: f"r{i}"})
                for i in range(20)
            )
        ),
        "20 waiting requests",
    )
    assert all(r.data == b'{"waited":true}' for r in replies)
    assert seen["before"] is None
    assert seen["after"] is seen["current"] and isinstance(seen["current"], asyncio.Task)
    assert seen["request_id"] is not None and seen["request_id"].startswith("r")
    assert await service.wait_idle(5)


async def test_errors_after_the_first_wait_are_answered(host: tuple[ServiceHost, Any], unique: str) -> None:
    service, nc = host

    async def handler(resp: Responder) -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        raise ServiceError("went wrong late", code=409)

    await service.add_endpoint("late", f"{unique}.late", handler, eager=True)
    await service.until_subscribed()
    reply = await nc.request(f"{unique}.late", b"{}", timeout=10)
    assert reply.headers is not None and reply.headers[ERROR_CODE_HEADER] == "409"
    assert b"went wrong late" in reply.data


async def test_cancelling_a_waiting_request_answers_503(host: tuple[ServiceHost, Any], unique: str) -> None:
    service, nc = host
    started = asyncio.Event()
    tasks: list[asyncio.Task[Any] | None] = []

    async def handler(resp: Responder) -> None:
        await asyncio.sleep(0)  # now in a Task of its own
        tasks.append(current_request().task)
        started.set()
        await asyncio.Event().wait()  # until cancelled

    await service.add_endpoint("hang", f"{unique}.hang", handler, eager=True)
    await service.until_subscribed()
    pending = asyncio.ensure_future(nc.request(f"{unique}.hang", b"{}", timeout=10))
    await within(started.wait(), "the request to start")
    task = tasks[0]
    assert task is not None and not task.done()
    task.cancel()
    reply = await within(pending, "the 503 of the cancelled request")
    assert reply.headers is not None and reply.headers[ERROR_CODE_HEADER] == "503"
    assert b"cancelled" in reply.data
    await within(asyncio.wait({task}), "the cancelled task to end")
    assert task.cancelled()
    # The endpoint still answers.
    started.clear()
    second = asyncio.ensure_future(nc.request(f"{unique}.hang", b"{}", timeout=10))
    await within(started.wait(), "a second request to start")
    await service.stop()
    reply = await within(second, "the 503 of a request cut by stop")
    assert reply.headers is not None and reply.headers[ERROR_CODE_HEADER] == "503"


async def test_both_kinds_count_in_micro_stats(host: tuple[ServiceHost, Any], unique: str) -> None:
    service, nc = host

    async def handler(resp: Responder) -> None:
        await resp.respond({})

    await service.add_endpoint("a", f"{unique}.a", handler, eager=True)
    await service.add_endpoint("b", f"{unique}.b", handler)
    await service.until_subscribed()
    for subject in (f"{unique}.a", f"{unique}.b", f"{unique}.a"):
        await nc.request(subject, b"{}", timeout=10)
    stats = await nc.request(f"$SRV.STATS.eager-{unique}", b"", timeout=10)

    endpoints = {e["name"]: e for e in json.loads(stats.data)["endpoints"]}
    assert endpoints["a"]["num_requests"] == 2 and endpoints["b"]["num_requests"] == 1
    assert endpoints["a"]["processing_time"] > 0 and endpoints["b"]["processing_time"] > 0
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"{unique}.none", b"{}", timeout=10)


@pytest.mark.parametrize("asked_in", ["header", "body"])
async def test_only_requests_that_wait_get_their_ack(
    host: tuple[ServiceHost, Any], unique: str, asked_in: str
) -> None:
    """The ack (Natserve-Accepted) is for requests still running after ACK_DELAY: an eager
    request that ends at once sends only its reply, one that waits sends the ack first. Asked
    for with the Natserve-Ack header or, as the natserve client does, in the body."""
    service, nc = host

    async def handler(resp: Responder) -> None:
        body = resp.body()
        resp.accept("w-eager", bool(body.get("ack")))
        delay = body.get("delay", 0)
        if delay:
            await asyncio.sleep(delay)
        await resp.respond({"delay": delay})

    await service.add_endpoint("ack", f"{unique}.ack", handler, eager=True)
    await service.until_subscribed()
    # One inbox for both: a stray ack of the first request would fall due before the second's
    # and show up as one message too many.
    inbox = nc.new_inbox()
    got: asyncio.Queue[Any] = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=got.put)
    messages = []
    for delay in (0, ACK_DELAY * 4):
        if asked_in == "header":
            body = json.dumps({"delay": delay}).encode()
            await nc.publish(f"{unique}.ack", body, reply=inbox, headers={ACK_HEADER: "1"})
        else:
            body = json.dumps({"delay": delay, "ack": True}).encode()
            await nc.publish(f"{unique}.ack", body, reply=inbox)
        while True:
            msg = await within(got.get(), f"the messages of a request waiting {delay} s")
            messages.append(msg)
            if msg.data:
                break
    await sub.unsubscribe()
    kinds = [
        ("ack", msg.headers[ACCEPTED_HEADER]) if not msg.data else ("reply", json.loads(msg.data)["delay"])
        for msg in messages
    ]
    assert kinds == [("reply", 0), ("ack", "w-eager"), ("reply", ACK_DELAY * 4)]
