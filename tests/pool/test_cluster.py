"""Scaling out on NATS's own clustering: three nats-server nodes routed together on loopback,
the registry and two workers (as processes) and a client each on a different node. One node is
killed; the processes that were on it reconnect to the others and the pool keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_client import AsyncClient
from tests.support.nats_server import NatsServer
from tests.support.pool import Pool, echo_definition
from tests.support.ports import free_port, wait_for_port
from tests.support.waits import eventually_despite_errors

pytestmark = pytest.mark.slow


def cluster_config(name: str, cluster_port: int, peers: list[int]) -> str:
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in peers)
    return f"""
server_name: {name}
cluster {{
  name: natserve-test
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""


@pytest.fixture
def cluster() -> Iterator[list[NatsServer]]:
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [
        NatsServer(
            config=cluster_config(f"n{i}", port, [p for p in cluster_ports if p != port]),
        )
        for i, port in enumerate(cluster_ports)
    ]
    try:
        for node in nodes:
            node.start()
        for port in cluster_ports:
            wait_for_port(port)
        yield nodes
    finally:
        for node in nodes:
            node.close()


async def test_the_pool_survives_losing_a_nats_node(
    cluster: list[NatsServer], tmp_path: Path, unique: str
) -> None:
    n1, n2, n3 = cluster
    pool = Pool(tmp_path, n1.url, f"c{unique}")
    try:
        # Each process is given one node; the cluster tells it about the others (nats-py adds
        # the servers a node advertises to its pool), which is what it reconnects to.
        registry = pool.registry(nats_url=n1.url)
        a = pool.worker(f"wa-{unique}", nats_url=n2.url)
        b = pool.worker(f"wb-{unique}", nats_url=n3.url)
        await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
        # The client is given every node, and takes the first (n1, which is killed below).
        urls = [n.url for n in cluster]
        async with AsyncClient(urls, prefix=pool.prefix, timeout=30, dont_randomize=True) as client:
            assert client._nc is not None and client._nc.connected_url is not None
            assert client._nc.connected_url.port == n1.port

            async def both_workers() -> bool:
                alive = {w["worker_id"] for w in await client.list_workers() if w["alive"]}
                return {a.name, b.name} <= alive

            # Heartbeats from n2 and n3 reach the registry on n1: the routes are up.
            await eventually_despite_errors(
                both_workers, "the registry on n1 to hear the workers on n2 and n3"
            )
            await client.register_model("LLM", echo_definition("echo"), persist=True)
            uid = await client.launch_model("echo", replica=2, progress=False)
            described = await client.describe_model(uid)
            assert sorted(r["worker_id"] for r in described["replicas"]) == [a.name, b.name]
            model: Any = await client.get_model(uid)
            for i in range(6):
                assert (await model.generate(f"hello {i}"))["choices"][0]["text"] == f"hello {i}"

            n1.proc.kill()  # type: ignore[union-attr]
            n1.proc.wait(10)  # type: ignore[union-attr]
            killed = time.monotonic()

            async def serves() -> bool:
                out = await model.generate("still here", timeout=5)
                return bool(out["choices"][0]["text"] == "still here")

            await eventually_despite_errors(
                serves, "the client to reconnect to another node and be served", timeout=30
            )
            print(f"served again {time.monotonic() - killed:.1f} s after n1 was killed")
            assert client._nc.connected_url.port in (n2.port, n3.port)
            # The registry was on n1 too: it reconnected, and still sees both workers.
            await eventually_despite_errors(
                both_workers, "the registry to reconnect and see both workers", timeout=30
            )
            for i in range(10):
                assert (await model.generate(f"after {i}"))["choices"][0]["text"] == f"after {i}"
            assert (await client.describe_model(uid))["status"] == "ready"
            assert "reconnected to NATS" in registry.log()
    finally:
        pool.close()
