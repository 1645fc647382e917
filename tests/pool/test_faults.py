"""Faults, with real processes: ``natserve registry`` and ``natserve worker`` as subprocesses on a
real nats-server, killed and restarted the way machines and operators do it.

Workers beat every 0.5 s and the registry's dead window is 2 s (``NATSERVE_DEAD_AFTER``), so a
death is noticed within about 2.5 s. The models are ``echo:`` models with a per-word delay,
which makes a request last long enough to be in flight when the fault happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from broker_client import AsyncClient, TransportError, Unavailable, WorkerLaunch
from broker_client.runtime import NatsTransport
from tests.support.pool import Pool, echo_definition, words
from tests.support.waits import eventually_despite_errors, within

pytestmark = pytest.mark.slow


async def workers_alive(client: AsyncClient, *worker_ids: str) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        listed = await client.list_workers()
        alive = {w["worker_id"] for w in listed if w["alive"]}
        return listed if set(worker_ids) <= alive else None

    return await eventually_despite_errors(probe, f"workers {worker_ids} to be alive in the registry")


async def stream_on(model: Any, worker_id: str, prompt: str, tries: int = 30) -> Any:
    """A stream of ``prompt`` that the replica on ``worker_id`` took (the queue group is random:
    open streams until one lands there, closing the others)."""
    for _ in range(tries):
        stream = await model.generate(prompt, {"stream": True, "max_tokens": len(prompt.split())})
        if stream.worker_id == worker_id:
            return stream
        await stream.aclose()
    raise AssertionError(f"no stream landed on {worker_id} in {tries} tries")


@contextlib.asynccontextmanager
async def notices(nats_url: str, prefix: str) -> AsyncIterator[list[dict[str, Any]]]:
    """The worker notices the registry publishes on <prefix>.workers.events."""
    seen: list[dict[str, Any]] = []
    nc = await nats.connect(nats_url)

    async def on_msg(msg: Any) -> None:
        seen.append(msgpack.unpackb(msg.data))

    await nc.subscribe(f"{prefix}.workers.events", cb=on_msg)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.close()


async def test_a_killed_worker_fails_fast_its_requests_are_retried_and_its_replica_moves(
    pool: Pool, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker_client")
    registry = pool.registry()
    a, b = pool.worker(f"wa-{unique}"), pool.worker(f"wb-{unique}")
    await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
    async with (
        AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client,
        notices(pool.nats_url, pool.prefix) as seen,
    ):
        await workers_alive(client, a.name, b.name)
        # 50 ms a word: a 60-word request takes 3 s.
        await client.register_model("LLM", echo_definition("slow", "echo:?delay=0.05"))
        uid = await client.launch_model("slow", replica=2, progress=False)
        described = await client.describe_model(uid)
        assert sorted(r["worker_id"] for r in described["replicas"]) == [a.name, b.name]
        model: Any = await client.get_model(uid)

        on_a = await stream_on(model, a.name, words(400))
        first = await within(on_a.__anext__(), "the first chunk from worker a")
        assert first["choices"][0]["text"] == "w0"
        # Ten calls over two replicas at random: all ten miss worker a one time in 1024.
        calls = [asyncio.create_task(model.generate(words(60), {"max_tokens": 60})) for _ in range(10)]

        async def a_is_busy() -> bool:
            [info] = [w for w in await client.list_workers() if w["worker_id"] == a.name]
            return sum(r["active"] + r["waiting"] for r in info["replicas"]) >= 2

        await eventually_despite_errors(
            a_is_busy, "worker a to hold the stream and some of the calls", timeout=10
        )
        a.signal(signal.SIGKILL)
        killed = time.monotonic()

        # The stream on the dead worker ends with a 503 within the dead window, not at its
        # timeout, and not silently.
        with pytest.raises(Unavailable, match=f"worker '{a.name}'.*died"):
            async for _ in on_a:
                pass
        noticed = time.monotonic() - killed
        assert noticed < 6, f"the stream failed {noticed:.1f} s after the kill"

        # The non-streaming calls on it were sent once more and reached worker b.
        done = await within(asyncio.gather(*calls), "the in-flight calls", timeout=40)
        assert all(d["choices"][0]["text"] == words(60) for d in done)
        retried = [r for r in caplog.records if "sending it once more" in r.getMessage()]
        assert len(retried) >= 1, "the calls on worker a were not retried"
        assert all(f"worker '{a.name}'" in r.getMessage() for r in retried)

        # The registry announced the death and moved the replica to b.
        assert any(n["worker_id"] == a.name and n["state"] == "dead" for n in seen)

        async def moved() -> dict[str, Any] | None:
            d = await client.describe_model(uid)
            on_b = [r for r in d["replicas"] if r["worker_id"] == b.name and r["status"] == "ready"]
            return d if len(on_b) == 2 else None

        described = await eventually_despite_errors(
            moved, "the lost replica to be re-placed on worker b", timeout=20
        )
        assert described["status"] == "ready"
        [info_a] = [w for w in await client.list_workers() if w["worker_id"] == a.name]
        assert info_a["alive"] is False and info_a["state"] == "dead"

        # Later requests succeed.
        for _ in range(4):
            out = await model.generate("one two three", {"max_tokens": 3})
            assert out["choices"][0]["text"] == "one two three"
        assert "re-placing it on" in registry.log()


async def test_a_killed_registry_comes_back_from_sql_without_duplicates_or_orphans(
    tmp_path: Path, nats_url: str, unique: str, db_url: str
) -> None:
    pool = Pool(tmp_path, nats_url, f"r{unique}", db_url=db_url)
    try:
        registry = pool.registry()
        w = pool.worker(f"w-{unique}")
        await asyncio.gather(registry.wait_ready(), w.wait_ready())
        async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:
            await workers_alive(client, w.name)
            await client.register_model("LLM", echo_definition("echo"), persist=True)
            uid = await client.launch_model("echo", model_uid=f"e-{unique}", progress=False)
            model: Any = await client.get_model(uid)
            assert (await model.generate("a b", {"max_tokens": 2}))["choices"][0]["text"] == "a b"

            loads: list[dict[str, Any]] = []
            nc = client._nc
            assert nc is not None

            async def on_event(msg: Any) -> None:
                event = msgpack.unpackb(msg.data)
                if event.get("worker_id") and event["stage"] in ("loading", "ready"):
                    loads.append(event)

            await nc.subscribe(client.subjects.events(uid), cb=on_event)
            registry.signal(signal.SIGKILL)
            await registry.wait(10)

            # The pool serves without its registry.
            assert (await model.generate("c d", {"max_tokens": 2}))["choices"][0]["text"] == "c d"
            # Meanwhile a replica appears that no registry recorded (a launch whose registry
            # died): the test sends the worker command itself.
            transport = NatsTransport(nc)
            stray = f"stray-{unique}"
            command = WorkerLaunch(
                model_uid=stray,
                model_type="LLM",
                model_name="echo",
                definition=echo_definition("echo"),
                spec=echo_definition("echo")["model_specs"][0],
                device="cpu",
            )
            await transport.request(
                client.subjects.worker(w.name, "launch"), command.model_dump(mode="json"), timeout=30
            )
            loads.clear()

            again = pool.registry("registry-2")
            await again.wait_ready()
            described = await client.describe_model(uid)
            assert described["status"] == "ready"
            assert [(r["worker_id"], r["status"]) for r in described["replicas"]] == [(w.name, "ready")]

            async def orphan_gone() -> list[dict[str, Any]] | None:
                [info] = [x for x in await client.list_workers() if x["worker_id"] == w.name]
                held = [(r["model_uid"], r["replica_index"]) for r in info["replicas"]]
                return info["replicas"] if held == [(uid, 0)] else None

            [replica] = await eventually_despite_errors(
                orphan_gone, "the orphan replica to be terminated", timeout=20
            )
            # The same replica, not a second load: it kept counting its requests.
            assert replica["requests"] >= 2
            assert loads == [], f"the model was loaded again: {loads}"
            assert (await model.generate("e f", {"max_tokens": 2}))["choices"][0]["text"] == "e f"
            assert [m for m in await client.list_models()] == [uid]
            assert "does not know" in again.log()
    finally:
        pool.close()


async def test_a_restarted_nats_server_cuts_streams_loudly_and_everyone_reconnects(
    tmp_path: Path, own_nats_server: Any, unique: str
) -> None:
    pool = Pool(tmp_path, own_nats_server.url, f"n{unique}")
    try:
        registry, w = pool.registry(), pool.worker(f"w-{unique}")
        await asyncio.gather(registry.wait_ready(), w.wait_ready())
        async with AsyncClient(own_nats_server.url, prefix=pool.prefix, timeout=60) as client:
            await workers_alive(client, w.name)
            await client.register_model("LLM", echo_definition("slow", "echo:?delay=0.05"), persist=True)
            uid = await client.launch_model("slow", progress=False)
            model: Any = await client.get_model(uid)
            stream = await model.generate(words(400), {"stream": True, "max_tokens": 400})
            await within(stream.__anext__(), "the first chunk")

            own_nats_server.restart()  # same port and JetStream store
            restarted = time.monotonic()
            with pytest.raises(TransportError, match="lost the connection"):
                async for _ in stream:
                    pass
            assert time.monotonic() - restarted < 10

            async def generates() -> bool:
                out = await model.generate("back again", {"max_tokens": 2}, timeout=5)
                return bool(out["choices"][0]["text"] == "back again")

            await eventually_despite_errors(generates, "the client and the worker to serve again", timeout=30)
            await workers_alive(client, w.name)
            # Registry and worker talk again: a new launch goes through.
            uid2 = await client.launch_model("slow", model_uid=f"second-{unique}", progress=False)
            model2: Any = await client.get_model(uid2)
            assert (await model2.generate("x y", {"max_tokens": 2}))["choices"][0]["text"] == "x y"
            # The first model survived the restart.
            assert (await client.describe_model(uid))["status"] == "ready"
    finally:
        pool.close()


async def test_sigterm_drains_a_worker_then_it_exits(pool: Pool, unique: str) -> None:
    registry = pool.registry()
    a, b = pool.worker(f"wa-{unique}"), pool.worker(f"wb-{unique}")
    await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
    async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:
        await workers_alive(client, a.name, b.name)
        await client.register_model("LLM", echo_definition("slow", "echo:?delay=0.05"))
        uid = await client.launch_model("slow", replica=2, progress=False)
        model: Any = await client.get_model(uid)
        on_a = await stream_on(model, a.name, words(60))
        texts = [(await on_a.__anext__())["choices"][0]["text"]]

        a.signal(signal.SIGTERM)

        async def a_stopping() -> bool:
            [info] = [w for w in await client.list_workers() if w["worker_id"] == a.name]
            return info.get("status") in ("stopping", "stopped")

        await eventually_despite_errors(a_stopping, "worker a to say it is stopping", timeout=10)
        # New requests go to b while a drains.
        for _ in range(4):
            s = await model.generate("p q r", {"stream": True})
            assert s.worker_id == b.name
            assert "".join([c["choices"][0]["text"] async for c in s]) == "p q r"
        # The request a had in flight finishes, whole.
        texts += [c["choices"][0]["text"] async for c in on_a]
        assert "".join(texts) == words(60)
        assert await a.wait(30) == 0, a.tail()

        async def moved() -> bool:
            d = await client.describe_model(uid)
            return [r["worker_id"] for r in d["replicas"]] == [b.name, b.name] and all(
                r["status"] == "ready" for r in d["replicas"]
            )

        await eventually_despite_errors(
            moved, "the stopped worker's replica to be re-placed on b", timeout=20
        )
        assert "Traceback" not in a.log()


async def test_a_real_models_replica_is_loaded_again_elsewhere_when_its_worker_dies(
    pool: Pool, unique: str, tiny_llama_dir: Path
) -> None:
    """The tiny Llama, loaded from disk by worker a; a is killed; worker b loads it in its place."""
    env = {"NATSERVE_MODEL_ROOTS": str(tiny_llama_dir.parent), "HF_HUB_OFFLINE": "1"}
    registry = pool.registry()
    a, b = pool.worker(f"wa-{unique}", **env), pool.worker(f"wb-{unique}", **env)
    await asyncio.gather(registry.wait_ready(), a.wait_ready(), b.wait_ready())
    definition = {
        "version": 1,
        "model_name": "tiny",
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "context_length": 256,
        "model_specs": [
            {
                "model_format": "pytorch",
                # What it really is: a few million parameters (placement estimates from this).
                "model_size_in_billions": 0.01,
                "quantizations": ["none"],
                "model_uri": f"file://{tiny_llama_dir}",
            }
        ],
    }
    async with AsyncClient(pool.nats_url, prefix=pool.prefix, timeout=60) as client:
        await workers_alive(client, a.name, b.name)
        await client.register_model("LLM", definition)
        uid = await client.launch_model("tiny", worker_id=a.name, progress=False)
        model: Any = await client.get_model(uid)
        before = await model.generate("SELECT", {"max_tokens": 4, "temperature": 0})
        a.signal(signal.SIGKILL)

        async def on_b() -> dict[str, Any] | None:
            d = await client.describe_model(uid)
            [r] = d["replicas"]
            return d if (r["worker_id"], r["status"]) == (b.name, "ready") else None

        described = await eventually_despite_errors(
            on_b, "the tiny Llama to be loaded again on worker b", timeout=40
        )
        assert described["replicas"][0]["memory_bytes"] > 0
        # The same weights: greedy decoding gives the same completion.
        after = await model.generate("SELECT", {"max_tokens": 4, "temperature": 0})
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
