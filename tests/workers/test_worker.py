"""The worker against a real nats-server and a real (tiny, random) Llama.

Each test starts its own in-process ``Worker`` under a unique subject prefix and talks to it as
the registry and the clients would: ``WorkerLaunch`` on the worker's subject, raw nats-py
requests (JSON without headers, msgpack with), and raw subscribers for streams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import nats.errors
import pytest
from nats.aio.msg import Msg

from broker_client import BadRequest, Conflict, NotFound, Overloaded, Subjects, WorkerLaunch
from broker_client.runtime import NatsTransport
from tests.support.waits import within
from tests.support.worker import Harness, client_connection, launch_message, llm_definition, running_harness
from workers import Worker, WorkerSettings, run_worker

T = TypeVar("T")

SEQ = "Natserve-Seq"
ERROR_CODE = "Nats-Service-Error-Code"
# Greedy decoding of this prompt on the tiny Llama runs to max_tokens without an eos (checked by
# the tests that rely on it: they assert finish_reason "length" or a cancel).
LONG_PROMPT = "hello"


# ----------------------------------------------------------------------------- helpers


def header(msg: Msg, name: str) -> str:
    assert msg.headers is not None and name in msg.headers, f"no {name} header in {msg.headers}"
    return msg.headers[name]


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[tuple[Any, NatsTransport]]:
    async with client_connection(nats_url) as pair:
        yield pair


@pytest.fixture
async def harness(nats_url: str, prefix: str) -> AsyncIterator[Harness]:
    async with running_harness(nats_url, prefix) as h:
        yield h


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


# ----------------------------------------------------------------------------- generate


async def test_raw_json_and_msgpack_generate(
    harness: Harness, tiny_llama_dir: Path, tiny_tokenizer: Any, unique: str
) -> None:
    uid = f"tiny-{unique}"
    reply = await harness.launch(uid, llm_definition("tiny", f"file://{tiny_llama_dir}"))
    assert reply["model_uid"] == uid and reply["device"] == "cpu" and reply["memory_bytes"] > 0

    body = {"prompt": "SELECT name FROM", "generate_config": {"max_tokens": 6, "seed": 7}}
    msg = await harness.raw(harness.subjects.model(uid, "generate"), body)
    assert msg.data.startswith(b"{"), msg.data[:80]
    completion = json.loads(msg.data)
    assert completion["object"] == "text_completion"
    assert completion["id"].startswith("cmpl-") and completion["model"] == uid
    assert isinstance(completion["created"], int)
    (choice,) = completion["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = completion["usage"]
    assert usage["prompt_tokens"] == len(tiny_tokenizer.encode("SELECT name FROM"))
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # msgpack in, msgpack out; the same seed gives the same text.
    packed = await harness.raw(harness.subjects.model(uid, "generate"), body, encoding="msgpack")
    assert not packed.headers  # in the request's encoding, which needs no header
    again = msgpack.unpackb(packed.data)
    assert again["choices"][0]["text"] == choice["text"]
    assert again["usage"] == usage


async def test_stream_read_by_raw_subscriber(harness: Harness, tiny_llama_dir: Path, unique: str) -> None:
    uid = f"tiny-{unique}"
    await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
    config = {"max_tokens": 40, "temperature": 0}
    whole = await harness.call(uid, "generate", {"prompt": LONG_PROMPT, "generate_config": config})

    queue = await harness.open_stream(
        harness.subjects.model(uid, "generate"),
        {"prompt": LONG_PROMPT, "generate_config": {**config, "stream": True}},
    )
    msgs = await harness.read_to_end(queue)
    end, chunks = msgs[-1], msgs[:-1]
    assert end.data == b""
    assert len(chunks) >= 2
    assert [int(header(m, SEQ)) for m in chunks] == list(range(1, len(chunks) + 1))
    bodies = [json.loads(m.data) for m in chunks]
    assert all(b["object"] == "text_completion" and b["model"] == uid for b in bodies)
    assert len({b["id"] for b in bodies}) == 1
    assert all(b["choices"][0]["finish_reason"] is None for b in bodies[:-1])
    assert all(b["choices"][0]["text"] for b in bodies[:-1]), "empty deltas must not be sent"
    final = bodies[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"] == whole["usage"]
    assert "".join(b["choices"][0]["text"] for b in bodies) == whole["choices"][0]["text"]


async def test_generate_validation_errors(
    harness: Harness, tiny_llama_dir: Path, tiny_tokenizer: Any, unique: str
) -> None:
    uid = f"small-{unique}"
    await harness.launch(uid, llm_definition("small", str(tiny_llama_dir), context_length=64))
    subject = harness.subjects.model(uid, "generate")

    # Raw: the error headers and the JSON error body.
    msg = await harness.raw(subject, {"prompt": "hi", "generate_config": {"max_token": 5}})
    assert header(msg, ERROR_CODE) == "400"
    error = json.loads(msg.data)["error"]
    assert error["code"] == 400 and error["type"] == "BadRequest"
    assert "max_token" in error["message"] and "unknown field" in error["message"]

    async def bad(config: dict[str, Any], prompt: str = "hi") -> str:
        with pytest.raises(BadRequest) as info:
            await harness.call(uid, "generate", {"prompt": prompt, "generate_config": config})
        return info.value.message

    assert "max_tokens" in await bad({"max_tokens": 0})
    assert "max_tokens" in await bad({"max_tokens": -3})
    assert "temperature" in await bad({"temperature": -0.5})
    message = await bad({"max_tokens": 65})
    assert "65" in message and "64" in message and uid in message

    long_prompt = " ".join(["SELECT name FROM users;"] * 30)
    n = len(tiny_tokenizer.encode(long_prompt))
    assert n > 64
    message = await bad({}, long_prompt)
    assert f"prompt has {n} tokens; the context of model {uid!r} is 64" in message

    prompt = "SELECT name FROM users;"
    n = len(tiny_tokenizer.encode(prompt))
    message = await bad({"max_tokens": 60}, prompt)
    assert f"prompt has {n} tokens and max_tokens is 60" in message and "64" in message

    # A prompt far beyond any tokenisation is refused without tokenising it.
    message = await bad({}, "x" * 500_000)
    assert "500000 characters" in message

    # The default max_tokens fills the rest of the context.
    ok = await harness.call(uid, "generate", {"prompt": LONG_PROMPT, "generate_config": {"temperature": 0}})
    assert ok["usage"]["total_tokens"] == 64 and ok["choices"][0]["finish_reason"] == "length"

    # The wrong ability names the model's abilities.
    with pytest.raises(BadRequest) as info:
        await harness.call(uid, "embed", {"input": "hi"})
    assert "cannot embed" in info.value.message and "generate, chat" in info.value.message


async def test_unknown_uid_has_no_responders(harness: Harness, unique: str) -> None:
    subject = harness.subjects.model(f"nobody-{unique}", "generate")
    start = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        await harness.nc.request(subject, b'{"prompt": "hi"}', timeout=10)
    assert time.monotonic() - start < 2


async def test_launch_from_hf_cache_offline(
    harness: Harness, hf_cache: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    uid = f"nsql-{unique}"
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_event(msg: Msg) -> None:
        assert msg.headers and msg.headers["Content-Type"] == "application/msgpack"
        await events.put(msgpack.unpackb(msg.data))

    await harness.nc.subscribe(harness.subjects.events("*"), cb=on_event)
    await harness.nc.flush()

    definition = llm_definition("nsql-2B", model_id="NumbersStation/nsql-2B")
    reply = await harness.launch(uid, definition)
    assert reply["model_uid"] == uid
    stages: list[str] = []
    while not stages or stages[-1] != "ready":
        event = await within(events.get(), f"launch events for {uid} (got {stages})", 10)
        assert event["model_uid"] == uid and event["model_name"] == "nsql-2B"
        assert event["worker_id"] == harness.worker.worker_id and event["replica_index"] == 0
        stages.append(event["stage"])
    assert stages[0] == "download" and "loading" in stages
    out = await harness.call(uid, "generate", {"prompt": "SELECT", "generate_config": {"max_tokens": 3}})
    assert out["usage"]["completion_tokens"] >= 1

    # A second launch of the same replica is a conflict.
    with pytest.raises(Conflict) as conflict:
        await harness.launch(uid, definition)
    assert uid in conflict.value.message

    # A model that is not in the cache, offline: 404 naming it, nothing left behind.
    missing = f"gone-{unique}"
    with pytest.raises(NotFound) as info:
        await harness.launch(missing, llm_definition("gone", model_id="NoSuchOrg/no-such-model"))
    assert "NoSuchOrg/no-such-model" in info.value.message
    while True:
        event = await within(events.get(), f"failed event for {missing}", 10)
        if event["model_uid"] == missing and event["stage"] == "failed":
            assert "NoSuchOrg/no-such-model" in event["message"]
            break
    with pytest.raises(nats.errors.NoRespondersError):
        await harness.nc.request(harness.subjects.model(missing, "generate"), b"{}", timeout=10)
    info_reply = await harness.transport.request(
        harness.subjects.worker(harness.worker.worker_id, "info"), {}, timeout=10
    )
    assert harness.worker.service is not None
    assert [r["model_uid"] for r in info_reply["replicas"]] == [uid]
    service = json.loads(
        (
            await harness.nc.request(
                "$SRV.INFO.natserve-worker." + harness.worker.service.id, b"", timeout=10
            )
        ).data  # type: ignore[union-attr]
    )
    assert service["metadata"]["worker_id"] == harness.worker.worker_id
    served = {e["subject"] for e in service["endpoints"]}
    assert harness.subjects.model(uid, "generate") in served
    assert not any(missing in s for s in served)


async def test_request_limits_and_cancel(harness: Harness, tiny_llama_dir: Path, unique: str) -> None:
    uid = f"tiny-{unique}"
    await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)), request_limits=2)
    generate = harness.subjects.model(uid, "generate")
    long_config = {"max_tokens": 2000, "temperature": 0, "stream": True}

    a = await harness.open_stream(
        generate, {"prompt": LONG_PROMPT, "request_id": f"a-{unique}", "generate_config": long_config}
    )
    b = await harness.open_stream(
        generate,
        {
            "prompt": LONG_PROMPT,
            "request_id": f"b-{unique}",
            "generate_config": {**long_config, "max_tokens": 300},
        },
    )
    first_a = await within(a.get(), "first chunk of request a")
    first_b = await within(b.get(), "first chunk of request b")
    assert header(first_a, SEQ) == "1" and header(first_b, SEQ) == "1"

    # Both slots are taken: the third request is refused at once, naming the limit.
    start = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await harness.call(uid, "generate", {"prompt": "hi", "generate_config": {"max_tokens": 2}})
    assert time.monotonic() - start < 2
    assert "request limit of 2" in info.value.message

    # Cancelling a (a plain publish, as a client that walked away does) ends it with a 503 ...
    await harness.nc.publish(
        harness.subjects.model(uid, "cancel"), json.dumps({"request_id": f"a-{unique}"}).encode()
    )
    rest = await harness.read_to_end(a)
    error = rest[-2]
    assert header(error, ERROR_CODE) == "503", "request a finished before it was cancelled"
    assert "cancelled" in json.loads(error.data)["error"]["message"]
    # Chunks 1..k (the first read above), then the error as k + 1, then the end.
    assert int(header(error, SEQ)) == len(rest)

    # ... and frees its slot while b keeps going and then completes normally.
    third = await harness.call(uid, "generate", {"prompt": "hi", "generate_config": {"max_tokens": 2}})
    assert third["usage"]["completion_tokens"] >= 1
    rest_b = await harness.read_to_end(b)
    final_b = json.loads(rest_b[-2].data)
    assert final_b["choices"][0]["finish_reason"] == "length"
    assert final_b["usage"]["completion_tokens"] == 300

    # The request id may come in the Natserve-Request-Id header; a cancel sent as a request is
    # answered by the replica that held it.
    c = await harness.open_stream(
        generate,
        {"prompt": LONG_PROMPT, "generate_config": long_config},
        headers={"Natserve-Request-Id": f"c-{unique}"},
    )
    await within(c.get(), "first chunk of request c")
    ack = await harness.call(uid, "cancel", {"request_id": f"c-{unique}"})
    assert ack == {"request_id": f"c-{unique}", "cancelled": True}
    assert header((await harness.read_to_end(c))[-2], ERROR_CODE) == "503"

    info_reply = await harness.transport.request(
        harness.subjects.worker(harness.worker.worker_id, "info"), {}, timeout=10
    )
    (replica,) = info_reply["replicas"]
    assert replica["cancelled"] == 2 and replica["request_limits"] == 2
    assert replica["active"] == 0 and replica["waiting"] == 0


async def test_heartbeats_and_resync(nats_url: str, prefix: str, client: tuple[Any, NatsTransport]) -> None:
    nc, transport = client
    subjects = Subjects(prefix)
    beats: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        await beats.put(msg)

    await nc.subscribe(subjects.workers_heartbeats, cb=on_beat)
    await nc.flush()
    # A long interval: any second beat within the test comes from the resync.
    worker = Worker(WorkerSettings(nats_url, prefix=prefix, device="cpu", heartbeat_interval=60))
    await worker.start()
    try:
        first = await within(beats.get(), "heartbeat on start", 10)
        assert first.headers and first.headers["Content-Type"] == "application/msgpack"
        info = msgpack.unpackb(first.data)
        assert info["worker_id"] == worker.worker_id
        assert info["heartbeat_interval"] == 60 and info["replicas"] == []
        cpu = next(d for d in info["devices"] if d["name"] == "cpu")
        assert 0 < cpu["free_memory"] <= cpu["total_memory"]

        await nc.publish(subjects.workers_resync, b"")
        second = msgpack.unpackb((await within(beats.get(), "heartbeat after resync", 10)).data)
        assert second["worker_id"] == worker.worker_id
        assert second["last_seen"] >= info["last_seen"]

        # A launch changes the replicas, which is worth a beat of its own.
        uid = f"echo-{prefix}"
        await transport.request(
            subjects.worker(worker.worker_id, "launch"),
            launch_message(uid, llm_definition("echo", "echo:"), request_limits=7),
            timeout=30,
        )
        statuses: list[str] = []
        while not statuses or statuses[-1] != "ready":
            beat = msgpack.unpackb((await within(beats.get(), "heartbeat showing the replica", 10)).data)
            if beat["replicas"]:
                # Never the loading entry and the ready replica side by side.
                (replica,) = beat["replicas"]
                statuses.append(replica["status"])
        assert set(statuses[:-1]) <= {"loading"}
        assert replica["model_uid"] == uid and replica["status"] == "ready"
        assert replica["model_type"] == "LLM" and replica["request_limits"] == 7
        assert replica["active"] == 0 and replica["waiting"] == 0 and replica["requests"] == 0
    finally:
        await worker.stop()
    # The last beat says the worker is gone (a "stopping" one may come before it).
    while True:
        final = msgpack.unpackb((await within(beats.get(), "heartbeat on stop", 10)).data)
        if final["status"] != "running":
            assert final["status"] in ("stopping", "stopped")
        if final["status"] == "stopped":
            break
    assert final["replicas"] == []


def test_loading_replicas_are_reported() -> None:
    from workers.builder import PendingLaunch

    launch = WorkerLaunch.model_validate(launch_message("u", llm_definition("m", "echo:")))
    info = PendingLaunch(launch, "cpu").info()
    assert (info.model_uid, info.status, info.device) == ("u", "loading", "cpu")


async def test_terminate_ends_requests_and_removes_endpoints(
    harness: Harness, tiny_llama_dir: Path, unique: str
) -> None:
    uid = f"tiny-{unique}"
    await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
    generate = harness.subjects.model(uid, "generate")
    stream = await harness.open_stream(
        generate,
        {"prompt": LONG_PROMPT, "generate_config": {"max_tokens": 2000, "temperature": 0, "stream": True}},
    )
    await within(stream.get(), "first chunk before terminate")

    terminate = harness.subjects.worker(harness.worker.worker_id, "terminate")
    assert await harness.transport.request(terminate, {"model_uid": uid}, timeout=30) == {}
    rest = await harness.read_to_end(stream)
    assert header(rest[-2], ERROR_CODE) == "503"
    assert "terminated" in json.loads(rest[-2].data)["error"]["message"]

    with pytest.raises(nats.errors.NoRespondersError):
        await harness.nc.request(generate, b'{"prompt": "hi"}', timeout=10)
    with pytest.raises(NotFound):
        await harness.transport.request(terminate, {"model_uid": uid}, timeout=30)
    assert harness.worker.models == {}


async def test_echo_engine(harness: Harness, unique: str) -> None:
    uid = f"echo-{unique}"
    await harness.launch(uid, llm_definition("echo", "echo:", context_length=100))
    prompt = "the quick brown fox jumps"
    out = await harness.call(uid, "generate", {"prompt": prompt})
    assert out["choices"][0]["text"] == prompt and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}

    cut = await harness.call(uid, "generate", {"prompt": prompt, "generate_config": {"max_tokens": 2}})
    assert cut["choices"][0]["text"] == "the quick" and cut["choices"][0]["finish_reason"] == "length"

    chunks = [
        c
        async for c in harness.transport.stream(
            harness.subjects.model(uid, "generate"),
            {"prompt": prompt, "generate_config": {"stream": True}},
            timeout=30,
        )
    ]
    assert [c["choices"][0]["text"] for c in chunks] == ["the", " quick", " brown", " fox", " jumps"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5

    with pytest.raises(BadRequest) as info:
        await harness.call(uid, "generate", {"prompt": "word " * 101})
    assert "prompt has 101 tokens" in info.value.message


async def test_stop_drains_in_flight_requests(
    nats_url: str, prefix: str, tiny_llama_dir: Path, client: tuple[Any, NatsTransport], unique: str
) -> None:
    worker = Worker(
        WorkerSettings(nats_url, prefix=prefix, device="cpu", heartbeat_interval=30, drain_timeout=30)
    )
    await worker.start()
    harness = Harness(worker, *client)
    uid = f"tiny-{unique}"
    try:
        await harness.launch(uid, llm_definition("tiny", str(tiny_llama_dir)))
        stream = await harness.open_stream(
            harness.subjects.model(uid, "generate"),
            {"prompt": LONG_PROMPT, "generate_config": {"max_tokens": 120, "temperature": 0, "stream": True}},
        )
        await within(stream.get(), "first chunk before stop")
    finally:
        await within(worker.stop(), "worker stop", 60)
    # The request in flight when stop began ran to its end.
    rest = await harness.read_to_end(stream)
    final = json.loads(rest[-2].data)
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 120
    with pytest.raises(nats.errors.NoRespondersError):
        await harness.nc.request(harness.subjects.model(uid, "generate"), b"{}", timeout=10)


async def test_run_worker_until_stop(nats_url: str, prefix: str, client: tuple[Any, NatsTransport]) -> None:
    _, transport = client
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            WorkerSettings(nats_url, prefix=prefix, device="cpu", worker_id=f"w-{prefix}"),
            stop=stop,
            ready=ready,
        )
    )
    await within(ready.wait(), "run_worker ready", 30)
    info = await transport.request(Subjects(prefix).worker(f"w-{prefix}", "info"), {}, timeout=10)
    assert info["worker_id"] == f"w-{prefix}" and info["status"] == "running"
    stop.set()
    await within(task, "run_worker return after stop", 30)


async def test_echo_engine_stops_and_cancels() -> None:
    from workers.engines.batching import RequestCancelledError, SamplingParams
    from workers.engines.echo import EchoEngine, is_echo_uri

    assert is_echo_uri("echo:") and is_echo_uri(" ECHO://x") and not is_echo_uri("/models/echo")
    engine = EchoEngine(context_length=50)
    words = engine.encode("alpha beta STOP gamma")
    deltas = [d async for d in engine.generate(words, SamplingParams(max_tokens=10, stop=("STOP",)))]
    assert "".join(d.text for d in deltas) == "alpha beta" and deltas[-1].finish_reason == "stop"

    stream = engine.generate(
        engine.encode("one two three four"), SamplingParams(max_tokens=10), request_id="r"
    )
    assert (await anext(stream)).text == "one"
    assert engine.cancel("r") and not engine.cancel("nope")
    with pytest.raises(RequestCancelledError):
        await anext(stream)
    # The id is free again, and a fresh request under it is not hit by the old cancel.
    again = [d async for d in engine.generate(["x"], SamplingParams(max_tokens=1), request_id="r")]
    assert again[-1].finish_reason == "stop"
    stats = engine.stats
    assert (stats.cancelled, stats.finished, stats.running) == (1, 2, 0)
