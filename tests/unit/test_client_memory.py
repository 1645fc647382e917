"""The client over ``MemoryTransport``: its behaviour without a server.

Handlers answer each subject in the test's own process; what they send travels as encoded
messages read by the same wire rules as over NATS, so these tests pin the client's side of the
protocol: typed errors, streams and their cancel, timeouts, the retry after a worker died,
launch progress, and ``ProtocolError`` for replies that break the rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import pytest

from broker_client import (
    AsyncChatModelHandle,
    AsyncClient,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    AsyncStream,
    BadRequest,
    Client,
    Conflict,
    GenerateModelHandle,
    InternalError,
    MemoryRequest,
    MemoryTransport,
    ModelEvent,
    NatserveError,
    NoResponders,
    NotFound,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    ServerTimeout,
    ServiceError,
    Stream,
    Subjects,
    TransportError,
    Unavailable,
    wire,
)
from broker_client.codec import JSON, MSGPACK
from tests.support.waits import within

T = TypeVar("T")
WAIT = 5.0
PREFIX = "mem"
SUBJECTS = Subjects(PREFIX)
GENERATE = SUBJECTS.model("m1", "generate")
CHAT = SUBJECTS.model("m1", "chat")
EMBED = SUBJECTS.model("m1", "embed")
CANCEL = SUBJECTS.model("m1", "cancel")


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m1",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(text: str) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"text": text, "index": 0, "finish_reason": None}]}


def describe(abilities: list[str], model_type: str = "LLM") -> Any:
    async def handler(request: MemoryRequest) -> dict[str, Any]:
        if request.body.get("model_uid") != "m1":
            raise NotFound(f"model {request.body.get('model_uid')!r} is not running")
        return {"model_uid": "m1", "model_type": model_type, "model_ability": abilities}

    return handler


class Cancels:
    """The cancel endpoint: records the request ids it is told to cancel."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.arrived = asyncio.Event()

    def __call__(self, request: MemoryRequest) -> None:
        self.ids.append(request.body["request_id"])
        self.arrived.set()


Memory = tuple[AsyncClient, MemoryTransport]


@pytest.fixture
async def memory() -> AsyncIterator[Memory]:
    transport = MemoryTransport({SUBJECTS.models_describe: describe(["generate", "chat"])})
    client = AsyncClient(transport=transport, prefix=PREFIX, timeout=WAIT, request_timeout=WAIT)
    try:
        yield client, transport
    finally:
        await client.close()


async def chat_model(client: AsyncClient) -> AsyncChatModelHandle:
    model = await client.get_model("m1")
    assert isinstance(model, AsyncChatModelHandle)
    return model


def reply_of(result: dict[str, Any] | AsyncStream) -> dict[str, Any]:
    assert isinstance(result, dict)
    return result


def stream_of(result: dict[str, Any] | AsyncStream) -> AsyncStream:
    assert isinstance(result, AsyncStream)
    return result


# ---------------------------------------------------------------------------- requests and errors


async def test_generate_sends_its_body_and_returns_the_reply(
    memory: Memory,
) -> None:
    client, transport = memory
    transport.route(GENERATE, lambda request: completion(request.body["prompt"].upper()))
    model = await chat_model(client)
    result = reply_of(await model.generate("select", {"max_tokens": 8, "stop": "\n"}, request_id="r-1"))
    assert result["choices"][0]["text"] == "SELECT"
    [request] = [r for r in transport.requests if r.subject == GENERATE]
    assert request.body == {
        "prompt": "select",
        "generate_config": {"max_tokens": 8, "stop": ["\n"]},
        "request_id": "r-1",
        "ack": True,
    }
    # msgpack objects need no Content-Type: the request carries no headers.
    assert request.headers == {} and request.content_type == MSGPACK


ERRORS = [BadRequest, NotFound, Conflict, Overloaded, InternalError, Unavailable, ServerTimeout]


@pytest.mark.parametrize("cls", ERRORS)
async def test_errors_arrive_as_their_types(memory: Memory, cls: type[ServiceError]) -> None:
    client, transport = memory
    message = f"{cls.__name__} for model_uid 'm1'"

    def fail(request: MemoryRequest) -> None:
        raise cls(message)

    transport.route(CHAT, fail)
    if cls is Unavailable:
        transport.route(CHAT, fail)  # a 503 is sent once more: it fails again
    model = await chat_model(client)
    with pytest.raises(cls) as info:
        await model.chat([{"role": "user", "content": "hi"}])
    assert type(info.value) is cls and info.value.message == message
    assert isinstance(info.value, ServiceError) and isinstance(info.value, NatserveError)


