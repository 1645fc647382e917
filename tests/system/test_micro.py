"""The NATS micro protocol as ``ServiceHost`` answers it (ADR-32), asked by a plain nats-py client.

``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS``, each as ``$SRV.<VERB>`` (every service),
``$SRV.<VERB>.<name>`` (every instance of a name) and ``$SRV.<VERB>.<name>.<id>`` (one
instance), with the ``io.nats.micro.v1`` reply shapes that ``nats micro`` reads.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker_client import BadRequest
from broker_client.runtime import (
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    STATS_RESPONSE_TYPE,
    Responder,
    ServiceHost,
    connect,
)

WAIT = 10.0
VERBS = {"PING": PING_RESPONSE_TYPE, "INFO": INFO_RESPONSE_TYPE, "STATS": STATS_RESPONSE_TYPE}
IDENTITY_KEYS = {"type", "name", "id", "version", "metadata"}
INFO_ENDPOINT_KEYS = {"name", "subject", "queue_group", "metadata"}
STATS_ENDPOINT_KEYS = {
    "name",
    "subject",
    "queue_group",
    "num_requests",
    "num_errors",
    "last_error",
    "processing_time",
    "average_processing_time",
}


async def echo(resp: Responder) -> None:
    await resp.respond(resp.body())


async def slow_echo(resp: Responder) -> None:
    await asyncio.sleep(0.002)  # some processing time to count, in a task of its own
    await resp.respond(resp.body())


async def refuse(resp: Responder) -> None:
    raise BadRequest(f"refused on {resp.subject!r}")


@pytest.fixture
async def pair(nats_url: str, unique: str) -> AsyncIterator[tuple[ServiceHost, ServiceHost]]:
    """Two instances of one service, each on its own connection, with several endpoints."""
    hosts: list[ServiceHost] = []
    for i in range(2):
        conn = await connect(nats_url, name=f"micro-{unique}-{i}")
        host = ServiceHost(
            conn,
            name=f"micro-{unique}",
            version="1.2.3",
            description="two of a kind",
            metadata={"worker_id": f"w{i}", "prefix": "natserve"},
        )
        await host.start()
        await host.add_endpoint(
            "echo", f"{unique}.echo", echo, queue_group=f"{unique}.group", metadata={"model_uid": "m1"}
        )
        await host.add_endpoint("slow", f"{unique}.slow", slow_echo, eager=True)
        await host.add_endpoint("refuse", f"{unique}.refuse", refuse)
        await host.until_subscribed()
        hosts.append(host)
    try:
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            await host.stop()
            await host.nc.close()


async def gather_replies(nc: NATS, subject: str, want: int, ours: str) -> list[dict[str, Any]]:
    """The replies to one request on ``subject`` from services named ``ours`` (others on the
    server may answer the all-services form too), until ``want`` of them arrived; then a short
    bounded look for one more, which must not come."""
    inbox = nc.new_inbox()
    got: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe(inbox, cb=got.put)
    replies: list[dict[str, Any]] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        while len(replies) < want:
            try:
                msg = await asyncio.wait_for(got.get(), WAIT)
            except TimeoutError:
                raise AssertionError(f"{len(replies)} of {want} replies on {subject} in {WAIT} s") from None
            reply = json.loads(msg.data)
            if reply["name"] == ours:
                replies.append(reply)
        # An absence has no event to wait for: a bounded window, as `nats req --replies` has.
        extra = []
        with pytest.raises(TimeoutError):
            while True:
                msg = await asyncio.wait_for(got.get(), 0.3)
                if json.loads(msg.data)["name"] == ours:
                    extra.append(msg)
                    break
        assert not extra, f"more than {want} replies on {subject}"
    finally:
        await sub.unsubscribe()
    return replies


def check_identity(reply: dict[str, Any], verb: str, host: ServiceHost) -> None:
    assert reply["type"] == VERBS[verb]
    assert reply["name"] == host.name and reply["id"] == host.id
    assert reply["version"] == "1.2.3"
    assert reply["metadata"] == dict(host.metadata)


@pytest.mark.parametrize("verb", list(VERBS))
async def test_each_verb_answers_in_its_three_forms(
    nc: NATS, pair: tuple[ServiceHost, ServiceHost], verb: str
) -> None:
    first, second = pair
    name = first.name
    assert first.id != second.id
    by_id = {first.id: first, second.id: second}

    # The all-services form and the name form reach both instances.
    for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{name}"):
        replies = await gather_replies(nc, subject, 2, name)
        assert {r["id"] for r in replies} == set(by_id), subject
        for reply in replies:
            check_identity(reply, verb, by_id[reply["id"]])
    # The id form reaches one.
    for host in pair:
        [reply] = await gather_replies(nc, f"$SRV.{verb}.{name}.{host.id}", 1, name)
        check_identity(reply, verb, host)


async def test_ping_is_the_identity_alone(nc: NATS, pair: tuple[ServiceHost, ServiceHost]) -> None:
    host = pair[0]
    reply = json.loads((await nc.request(f"$SRV.PING.{host.name}.{host.id}", b"", timeout=WAIT)).data)
    assert set(reply) == IDENTITY_KEYS
    check_identity(reply, "PING", host)


Pair = tuple[ServiceHost, ServiceHost]


async def test_info_lists_every_endpoint(nc: NATS, pair: Pair, unique: str) -> None:
    host = pair[1]
    reply = json.loads((await nc.request(f"$SRV.INFO.{host.name}.{host.id}", b"", timeout=WAIT)).data)
    assert set(reply) == IDENTITY_KEYS | {"description", "endpoints"}
    check_identity(reply, "INFO", host)
    assert reply["description"] == "two of a kind"
    assert all(set(e) == INFO_ENDPOINT_KEYS for e in reply["endpoints"])
    assert reply["endpoints"] == [
        {
            "name": "echo",
            "subject": f"{unique}.echo",
            "queue_group": f"{unique}.group",
            "metadata": {"model_uid": "m1"},
        },
        # An endpoint that names no queue group is in the protocol's default one.
        {"name": "slow", "subject": f"{unique}.slow", "queue_group": "q", "metadata": {}},
        {"name": "refuse", "subject": f"{unique}.refuse", "queue_group": "q", "metadata": {}},
    ]


async def test_stats_count_each_endpoint(nc: NATS, pair: Pair, unique: str) -> None:
    before = datetime.now(UTC)
    # The queue groups send each request to one of the two instances: the counts add up.
    for _ in range(3):
        assert (await nc.request(f"{unique}.echo", b'{"n":1}', timeout=WAIT)).data == b'{"n":1}'
    for _ in range(4):
        assert (await nc.request(f"{unique}.slow", b'{"n":2}', timeout=WAIT)).data == b'{"n":2}'
    refused = await nc.request(f"{unique}.refuse", b"{}", timeout=WAIT)
    assert refused.headers is not None and refused.headers["Nats-Service-Error-Code"] == "400"

    totals: dict[str, list[int]] = {"echo": [0, 0], "slow": [0, 0], "refuse": [0, 0]}
    for host in pair:
        msg = await nc.request(f"$SRV.STATS.{host.name}.{host.id}", b"", timeout=WAIT)
        reply = json.loads(msg.data)
        assert set(reply) == IDENTITY_KEYS | {"started", "endpoints"}
        check_identity(reply, "STATS", host)
        started = datetime.fromisoformat(reply["started"].replace("Z", "+00:00"))
        assert reply["started"].endswith("Z") and started.tzinfo is not None
        assert before - timedelta(minutes=1) < started <= datetime.now(UTC)
        assert [e["name"] for e in reply["endpoints"]] == ["echo", "slow", "refuse"]
        for endpoint in reply["endpoints"]:
            assert set(endpoint) == STATS_ENDPOINT_KEYS
            count, errors = endpoint["num_requests"], endpoint["num_errors"]
            totals[endpoint["name"]][0] += count
            totals[endpoint["name"]][1] += errors
            # Nanoseconds, the average over the requests counted.
            assert endpoint["processing_time"] >= 0
            expected_average = endpoint["processing_time"] // count if count else 0
            assert endpoint["average_processing_time"] == expected_average
            if endpoint["name"] == "slow" and count:
                assert endpoint["processing_time"] >= count * 1_000_000  # 2 ms each
            if endpoint["name"] == "refuse" and count:
                assert endpoint["last_error"] == f"refused on '{unique}.refuse'"
            else:
                assert endpoint["last_error"] == ""
    assert totals == {"echo": [3, 0], "slow": [4, 0], "refuse": [1, 1]}


async def test_removed_endpoints_and_a_stopped_service_leave_the_protocol(
    nc: NATS, pair: tuple[ServiceHost, ServiceHost], unique: str
) -> None:
    first, second = pair
    await first.remove_endpoints({f"{unique}.slow", f"{unique}.refuse"})
    info = json.loads((await nc.request(f"$SRV.INFO.{first.name}.{first.id}", b"", timeout=WAIT)).data)
    assert [e["name"] for e in info["endpoints"]] == ["echo"]
    stats = json.loads((await nc.request(f"$SRV.STATS.{first.name}.{first.id}", b"", timeout=WAIT)).data)
    assert [e["name"] for e in stats["endpoints"]] == ["echo"]
    # The other instance still serves them.
    assert (await nc.request(f"{unique}.slow", b"{}", timeout=WAIT)).data == b"{}"

    await first.stop()
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"$SRV.PING.{first.name}.{first.id}", b"", timeout=WAIT)
    [left] = await gather_replies(nc, f"$SRV.PING.{first.name}", 1, first.name)
    assert left["id"] == second.id


def test_invalid_names_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match="'bad name'"):
        ServiceHost(None, name="bad name", version="1.0.0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'1\.0'"):
        ServiceHost(None, name="good", version="1.0")  # type: ignore[arg-type]


async def test_invalid_endpoints_are_refused_with_their_values(nats_url: str, unique: str) -> None:
    conn = await connect(nats_url, name=f"micro-bad-{unique}")
    host = ServiceHost(conn, name=f"bad-{unique}", version="0.0.1")
    try:
        with pytest.raises(ValueError, match="'has space'"):
            await host.add_endpoint("has space", f"{unique}.a", echo)
        with pytest.raises(ValueError, match=r"'a\.>\.b'"):
            await host.add_endpoint("wild", "a.>.b", echo)
    finally:
        await host.stop()
        await conn.close()


def test_the_runtime_does_not_import_nats_micro() -> None:
    code = "import sys, broker_client.runtime; sys.exit('nats.micro' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
