"""Re-placement keeps the launch, with real processes: a replica that the registry launches again
after its worker was SIGKILLed is created with the options its launch asked for.

The registry re-creates the replica from the model's row in SQL (``LaunchPlan.from_row``), so
every launch option a replica is created with must be stored there: here the launch limits,
``max_tokens_limit`` (the default and the cap of a request's ``max_tokens``) and ``rate_limit``
(requests per second per replica, a 429 past it).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from broker_client import AsyncClient, Overloaded
from tests.support.pool import Pool, echo_definition, words
from tests.support.waits import eventually_despite_errors

pytestmark = pytest.mark.slow


async def test_a_replica_re_placed_after_its_worker_is_killed_keeps_the_launch_limits(
    pool: Pool, unique: str
) -> None:
    registry = pool.registry()
    a, b = pool.worker(f"wa-{unique}"), pool.worker(f"wb-{unique}")
    await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
    async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:

        async def both_alive() -> bool:
            alive = {w["worker_id"] for w in await client.list_workers() if w["alive"]}
            return {a.name, b.name} <= alive

        await eventually_despite_errors(both_alive, "workers a and b to be alive in the registry")
        await client.register_model("LLM", echo_definition("capped"))
        # One request per 100 s (a burst of one): the second request in a row is a 429.
        uid = await client.launch_model(
            "capped", worker_id=a.name, max_tokens_limit=3, rate_limit=0.01, progress=False
        )
        model: Any = await client.get_model(uid)

        async def limited_on(worker_id: str) -> None:
            # An echo of ten words, capped at three tokens by max_tokens_limit.
            out = await model.generate(words(10))
            assert out["choices"][0]["text"] == words(3), f"max_tokens_limit is lost on {worker_id}"
            assert out["usage"]["completion_tokens"] == 3
            with pytest.raises(Overloaded, match=r"rate limit of 0\.01 requests/s"):
                await model.generate(words(10))

        await limited_on(a.name)
        a.signal(signal.SIGKILL)

        async def on_b() -> dict[str, Any] | None:
            d = await client.describe_model(uid)
            [r] = d["replicas"]
            return d if (r["worker_id"], r["status"]) == (b.name, "ready") else None

        await eventually_despite_errors(
            on_b, "the killed worker's replica to be re-placed on worker b", timeout=30
        )
        assert "re-placing it on" in registry.log()
        # The replica on b was created from the row: the same limits, a fresh rate budget.
        await limited_on(b.name)


async def test_replicas_re_placed_after_a_kill_go_where_their_siblings_are_not(
    pool: Pool, unique: str
) -> None:
    """Three workers, three models of two replicas: after one worker is SIGKILLed, each lost
    replica goes to the live worker that holds none of its model's replicas."""
    registry = pool.registry()
    workers = [pool.worker(f"w{n}-{unique}") for n in "abc"]
    await asyncio.gather(registry.wait_ready(), *(w.wait_ready() for w in workers))
    names = {w.name for w in workers}
    async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:

        async def all_alive() -> bool:
            return names <= {w["worker_id"] for w in await client.list_workers() if w["alive"]}

        await eventually_despite_errors(all_alive, "the three workers to be alive in the registry")
        uids = []
        for n in range(3):
            await client.register_model("LLM", echo_definition(f"pair{n}"))
            uids.append(await client.launch_model(f"pair{n}", replica=2, progress=False))

        async def placed() -> dict[str, list[str]]:
            out = {}
            for uid in uids:
                d = await client.describe_model(uid)
                out[uid] = [r["worker_id"] for r in d["replicas"] if r["status"] == "ready"]
            return out

        for uid, on in (await placed()).items():
            assert len(set(on)) == 2, f"the launch put both replicas of {uid} on one worker: {on}"
        # The worker holding the most replicas goes: the most re-placements to get right.
        counts = {w.name: sum(on.count(w.name) for on in (await placed()).values()) for w in workers}
        victim = max(workers, key=lambda w: counts[w.name])
        lost = counts[victim.name]
        victim.signal(signal.SIGKILL)
        live = names - {victim.name}

        async def re_placed() -> dict[str, list[str]] | None:
            now = await placed()
            ok = all(len(on) == 2 and set(on) <= live for on in now.values())
            return now if ok else None

        now = await eventually_despite_errors(
            re_placed, f"the {lost} replicas of {victim.name} to be re-placed", timeout=40
        )
        for uid, on in now.items():
            assert len(set(on)) == 2, f"a re-placed replica of {uid} joined its sibling: {on}"