async def test_an_unexpected_exception_is_an_internal_error(
    memory: Memory,
) -> None:
    client, transport = memory

    def broken(request: MemoryRequest) -> None:
        raise KeyError("prompt")

    transport.route(GENERATE, broken)
    with pytest.raises(InternalError, match="KeyError"):
        await (await chat_model(client)).generate("hi")


async def test_an_unknown_uid_is_not_found_and_a_missing_registry_no_responders(
    memory: Memory,
) -> None:
    client, _ = memory
    with pytest.raises(NotFound, match="'m1' is not running") as info:
        await AsyncGenerateModelHandle(client, "m1").generate("hi")
    assert isinstance(info.value.__cause__, NoResponders)
    with pytest.raises(NotFound, match="'m1' is not running"):
        await AsyncGenerateModelHandle(client, "m1").generate("hi", {"stream": True})
    with pytest.raises(NoResponders, match=f"registry.*prefix '{PREFIX}'"):
        await client.list_models()
    with pytest.raises(NotFound, match="'ghost'"):
        await client.get_model("ghost")


async def test_local_validation_sends_nothing(memory: Memory) -> None:
    client, transport = memory
    with pytest.raises(BadRequest, match=r"generate_config\.max_token: unknown field"):
        await AsyncGenerateModelHandle(client, "m1").generate("hi", {"max_token": 3})
    with pytest.raises(BadRequest, match="at least one"):
        await AsyncEmbeddingModelHandle(client, "m1").create_embedding([])
    assert transport.requests == []


async def test_a_large_reply_comes_in_parts() -> None:
    transport = MemoryTransport(max_payload=4096)
    client = AsyncClient(transport=transport, prefix=PREFIX, timeout=WAIT)
    vectors = [[i / 7 + j for i in range(300)] for j in range(4)]
    reply = {"object": "list", "data": [{"index": j, "embedding": v} for j, v in enumerate(vectors)]}
    transport.route(EMBED, lambda request: reply)
    try:
        assert await AsyncEmbeddingModelHandle(client, "m1").create_embedding(["a", "b"]) == reply
        [request] = transport.requests
        assert len(request.sent) > 2
        assert all(int(headers[wire.PARTS_HEADER]) == len(request.sent) for _, headers in request.sent)
    finally:
        await client.close()


# ---------------------------------------------------------------------------- streams


async def test_a_stream_yields_its_chunks_in_order(memory: Memory) -> None:
    client, transport = memory
    pieces = [f"tok{i} " for i in range(12)]

    def stream(request: MemoryRequest) -> Iterator[dict[str, Any]]:
        for piece in pieces:
            yield chunk(piece)

    transport.route(GENERATE, stream)
    result = stream_of(await (await chat_model(client)).generate("hi", {"stream": True}))
    assert [c["choices"][0]["text"] async for c in result] == pieces


async def test_an_empty_stream_and_an_async_one(memory: Memory) -> None:
    client, transport = memory

    async def nothing(request: MemoryRequest) -> AsyncIterator[dict[str, Any]]:
        return
        yield chunk("never")

    async def two(request: MemoryRequest) -> AsyncIterator[dict[str, Any]]:
        for piece in ("a", "b"):
            await asyncio.sleep(0)
            yield chunk(piece)

    model = await chat_model(client)
    transport.route(GENERATE, nothing)
    assert [c async for c in stream_of(await model.generate("hi", {"stream": True}))] == []
    transport.route(GENERATE, two)
    texts = [c["choices"][0]["text"] async for c in stream_of(await model.generate("hi", {"stream": True}))]
    assert texts == ["a", "b"]


async def test_an_error_mid_stream_raises_and_sends_no_cancel(
    memory: Memory,
) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)

    def stream(request: MemoryRequest) -> Iterator[dict[str, Any]]:
        yield chunk("a")
        raise InternalError("CUDA out of memory")

    transport.route(GENERATE, stream)
    result = stream_of(await (await chat_model(client)).generate("hi", {"stream": True}))
    assert (await anext(result))["choices"][0]["text"] == "a"
    with pytest.raises(InternalError, match="CUDA out of memory"):
        await anext(result)
    assert cancels.ids == [], "the replica ended it; nothing to cancel"


