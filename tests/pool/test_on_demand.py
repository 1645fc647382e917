"""Models that start on demand and stop when idle, on a real registry and real workers in this
process: a model launched with ``min_replicas=0`` loads nothing, its first request (over raw
nats-py, the natserve client) starts it and is answered; once idle past its timeout it has no
replica again, and the next request starts it again; held requests past the bound get a 429;
a launch that does not fit a worker's memory evicts the least recently used idle model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from broker_client import (
    AsyncClient,
    BadRequest,
    NatserveError,
    Overloaded,
    ServerTimeout,
    Unavailable,
    codec,
)
from tests.support.handles import chatting, completed, generating
from tests.support.pool import echo_definition
from tests.support.system import running_registry_and_workers
from tests.support.waits import eventually, within
from workers import Worker


@pytest.fixture
async def pool(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"od{unique}",
        [f"w-{unique}"],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
    ) as (client, workers):
        yield client, workers


def replicas(worker: Worker, uid: str) -> list[int]:
    served = worker.models.get(uid)
    return sorted(served.replicas) if served is not None else []


async def raw_request(nats_url: str, subject: str, body: dict[str, Any], timeout: float = 30) -> Any:
    """A plain nats-py request, as another service (or `nats req`) would send it."""
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    finally:
        await nc.close()
    assert not (msg.headers or {}).get("Nats-Service-Error-Code"), (msg.headers, msg.data)
    return json.loads(msg.data)


async def watch_events(nats_url: str, subject: str) -> tuple[Any, list[dict[str, Any]]]:
    """A connection subscribed to ``subject`` and the decoded events it receives, in order."""
    events: list[dict[str, Any]] = []
    watcher = await nats.connect(nats_url)

    async def on_event(msg: Any) -> None:
        events.append(codec.decode(msg.data, codec.detect(msg.data, msg.headers)))

    await watcher.subscribe(subject, cb=on_event)
    await watcher.flush()
    return watcher, events


async def test_scale_to_zero_first_request_starts_it_idle_stops_it_next_starts_it_again(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = pool
    await client.register_model("LLM", echo_definition("lazy", "echo:?load=0.3"))
    watcher, events = await watch_events(nats_url, client.subjects.events("lazy"))
    uid = await client.launch_model("lazy", min_replicas=0, idle_timeout=1.0, progress=False)
    # Launched, scaled to zero: nothing loaded anywhere.
    assert replicas(worker, uid) == []
    described = await client.describe_model(uid)
    assert (described["state"], described["min_replicas"], described["idle_timeout"]) == (
        "scaled_to_zero",
        0,
        1.0,
    )
    assert described["replicas"] == []

    # The first request, over raw NATS: one slow reply, not an error.
    reply = await within(
        raw_request(nats_url, f"{client.subjects.prefix}.model.{uid}.generate", {"prompt": "a b c"}),
        "the first request to a model scaled to zero",
    )
    assert reply["choices"][0]["text"].split() == ["a", "b", "c"]
    assert replicas(worker, uid) == [0]
    assert (await client.describe_model(uid))["state"] == "running"

    # Idle past its timeout: the model has no replica again.
    async def gone() -> bool:
        return replicas(worker, uid) == [] and (await client.describe_model(uid))["state"] == "scaled_to_zero"

    await eventually(gone, "the idle replica to stop", timeout=20)

    # The next request, through the natserve client, starts it again.
    model = generating(await client.get_model(uid))
    out = completed(
        await within(model.generate("x y", {"max_tokens": 2}), "the request that starts it again")
    )
    assert out["choices"][0]["text"].split() == ["x", "y"]
    assert replicas(worker, uid) == [0]

    # Each start and stop said why.
    async def reasons() -> list[str]:
        said = [e["reason"] for e in events if e.get("reason")]
        return said if said.count("on_demand") >= 4 and "idle_timeout" in said else []

    await eventually(reasons, "the events of two starts and one idle stop", timeout=10)
    why = [(e["stage"], e.get("reason")) for e in events if e.get("reason")]
    assert why[0] == ("ready", "scaled_to_zero"), why
    assert ("starting", "on_demand") in why and ("terminated", "idle_timeout") in why, why
    assert ("scaled_to_zero", "idle_timeout") in why, why
    assert [s for s, r in why if r == "on_demand"].count("starting") == 2, why
    await watcher.close()


@pytest.fixture
async def bounded_pool(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    """A registry that holds at most 2 requests per model, each for at most 1.5 s."""
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"ob{unique}",
        [f"w-{unique}"],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
        hold_max_requests=2,
        hold_max_age=1.5,
    ) as (client, workers):
        yield client, workers


async def test_held_requests_past_the_bound_get_429_and_past_the_age_504(
    bounded_pool: tuple[AsyncClient, list[Worker]],
) -> None:
    client, [worker] = bounded_pool
    # Loads in 0.6 s, within the hold's age: the two held requests are answered.
    await client.register_model("LLM", echo_definition("slowish", "echo:?load=0.6"))
    uid = await client.launch_model("slowish", min_replicas=0, idle_timeout=60, progress=False)
    model = generating(await client.get_model(uid))
    first = [asyncio.ensure_future(model.generate(f"p{i}", {"max_tokens": 1})) for i in range(2)]

    async def both_held() -> bool:
        d = await client.describe_model(uid)
        return d["state"] == "starting" and d["held_requests"] == 2

    await eventually(both_held, "two requests held while the model starts", timeout=10)
    with pytest.raises(Overloaded, match=r"holds 2 requests.*max_requests=2"):
        await model.generate("one too many", {"max_tokens": 1})
    done = await within(asyncio.gather(*first), "the two held requests")
    assert [completed(d)["choices"][0]["text"] for d in done] == ["p0", "p1"]
    assert replicas(worker, uid) == [0]

    # Loads in 5 s, past the hold's age of 1.5 s: a 504 naming the wait, never silence.
    await client.register_model("LLM", echo_definition("slow", "echo:?load=5"))
    uid = await client.launch_model("slow", min_replicas=0, idle_timeout=60, progress=False)
    model = generating(await client.get_model(uid))
    with pytest.raises(ServerTimeout, match=r"did not start within 1.5 s"):
        await within(model.generate("late", {"max_tokens": 1}), "the request held too long")
    await client.terminate_model(uid)


async def test_a_start_that_fails_answers_the_held_requests_with_its_error_and_backs_off(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = pool
    watcher, events = await watch_events(nats_url, client.subjects.events("broken"))

    def starts() -> int:
        return sum(1 for e in events if (e["stage"], e.get("reason")) == ("starting", "on_demand"))

    # The registry takes the URI; the worker refuses its unknown option when it loads it.
    await client.register_model("LLM", echo_definition("broken", "echo:?bogus=1"))
    uid = await client.launch_model("broken", min_replicas=0, progress=False)
    model = chatting(await client.get_model(uid))
    with pytest.raises(BadRequest, match="unknown echo option 'bogus'"):
        await within(model.generate("hi"), "the held request of a failed start")
    # Nothing is left running; the model is still there, backing off, for a later try.
    assert replicas(worker, uid) == []
    d = await client.describe_model(uid)
    assert (d["state"], d["replicas"], d["status"]) == ("backing_off", [], "ready")

    # Within the backoff window (2 s after the first failure) a request is a 503 at once that
    # names the model, the failure and the next try, and nothing is launched.
    for _ in range(3):
        with pytest.raises(Unavailable, match=r"model 'broken' is not started: its last start failed") as e:
            await within(model.chat([{"role": "user", "content": "again"}]), "a 503 within the window", 2)
        assert "unknown echo option 'bogus'" in e.value.message and "the next try is in" in e.value.message
    assert "1 failed start(s) in a row" in e.value.message

    async def said(stage: str, count: int) -> bool:
        return sum(1 for x in events if x["stage"] == stage and x.get("reason") == "start_failed") >= count

    await eventually(lambda: said("backoff", 1), "the event of the first backoff", timeout=10)
    assert starts() == 1, events
    [first] = [x for x in events if x["stage"] == "backoff"]
    assert "no start for 2 s" in first["message"] and "bogus" in first["message"], first

    # Past the window the next request launches again, and fails again: the window doubles.
    async def tried_again() -> bool:
        try:
            await model.generate("later")
        except Unavailable:
            return False  # still within the window
        except BadRequest as exc:
            return "bogus" in exc.message
        raise AssertionError("a model that cannot load answered a request")

    await eventually(tried_again, "the start tried again after the window", timeout=15, interval=0.2)
    await eventually(lambda: said("backoff", 2), "the event of the second backoff", timeout=10)
    assert starts() == 2, events
    assert "no start for 4 s" in [x for x in events if x["stage"] == "backoff"][1]["message"]
    with pytest.raises(Unavailable, match=r"2 failed start\(s\) in a row"):
        await within(model.generate("once more"), "a 503 within the second window", 2)
    assert starts() == 2

    # Once the window is over the model shows scaled to zero again, its next request starting it.
    async def window_over() -> bool:
        return (await client.describe_model(uid))["state"] == "scaled_to_zero"

    await eventually(window_over, "the end of the 4 s window", timeout=10, interval=0.2)
    await watcher.close()


async def test_bad_requests_get_a_400_at_once_without_starting_the_model(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = pool
    await client.register_model("LLM", echo_definition("picky"))
    uid = await client.launch_model("picky", min_replicas=0, progress=False)
    nc = await nats.connect(nats_url)
    try:
        for op, body, what in (
            ("generate", {"prompt": "x", "max_tokens": 3}, "max_tokens"),
            ("embed", {"input": "x"}, "cannot embed"),
        ):
            msg = await nc.request(client.subjects.model(uid, op), json.dumps(body).encode(), timeout=10)
            assert msg.headers is not None and msg.headers["Nats-Service-Error-Code"] == "400", msg
            assert what in json.loads(msg.data)["error"]["message"]
    finally:
        await nc.close()
    assert replicas(worker, uid) == []
    assert (await client.describe_model(uid))["state"] == "scaled_to_zero"


async def test_launch_options_are_checked_and_come_from_the_definition(
    pool: tuple[AsyncClient, list[Worker]],
) -> None:
    client, [worker] = pool
    await client.register_model(
        "LLM", echo_definition("opts", launch={"min_replicas": 0, "idle_timeout": 30})
    )
    with pytest.raises(BadRequest, match=r"min_replicas 2 is more than replica 1"):
        await client.launch_model("opts", min_replicas=2, progress=False)
    with pytest.raises(BadRequest, match=r"idle_timeout"):
        await client.launch_model("opts", idle_timeout=0, progress=False)
    # The definition's launch key: scaled to zero at once, with its idle timeout.
    uid = await client.launch_model("opts", progress=False)
    d = await client.describe_model(uid)
    assert (d["state"], d["min_replicas"], d["idle_timeout"]) == ("scaled_to_zero", 0, 30.0)
    # The request's options win over the definition's.
    uid2 = await client.launch_model("opts", model_uid="opts-kept", min_replicas=1, progress=False)
    d = await client.describe_model(uid2)
    assert replicas(worker, uid2) == [0] and replicas(worker, uid) == []
    assert (d["state"], d["min_replicas"], d["idle_timeout"], len(d["replicas"])) == ("running", 1, 30.0, 1)
    with pytest.raises(BadRequest, match=r"launch\.min_replicas"):
        await client.register_model("LLM", echo_definition("bad", launch={"min_replicas": -1}))


@pytest.fixture
async def small_pool(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    """One worker that offers 1 GB (WorkerSettings.memory_limit); ``echo:?memory=4e8`` models
    take 400 MB of it each, so two fit and a third does not."""
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"om{unique}",
        [f"w-{unique}"],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
        worker_options={"memory_limit": 10**9},
    ) as (client, workers):
        yield client, workers


async def test_a_launch_that_does_not_fit_evicts_the_least_recently_used_idle_model(
    small_pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = small_pool
    watcher, events = await watch_events(nats_url, client.subjects.events("*"))
    for name in ("older", "newer", "big"):
        await client.register_model("LLM", echo_definition(name, "echo:?memory=4e8"))
    for name in ("older", "newer"):
        await client.launch_model(name, min_replicas=0, idle_timeout=600, progress=False)
        model = generating(await client.get_model(name))
        await within(model.generate(f"use {name}", {"max_tokens": 1}), f"the request that starts {name}")
    assert replicas(worker, "older") == [0] and replicas(worker, "newer") == [0]

    async def both_idle() -> bool:
        idle = [(await client.describe_model(n))["replicas"][0]["idle_for"] for n in ("older", "newer")]
        return all(i is not None and i > 0 for i in idle) and idle[0] > idle[1]

    await eventually(both_idle, "both models idle in the heartbeats, 'older' the longer", timeout=10)
    # 200 MB are left: the launch evicts the least recently used idle model, and only it.
    uid = await within(client.launch_model("big", progress=False), "the launch that needs room")
    assert replicas(worker, uid) == [0]
    assert replicas(worker, "older") == [] and replicas(worker, "newer") == [0]
    assert (await client.describe_model("older"))["state"] == "scaled_to_zero"
    assert (await client.describe_model("newer"))["state"] == "running"
    evicted = [e for e in events if e.get("reason") == "evicted_for big"]
    assert {(e["model_uid"], e["stage"]) for e in evicted} == {
        ("older", "terminated"),
        ("older", "scaled_to_zero"),
    }

    # Nothing idle is left to evict beyond what fits: a fourth launch is a 503 naming the need.
    await client.register_model("LLM", echo_definition("huge", "echo:?memory=9e8"))
    with pytest.raises(Unavailable, match="no live worker has room"):
        await client.launch_model("huge", progress=False)
    assert replicas(worker, "newer") == [0], "a launch that cannot fit even so evicts nothing"
    # The evicted model starts again on its next request, evicting nothing that is busy.
    await client.terminate_model(uid)
    model = generating(await client.get_model("older"))
    out = completed(
        await within(model.generate("back", {"max_tokens": 1}), "the evicted model's next request")
    )
    assert out["choices"][0]["text"] == "back"
    await watcher.close()


async def test_the_http_gateway_sees_one_slow_first_reply(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    from natserve.gateway.server import HttpListener, bind_listener, run_gateway

    client, [worker] = pool
    await client.register_model("LLM", echo_definition("webby", "echo:?load=0.3"))
    uid = await client.launch_model("webby", min_replicas=0, idle_timeout=60, progress=False)
    listener = HttpListener(bind_listener("127.0.0.1", 0))
    stop, ready = asyncio.Event(), asyncio.Event()
    gateway = asyncio.create_task(
        run_gateway(
            nats_url=nats_url, listener=listener, stop=stop, ready=ready, prefix=client.subjects.prefix
        )
    )
    try:
        await within(ready.wait(), "the gateway")
        async with httpx.AsyncClient(base_url=listener.url, timeout=60) as http:
            r = await http.post(
                "/v1/completions", json={"model": uid, "prompt": "hello there", "max_tokens": 2}
            )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].split() == ["hello", "there"]
        assert replicas(worker, uid) == [0]
    finally:
        stop.set()
        await within(gateway, "the gateway to stop")


async def test_a_restarted_registry_keeps_the_options_and_starts_and_stops_the_model(
    nats_url: str, sqlite_url: str, unique: str
) -> None:
    from registry_service import Registry
    from workers import WorkerSettings

    prefix = f"or{unique}"
    options: dict[str, Any] = {
        "nats_url": nats_url,
        "db_url": sqlite_url,
        "prefix": prefix,
        "heartbeat_dead_after": 2.0,
    }
    worker = Worker(
        WorkerSettings(nats_url, prefix=prefix, device="cpu", worker_id=f"w-{unique}", heartbeat_interval=0.5)
    )
    first = Registry(**options, resync_window=0.3)
    await first.start()
    await worker.start()
    client = AsyncClient(nats_url, prefix=prefix, timeout=60)
    try:
        await client.register_model("LLM", echo_definition("kept"), persist=True)
        uid = await within(
            client.launch_model("kept", min_replicas=0, idle_timeout=1.0, progress=False), "the launch"
        )
        await first.stop()
        second = Registry(**options, resync_window=0.3)
        await second.start()
        try:
            # The new registry answers the model's subjects and starts it from its stored row.
            model = generating(await client.get_model(uid))
            out = completed(
                await within(model.generate("after restart", {"max_tokens": 2}), "the first request")
            )
            assert out["choices"][0]["text"] == "after restart"
            assert replicas(worker, uid) == [0]
            d = await client.describe_model(uid)
            assert (d["min_replicas"], d["idle_timeout"]) == (0, 1.0)

            async def stopped() -> bool:
                return replicas(worker, uid) == []

            await eventually(stopped, "the idle stop after the restart", timeout=20)
        finally:
            await second.stop()
    finally:
        await client.close()
        await worker.stop(drain_timeout=1)


async def test_a_real_model_starts_on_its_first_request_and_gives_its_memory_back(
    pool: tuple[AsyncClient, list[Worker]], tiny_llama_dir: Path
) -> None:
    client, [worker] = pool
    definition = echo_definition("tiny", f"file://{tiny_llama_dir}", model_ability=["generate"])
    definition["model_specs"][0]["model_size_in_billions"] = 0.001
    await client.register_model("LLM", definition)
    uid = await client.launch_model("tiny", min_replicas=0, idle_timeout=1.0, progress=False)
    assert replicas(worker, uid) == []
    model = generating(await client.get_model(uid))
    out = completed(
        await within(model.generate("hello", {"max_tokens": 3, "temperature": 0}), "the first request", 120)
    )
    assert out["usage"]["completion_tokens"] == 3
    [replica] = (await client.describe_model(uid))["replicas"]
    assert replica["memory_bytes"] > 0

    async def unloaded() -> bool:
        return replicas(worker, uid) == [] and (await client.describe_model(uid))["replicas"] == []

    await eventually(unloaded, "the idle model to be unloaded", timeout=20)


async def test_a_model_whose_replicas_all_failed_scales_to_zero_and_starts_where_there_is_room(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str, unique: str
) -> None:
    from workers import WorkerSettings

    client, [worker] = pool
    await client.register_model("LLM", echo_definition("phoenix"))
    uid = await client.launch_model("phoenix", min_replicas=0, idle_timeout=600, progress=False)
    model = generating(await client.get_model(uid))
    await within(model.generate("one", {"max_tokens": 1}), "the first start")
    # Its only worker goes: the replica has nowhere to go, so the model goes back to zero.
    await worker.stop(drain_timeout=1)

    async def at_zero() -> bool:
        d = await client.describe_model(uid)
        return d["state"] == "scaled_to_zero" and d["replicas"] == [] and d["status"] == "ready"

    await eventually(at_zero, "the model back at zero after its replica failed", timeout=20)
    other = Worker(
        WorkerSettings(
            nats_url,
            prefix=client.subjects.prefix,
            device="cpu",
            worker_id=f"w2-{unique}",
            heartbeat_interval=0.5,
        )
    )
    await other.start()
    try:

        async def seen() -> bool:
            return any(w["worker_id"] == other.worker_id and w["alive"] for w in await client.list_workers())

        await eventually(seen, "the new worker")
        out = completed(await within(model.generate("two", {"max_tokens": 1}), "the start on the new worker"))
        assert out["choices"][0]["text"] == "two"
        assert replicas(other, uid) == [0]
    finally:
        await other.stop(drain_timeout=1)


async def test_terminating_a_model_while_it_starts_answers_its_held_requests(
    pool: tuple[AsyncClient, list[Worker]],
) -> None:
    client, [worker] = pool
    await client.register_model("LLM", echo_definition("brief", "echo:?load=5"))
    uid = await client.launch_model("brief", min_replicas=0, progress=False)
    model = generating(await client.get_model(uid))
    held = asyncio.ensure_future(model.generate("never", {"max_tokens": 1}))

    async def starting() -> bool:
        return (await client.describe_model(uid))["state"] == "starting"

    await eventually(starting, "the start on demand")
    await within(client.terminate_model(uid), "terminate while starting")
    with pytest.raises(NatserveError, match="terminated"):
        await within(held, "the held request's answer")
    assert replicas(worker, uid) == [] and uid not in await client.list_models()


async def test_a_cancel_takes_a_held_request_out_and_answers_it_as_a_worker_would(
    pool: tuple[AsyncClient, list[Worker]], nats_url: str
) -> None:
    client, [worker] = pool
    # Loads in 5 s: both requests are cancelled while the model starts.
    await client.register_model("LLM", echo_definition("patient", "echo:?load=5"))
    uid = await client.launch_model("patient", min_replicas=0, idle_timeout=600, progress=False)
    model = generating(await client.get_model(uid))
    nc = await nats.connect(nats_url)
    try:
        # One through the natserve client, one over raw NATS with a request id of its own.
        by_client = asyncio.ensure_future(model.generate("never", {"max_tokens": 1}, request_id="od-client"))
        inbox = nc.new_inbox()
        raw_replies = await nc.subscribe(inbox, max_msgs=1)
        body = {"prompt": "never either", "request_id": "od-raw"}
        await nc.publish(client.subjects.model(uid, "generate"), json.dumps(body).encode(), reply=inbox)

        async def held(count: int) -> bool:
            d = await client.describe_model(uid)
            return d["state"] == "starting" and d["held_requests"] == count

        await eventually(lambda: held(2), "two requests held while the model starts")
        # The client gives up on its request: it publishes a cancel, which empties its place.
        by_client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await by_client
        await eventually(lambda: held(1), "the client's cancel to take its request out of the hold")

        # A cancel sent as a request is answered as a worker answers it, and so is the request.
        cancel = json.dumps({"request_id": "od-raw"}).encode()
        ack = await nc.request(client.subjects.model(uid, "cancel"), cancel, timeout=10)
        assert json.loads(ack.data) == {"request_id": "od-raw", "cancelled": True}
        answer = await within(raw_replies.next_msg(timeout=10), "the cancelled raw request's answer")
        assert answer.headers is not None and answer.headers["Nats-Service-Error-Code"] == "503", answer
        error = json.loads(answer.data)["error"]
        assert error == {
            "type": "Unavailable",
            "code": 503,
            "message": f"request 'od-raw' on model {uid!r} was cancelled",
        }
        assert (await client.describe_model(uid))["held_requests"] == 0
        # A cancel that names no request is a 400 naming what it got, as from a worker.
        bad = await nc.request(client.subjects.model(uid, "cancel"), b'{"id": "od-raw"}', timeout=10)
        assert bad.headers is not None and bad.headers["Nats-Service-Error-Code"] == "400", bad
        assert json.loads(bad.data)["error"]["message"] == (
            "cancel needs {\"request_id\": \"...\"}, got {'id': 'od-raw'}"
        )
    finally:
        await nc.close()

    # The start goes on; once the model is up, neither cancelled request reached its replica.
    async def up() -> bool:
        return (await client.describe_model(uid))["state"] == "running"

    await eventually(up, "the model to start", timeout=30)
    [replica] = worker.models[uid].replicas.values()
    assert replica.requests == 0
    out = completed(await within(model.generate("now", {"max_tokens": 1}), "a request once it is up"))
    assert out["choices"][0]["text"] == "now" and replica.requests == 1


@pytest.fixture
async def two_workers(
    nats_url: str, sqlite_url: str, unique: str
) -> AsyncIterator[tuple[AsyncClient, list[Worker]]]:
    """Two workers that offer 1 GB each: a placement left free picks the one with the more free
    memory (ties: the greater worker id), so a pinned start is seen where it differs."""
    async with running_registry_and_workers(
        nats_url,
        sqlite_url,
        f"o2{unique}",
        [f"wa-{unique}", f"wb-{unique}"],
        heartbeat_dead_after=2.0,
        resync_window=0.3,
        worker_options={"memory_limit": 10**9},
    ) as (client, workers):
        yield client, workers


async def test_a_start_on_demand_places_on_the_worker_its_launch_pinned(
    two_workers: tuple[AsyncClient, list[Worker]],
) -> None:
    client, workers = two_workers
    await client.register_model("LLM", echo_definition("pinned", "echo:?memory=3e8"))
    # Two models pinned to each worker in turn: left free, the first would go to wb (a tie) and
    # the second to the other worker (more free memory), so every pin is put to the test.
    for w in workers:
        for n in (1, 2):
            uid = await client.launch_model(
                "pinned",
                model_uid=f"{n}-{w.worker_id}",
                worker_id=w.worker_id,
                min_replicas=0,
                progress=False,
            )
            model = generating(await client.get_model(uid))
            out = completed(
                await within(model.generate("here", {"max_tokens": 1}), f"the start pinned to {w.worker_id}")
            )
            assert out["choices"][0]["text"] == "here"
            assert [replicas(x, uid) for x in workers] == [[0] if x is w else [] for x in workers]
            [replica] = (await client.describe_model(uid))["replicas"]
            assert replica["worker_id"] == w.worker_id
