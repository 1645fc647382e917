"""Several registry instances over one PostgreSQL database, for availability: they share the
requests (one nats.micro queue group), launch a uid once however many ask, and a second one
joining does not wipe the first one's state."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker_client import AsyncClient, Conflict
from tests.support.pool import Pool, echo_definition
from tests.support.waits import eventually_despite_errors

pytestmark = pytest.mark.slow


async def test_two_registries_on_one_database_launch_a_uid_once(
    tmp_path: Path, nats_url: str, unique: str, postgres_url: str
) -> None:
    pool = Pool(tmp_path, nats_url, f"m{unique}", db_url=postgres_url)
    try:
        first, w = pool.registry("registry-1"), pool.worker(f"w-{unique}")
        await asyncio.gather(first.wait_ready(), w.wait_ready())
        async with AsyncClient(nats_url, prefix=pool.prefix, timeout=60) as client:
            # A transient registration, made before the second instance starts: joining a pool
            # is not a restart of it, so it must survive.
            await client.register_model("LLM", echo_definition("echo"), persist=False)
            second = pool.registry("registry-2")
            await second.wait_ready()
            assert "joining 1 registry instance" in second.log()

            async def both_serve() -> bool:
                # Each instance logs the requests it answers at debug level only, so ask until
                # both have appeared in `nats micro` terms: two instances answer $SRV.PING.
                from registry_service import other_registries

                assert client._nc is not None
                return len(await other_registries(client._nc, pool.prefix, window=0.3)) == 2

            await eventually_despite_errors(both_serve, "both registry instances to answer")
            for _ in range(6):
                assert [r["model_name"] for r in await client.list_model_registrations("LLM")] == ["echo"]

            async def worker_seen() -> bool:
                return any(x["worker_id"] == w.name and x["alive"] for x in await client.list_workers())

            await eventually_despite_errors(worker_seen, "the worker in the registries")

            uid = f"once-{unique}"
            loads: list[dict[str, Any]] = []
            assert client._nc is not None

            async def on_event(msg: Any) -> None:
                event = msgpack.unpackb(msg.data)
                # The worker's own "ready" (the registry's copy of it carries a status).
                if event.get("worker_id") and event["stage"] == "ready" and event.get("status") is None:
                    loads.append(event)

            await client._nc.subscribe(client.subjects.events(uid), cb=on_event)
            await client._nc.flush()
            results = await asyncio.gather(
                *(client.launch_model("echo", model_uid=uid, progress=False) for _ in range(10)),
                return_exceptions=True,
            )
            assert results.count(uid) == 1, results
            assert all(isinstance(r, Conflict) for r in results if r != uid), results

            async def replicas_on_worker() -> list[dict[str, Any]] | None:
                [info] = [x for x in await client.list_workers() if x["worker_id"] == w.name]
                return info["replicas"] or None

            [replica] = await eventually_despite_errors(replicas_on_worker, "the replica on the worker")
            assert replica["model_uid"] == uid
            assert len(loads) == 1, f"the worker loaded {uid} {len(loads)} times"
            # Both instances describe it (from the shared database).
            for _ in range(6):
                assert (await client.describe_model(uid))["status"] == "ready"

            # Availability: one instance dies, the other keeps answering.
            first.signal(signal.SIGKILL)
            await first.wait(10)
            model: Any = await client.get_model(uid)
            assert (await model.generate("a b"))["choices"][0]["text"] == "a b"
            for _ in range(6):
                assert uid in await client.list_models()
            await client.terminate_model(uid)
            assert await client.list_models() == {}
    finally:
        pool.close()