async def never_ending(request: MemoryRequest) -> AsyncIterator[dict[str, Any]]:
    yield chunk("a")
    await asyncio.Event().wait()  # until the transport closes
    yield chunk("never")


async def test_stopping_a_stream_early_cancels_it(memory: Memory) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)
    transport.route(GENERATE, never_ending)
    model = await chat_model(client)
    async with stream_of(await model.generate("hi", {"stream": True}, request_id="r-early")) as result:
        async for _ in result:
            break
    await within(cancels.arrived.wait(), "the cancel of the abandoned stream", WAIT)
    assert cancels.ids == ["r-early"]
    # The cancel is published to every replica, not requested from one.
    assert [m.subject for m in transport.published if m.subject == CANCEL] == [CANCEL]


async def test_a_stream_times_out_and_cancels(memory: Memory) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)
    transport.route(GENERATE, never_ending)
    result = stream_of(await (await chat_model(client)).generate("hi", {"stream": True}, timeout=0.3))
    assert (await anext(result))["choices"][0]["text"] == "a"
    with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
        await within(anext(result), "the stream's timeout", WAIT)
    await within(cancels.arrived.wait(), "the cancel of the timed-out stream", WAIT)
    assert cancels.ids == [result.request_id]


async def test_a_request_times_out_and_cancels(memory: Memory) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)
    transport.route(GENERATE, lambda request: None)  # takes it, never answers
    with pytest.raises(RequestTimeout) as info:
        await within(
            (await chat_model(client)).generate("hi", timeout=0.2, request_id="r-slow"), "timeout", WAIT
        )
    assert info.value.timeout == 0.2 and info.value.subject == GENERATE
    await within(cancels.arrived.wait(), "the cancel of the timed-out request", WAIT)
    assert cancels.ids == ["r-slow"]


async def test_the_stream_knows_its_worker(memory: Memory) -> None:
    client, transport = memory

    async def stream(request: MemoryRequest) -> None:
        await request.accept("w-7")
        await request.chunk(chunk("a"))
        await request.end_stream()

    transport.route(GENERATE, stream)
    result = stream_of(await (await chat_model(client)).generate("hi", {"stream": True}))
    assert [c async for c in result] == [chunk("a")]
    assert result.worker_id == "w-7"


# ---------------------------------------------------------------------------- a worker that dies


async def test_a_request_on_a_dead_worker_fails_at_once_and_is_sent_again(
    memory: Memory,
) -> None:
    client, transport = memory
    accepted = asyncio.Event()

    async def generate(request: MemoryRequest) -> dict[str, Any] | None:
        if not request.body["request_id"].endswith("-retry"):
            await request.accept("w-dead")
            accepted.set()
            return None  # its worker dies before it answers
        return completion("from another replica")

    transport.route(GENERATE, generate)
    model = await chat_model(client)
    pending = asyncio.ensure_future(model.generate("hi", request_id="r-9", timeout=60))
    await within(accepted.wait(), "the first replica to take the request", WAIT)
    # The registry announces the death; the request fails now, not in 60 s, and goes again.
    await transport.emit(SUBJECTS.workers_events, {"worker_id": "w-dead", "state": "dead", "dead_after": 6})
    result = reply_of(await within(pending, "the request sent once more", WAIT))
    assert result["choices"][0]["text"] == "from another replica"
    ids = [r.body["request_id"] for r in transport.requests if r.subject == GENERATE]
    assert ids == ["r-9", "r-9-retry"]


async def test_a_503_is_retried_once_and_a_stream_never(memory: Memory) -> None:
    client, transport = memory
    calls: list[str] = []

    def stopping(request: MemoryRequest) -> dict[str, Any]:
        calls.append(request.body["request_id"])
        if len(calls) == 1:
            raise Unavailable("worker 'w1' is stopping")
        return completion("ok")

    transport.route(GENERATE, stopping)
    model = await chat_model(client)
    assert reply_of(await model.generate("hi", request_id="r-a"))["choices"][0]["text"] == "ok"
    assert calls == ["r-a", "r-a-retry"]

    def always_stopping(request: MemoryRequest) -> None:
        calls.append(request.body["request_id"])
        raise Unavailable("worker 'w1' is stopping")

    transport.route(GENERATE, always_stopping)
    calls.clear()
    with pytest.raises(Unavailable):
        await model.generate("hi", {"stream": True}, request_id="r-s")
    assert calls == ["r-s"]


async def test_a_dropped_connection_fails_the_calls_in_flight(
    memory: Memory,
) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)
    taken = asyncio.Event()

    async def generate(request: MemoryRequest) -> dict[str, Any] | None:
        if request.body["request_id"].endswith("-retry"):
            return completion("after the drop")
        taken.set()
        return None

    transport.route(GENERATE, generate)
    model = await chat_model(client)
    pending = asyncio.ensure_future(model.generate("hi", request_id="r-drop", timeout=60))
    await within(taken.wait(), "the request to be taken", WAIT)
    assert transport.fail_all(lambda: TransportError("lost the connection")) == 1
    assert reply_of(await within(pending, "the retry", WAIT))["choices"][0]["text"] == "after the drop"
    # The first replica may still be generating: it was told to stop.
    assert cancels.ids == ["r-drop"]


# ---------------------------------------------------------------------------- launch progress


async def test_launch_progress_follows_its_launch(memory: Memory) -> None:
    client, transport = memory

    async def launch(request: MemoryRequest) -> dict[str, Any]:
        name = request.body["model_name"]
        uid = f"{name}-1"
        for event in (
            ModelEvent(model_uid="other", model_name="other-model", stage="loading"),
            ModelEvent(model_uid=uid, model_name=name, stage="placing"),
            ModelEvent(model_uid=uid, model_name=name, stage="download", fraction=0.5),
            ModelEvent(model_uid=uid, stage="loading", replica_index=0, worker_id="w1"),
            ModelEvent(model_uid=uid, model_name=name, stage="ready"),
        ):
            await request.transport.emit(SUBJECTS.events(event.model_uid), event.model_dump())
        await request.transport.emit(SUBJECTS.events(uid), b"\xc1 not an event")
        return {"model_uid": uid}

    transport.route(SUBJECTS.models_launch, launch)
    seen: list[ModelEvent] = []
    assert await client.launch_model("nsql-2B", timeout=30, progress=seen.append) == "nsql-2B-1"
    assert [e.stage for e in seen] == ["placing", "download", "loading", "ready"]
    assert seen[1].fraction == 0.5
    [request] = [r for r in transport.requests if r.subject == SUBJECTS.models_launch]
    assert request.body["wait"] is True and request.body["timeout"] == 30
    # Its events subscription is gone with the launch.
    seen.clear()
    await transport.emit(
        SUBJECTS.events("nsql-2B-1"), ModelEvent(model_uid="nsql-2B-1", stage="x").model_dump()
    )
    assert seen == []


# ---------------------------------------------------------------------------- malformed replies


async def test_bytes_that_do_not_decode_are_a_protocol_error(
    memory: Memory,
) -> None:
    client, transport = memory

    async def garbage(request: MemoryRequest) -> None:
        await request.send(b"\xc1\xc1\xc1")  # never valid msgpack, and not JSON

    transport.route(GENERATE, garbage)
    transport.route(SUBJECTS.models_list, garbage)
    model = await chat_model(client)
    with pytest.raises(ProtocolError, match=f"malformed reply on '{GENERATE}'") as info:
        await model.generate("hi")
    assert not isinstance(info.value, BadRequest) and info.value.subject == GENERATE
    with pytest.raises(ProtocolError, match=r"models\.list"):
        await client.list_models()


async def test_a_reply_of_the_wrong_shape_is_a_protocol_error(
    memory: Memory,
) -> None:
    client, transport = memory
    transport.route(GENERATE, lambda request: ["not", "a", "completion"])
    transport.route(SUBJECTS.models_list, lambda request: {"models": 3})
    transport.route(SUBJECTS.workers_list, lambda request: {"workers": "w1"})
    transport.route(SUBJECTS.registry_get, lambda request: "nsql-2B")
    model = await chat_model(client)
    with pytest.raises(ProtocolError, match="must be an object, got list"):
        await model.generate("hi")
    with pytest.raises(ProtocolError, match="'models' must be a list or an object, got int"):
        await client.list_models()
    with pytest.raises(ProtocolError, match="'workers' must be a list, got str"):
        await client.list_workers()
    with pytest.raises(ProtocolError, match="must be an object, got str"):
        await client.get_model_registration("LLM", "nsql-2B")
    transport.route(SUBJECTS.models_list, lambda request: {"models": [{"name": "no uid"}]})
    with pytest.raises(ProtocolError, match="model_uid"):
        await client.list_models()


async def test_the_pool_report_is_the_whole_workers_reply(memory: Memory) -> None:
    client, transport = memory
    failure = {"model_uid": "m", "error": "no room", "ts": 1.0}
    transport.route(
        SUBJECTS.workers_list,
        lambda request: {"workers": [{"worker_id": "w1"}], "recent_failures": [failure]},
    )
    assert await client.pool_report() == {"workers": [{"worker_id": "w1"}], "recent_failures": [failure]}
    # A registry that sends a bare list of workers has no failures to report.
    transport.route(SUBJECTS.workers_list, lambda request: [{"worker_id": "w1"}])
    assert await client.pool_report() == {"workers": [{"worker_id": "w1"}], "recent_failures": []}
    transport.route(SUBJECTS.workers_list, lambda request: {"workers": [], "recent_failures": "none"})
    with pytest.raises(ProtocolError, match="'recent_failures' must be a list, got str"):
        await client.pool_report()


async def test_a_reply_without_a_field_the_client_needs(memory: Memory) -> None:
    client, transport = memory
    transport.route(SUBJECTS.models_launch, lambda request: {"launched": True})
    with pytest.raises(ProtocolError, match="no model_uid"):
        await client.launch_model("nsql-2B", wait=False)
    with pytest.raises(ProtocolError, match="no model_uid"):
        await client.launch_model("nsql-2B", progress=lambda event: None)


async def test_a_stream_that_breaks_the_rules_is_a_protocol_error_and_cancelled(
    memory: Memory,
) -> None:
    client, transport = memory
    cancels = Cancels()
    transport.route(CANCEL, cancels)
    model = await chat_model(client)

    async def not_objects(request: MemoryRequest) -> None:
        await request.chunk(chunk("a"))
        await request.chunk("a bare string")

    async def bad_seq(request: MemoryRequest) -> None:
        await request.send(b"{}", {"Content-Type": JSON, wire.SEQ_HEADER: "first"})

    async def bad_chunk(request: MemoryRequest) -> None:
        await request.send(b"\xc1", {"Content-Type": MSGPACK, wire.SEQ_HEADER: "1"})

    transport.route(GENERATE, not_objects)
    result = stream_of(await model.generate("hi", {"stream": True}, request_id="r-str"))
    assert (await anext(result))["choices"][0]["text"] == "a"
    with pytest.raises(ProtocolError, match="chunk must be an object, got str"):
        await anext(result)
    await within(cancels.arrived.wait(), "the cancel of the broken stream", WAIT)
    assert cancels.ids == ["r-str"]

    for handler, match in ((bad_seq, "Natserve-Seq 'first'"), (bad_chunk, "malformed msgpack")):
        transport.route(GENERATE, handler)
        with pytest.raises(ProtocolError, match=match):
            await model.generate("hi", {"stream": True})


async def test_broken_parts_are_a_protocol_error(memory: Memory) -> None:
    client, transport = memory

    async def parts(request: MemoryRequest) -> None:
        await request.send(b"{", {"Content-Type": JSON, wire.PARTS_HEADER: "2", wire.PART_HEADER: "5"})

    transport.route(EMBED, parts)
    with pytest.raises(ProtocolError, match="Natserve-Part 5"):
        await AsyncEmbeddingModelHandle(client, "m1").create_embedding("a")


# ---------------------------------------------------------------------------- the sync client


def test_the_sync_client_runs_over_a_memory_transport() -> None:
    transport = MemoryTransport(
        {
            SUBJECTS.models_describe: describe(["generate"]),
            GENERATE: lambda request: (
                (chunk(word) for word in request.body["prompt"].split())
                if request.body.get("generate_config", {}).get("stream")
                else completion(request.body["prompt"])
            ),
        }
    )
    with Client(transport=transport, prefix=PREFIX, timeout=WAIT) as client:
        model = client.get_model("m1")
        assert isinstance(model, GenerateModelHandle)
        result = model.generate("two words")
        assert isinstance(result, dict) and result["choices"][0]["text"] == "two words"
        stream = model.generate("two words", {"stream": True})
        assert isinstance(stream, Stream)
        assert [c["choices"][0]["text"] for c in stream] == ["two", "words"]
    assert transport.is_closed
    with pytest.raises(TransportError, match="closed"):
        client.list_models()
