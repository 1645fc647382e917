"""The client library against a real nats-server, with the services faked in raw nats-py.

The fakes (tests/support/fake_services.py) speak the wire protocol by hand (msgpack/JSON bodies,
``Natserve-Seq`` chunks, the empty end message, ``Natserve-Parts``, the ``Nats-Service-Error*``
headers) so that these tests pin the protocol, not just agree with our own transport. What the
client checks before it sends anything is tests/unit/test_client_validation.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.msg import Msg

from broker_client import (
    AsyncChatModelHandle,
    AsyncClient,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    AsyncStream,
    BadRequest,
    ChatModelHandle,
    Client,
    Conflict,
    EmbeddingModelHandle,
    GenerateModelHandle,
    InternalError,
    ModelEvent,
    NatserveError,
    NoResponders,
    NotFound,
    Overloaded,
    RequestTimeout,
    ServerTimeout,
    ServiceError,
    Stream,
    TransportError,
    Unavailable,
)
from tests.support.fake_services import (
    NSQL_2B,
    FakeNats,
    completion,
    decode,
    encode_like,
    replier,
    silent,
    streamer,
)
from tests.support.ports import free_port

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake(nats_url: str, prefix: str) -> Iterator[FakeNats]:
    f = FakeNats(nats_url, prefix)
    yield f
    f.close()


@pytest.fixture
def client(nats_url: str, prefix: str) -> Iterator[Client]:
    with Client(nats_url, prefix=prefix, timeout=20, request_timeout=10) as c:
        yield c


@pytest.fixture
async def aclient(nats_url: str, prefix: str) -> Any:
    async with AsyncClient(nats_url, prefix=prefix, timeout=20, request_timeout=10) as c:
        yield c


def chat_model(client: Client, uid: str) -> ChatModelHandle:
    model = client.get_model(uid)
    assert isinstance(model, ChatModelHandle)
    return model


def generate_model(client: Client, uid: str) -> GenerateModelHandle:
    model = client.get_model(uid)
    assert isinstance(model, GenerateModelHandle)
    return model


def reply_of(result: dict[str, Any] | Stream) -> dict[str, Any]:
    assert isinstance(result, dict)
    return result


def stream_of(result: dict[str, Any] | Stream) -> Stream:
    assert isinstance(result, Stream)
    return result


def astream_of(result: dict[str, Any] | AsyncStream) -> AsyncStream:
    assert isinstance(result, AsyncStream)
    return result


# ---------------------------------------------------------------------------- sync misuse


@pytest.mark.filterwarnings("error::RuntimeWarning")
async def test_sync_client_inside_running_loop_raises_clear_error(nats_url: str) -> None:
    client = Client(nats_url)
    try:
        with pytest.raises(RuntimeError, match="AsyncClient") as info:
            client.list_models()
        assert "running event loop" in str(info.value)
        with pytest.raises(RuntimeError, match="AsyncClient"):
            client.register_model("LLM", NSQL_2B)
    finally:
        # close() from inside a loop is allowed: it only stops the private loop thread.
        client.close()
    assert not client._loop_thread.thread.is_alive()


def test_sync_client_close_stops_its_thread_and_refuses_calls(nats_url: str, prefix: str) -> None:
    with Client(nats_url, prefix=prefix) as client:
        with pytest.raises(NoResponders):
            client.list_workers()
        thread = client._loop_thread.thread
        assert thread.is_alive()
    assert not thread.is_alive()
    with pytest.raises(TransportError, match="closed"):
        client.list_models()


def test_connect_to_nothing_fails_fast() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with Client(url, connect_timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(TransportError, match="cannot connect to NATS") as info:
            client.list_models()
        assert time.monotonic() - started < 5
        assert url in str(info.value)


# ---------------------------------------------------------------------------- nobody answering


async def test_registry_calls_without_registry_raise_no_responders_fast(aclient: AsyncClient) -> None:
    calls = [
        aclient.list_models(),
        aclient.list_workers(),
        aclient.list_model_registrations("LLM"),
        aclient.describe_model("m1"),
        aclient.register_model("LLM", json.dumps(NSQL_2B)),
        aclient.launch_model("nsql-2B", progress=False),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(NoResponders, match="registry") as info:
            await call
        assert time.monotonic() - started < 2, "must not wait for the 10 s request timeout"
        assert aclient.prefix in str(info.value)


def test_generate_on_unknown_uid_is_a_typed_error_not_a_hang(client: Client, fake: FakeNats) -> None:
    fake.describe("ghost")  # the registry still lists it, but no replica serves it
    model = chat_model(client, "ghost")
    for call in (
        lambda: model.generate("hi", timeout=30),
        lambda: model.generate("hi", {"stream": True}, timeout=30),
        lambda: model.chat([{"role": "user", "content": "hi"}], timeout=30),
    ):
        started = time.monotonic()
        with pytest.raises(NotFound, match="'ghost' is not running") as info:
            call()
        assert time.monotonic() - started < 5
        assert isinstance(info.value.__cause__, NoResponders)


async def test_async_unknown_uid_and_embedding(aclient: AsyncClient) -> None:
    for handle in (AsyncGenerateModelHandle(aclient, "ghost"), AsyncEmbeddingModelHandle(aclient, "ghost")):
        started = time.monotonic()
        with pytest.raises(NotFound, match="not running"):
            if isinstance(handle, AsyncEmbeddingModelHandle):
                await handle.create_embedding("x", timeout=30)
            else:
                await handle.generate("x", {"stream": True}, timeout=30)
        assert time.monotonic() - started < 5


def test_unknown_uid_from_registry_is_not_found(client: Client, fake: FakeNats) -> None:
    fake.describe("known")
    with pytest.raises(NotFound, match="not running"):
        client.get_model("unknown")


# ---------------------------------------------------------------------------- handles and streams


@pytest.mark.parametrize(
    ("model_type", "abilities", "sync_cls", "async_cls"),
    [
        ("LLM", ["generate", "chat"], ChatModelHandle, AsyncChatModelHandle),
        ("LLM", ["chat"], ChatModelHandle, AsyncChatModelHandle),
        ("LLM", ["generate"], GenerateModelHandle, AsyncGenerateModelHandle),
        ("embedding", ["embed"], EmbeddingModelHandle, AsyncEmbeddingModelHandle),
    ],
)
def test_get_model_picks_the_handle(
    client: Client, fake: FakeNats, model_type: str, abilities: list[str], sync_cls: type, async_cls: type
) -> None:
    fake.describe("m1", model_type, abilities)
    handle = client.get_model(model_uid="m1")
    assert type(handle) is sync_cls
    assert type(handle._handle) is async_cls
    assert handle.model_uid == "m1"
    assert handle.description["model_type"] == model_type


def test_generate_sends_request_id_and_config(client: Client, fake: FakeNats) -> None:
    fake.describe("m1", abilities=["generate"])
    fake.on(fake.subjects.model("m1", "generate"), replier(completion("SELECT 1;")))
    model = generate_model(client, "m1")
    result = reply_of(model.generate("-- count users", {"max_tokens": 8, "stop": "\n"}, request_id="req-42"))
    assert result["choices"][0]["text"] == "SELECT 1;"
    [msg] = fake.received[fake.subjects.model("m1", "generate")]
    body = decode(msg)
    assert body == {
        "prompt": "-- count users",
        "generate_config": {"max_tokens": 8, "stop": ["\n"]},
        "request_id": "req-42",
        "ack": True,
    }
    # The body says it all: msgpack is read as msgpack without a Content-Type, and the request
    # id and the ack request ride in the body.
    assert not msg.headers

    model.generate("again")
    second = fake.received[fake.subjects.model("m1", "generate")][1]
    generated = decode(second)["request_id"]
    assert len(generated) == 32 and not second.headers


def test_sync_stream_in_order(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    pieces = [f"tok{i} " for i in range(20)]
    fake.on(fake.subjects.model("m1", "generate"), streamer(pieces))
    chunks = list(stream_of(generate_model(client, "m1").generate("hi", {"stream": True, "max_tokens": 20})))
    assert [c["choices"][0]["text"] for c in chunks] == pieces
    [msg] = fake.received[fake.subjects.model("m1", "generate")]
    assert decode(msg)["generate_config"] == {"stream": True, "max_tokens": 20}
    fake.settle()
    assert not fake.received[fake.subjects.model("m1", "cancel")], "a finished stream is not cancelled"


async def test_async_stream_in_order(aclient: AsyncClient, fake: FakeNats) -> None:
    fake.describe("m1")
    pieces = ["Hel", "lo", ", ", "wor", "ld"]
    fake.on(fake.subjects.model("m1", "chat"), streamer(pieces))
    model = await aclient.get_model("m1")
    assert isinstance(model, AsyncChatModelHandle)
    stream = astream_of(await model.chat([{"role": "user", "content": "hi"}], {"stream": True}))
    got = [c["choices"][0]["text"] async for c in stream]
    assert "".join(got) == "Hello, world"


def test_empty_stream(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer([]))
    assert list(stream_of(generate_model(client, "m1").generate("hi", {"stream": True}))) == []


def _cancel_request_id(fake: FakeNats, uid: str) -> tuple[str, str]:
    [request] = fake.received[fake.subjects.model(uid, "generate")]
    [cancel] = fake.wait_for(fake.subjects.model(uid, "cancel"))
    return decode(request)["request_id"], decode(cancel)["request_id"]


def test_breaking_out_of_sync_stream_sends_cancel(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a", "b", "c"], end=False))
    fake.on(fake.subjects.model("m1", "cancel"))
    seen = []
    for piece in stream_of(generate_model(client, "m1").generate("hi", {"stream": True})):
        seen.append(piece["choices"][0]["text"])
        break
    assert seen == ["a"]
    sent, cancelled = _cancel_request_id(fake, "m1")
    assert sent == cancelled


def test_closing_sync_stream_sends_cancel(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a", "b"], end=False))
    fake.on(fake.subjects.model("m1", "cancel"))
    with stream_of(
        generate_model(client, "m1").generate("hi", {"stream": True}, request_id="r-close")
    ) as stream:
        assert next(stream)["choices"][0]["text"] == "a"
    assert decode(fake.wait_for(fake.subjects.model("m1", "cancel"))[0]) == {"request_id": "r-close"}
    # The cancel goes to every replica, not through the queue group.
    [cancel] = fake.received[fake.subjects.model("m1", "cancel")]
    assert cancel.subject == f"{fake.subjects.prefix}.model.m1.cancel"


async def test_async_stream_aclose_sends_cancel(aclient: AsyncClient, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a", "b"], end=False))
    fake.on(fake.subjects.model("m1", "cancel"))
    model = await aclient.get_model("m1")
    assert isinstance(model, AsyncGenerateModelHandle)
    async with astream_of(await model.generate("hi", {"stream": True})) as stream:
        async for _ in stream:
            break
    await fake.await_for(fake.subjects.model("m1", "cancel"))
    sent, cancelled = _cancel_request_id(fake, "m1")
    assert sent == cancelled


def test_stream_timeout_sends_cancel(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a"], end=False))
    fake.on(fake.subjects.model("m1", "cancel"))
    stream = stream_of(generate_model(client, "m1").generate("hi", {"stream": True}, timeout=0.5))
    started = time.monotonic()
    assert next(stream)["choices"][0]["text"] == "a"
    with pytest.raises(RequestTimeout, match=r"within 0\.5 s"):
        next(stream)
    assert time.monotonic() - started < 3
    sent, cancelled = _cancel_request_id(fake, "m1")
    assert sent == cancelled


def test_request_timeout_sends_cancel(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), silent)
    fake.on(fake.subjects.model("m1", "cancel"))
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        generate_model(client, "m1").generate("hi", timeout=0.5)
    assert 0.4 < time.monotonic() - started < 3
    assert info.value.timeout == 0.5
    sent, cancelled = _cancel_request_id(fake, "m1")
    assert sent == cancelled


def test_error_mid_stream(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a"], error=(500, "CUDA out of memory")))
    fake.on(fake.subjects.model("m1", "cancel"))
    stream = stream_of(generate_model(client, "m1").generate("hi", {"stream": True}))
    assert next(stream)["choices"][0]["text"] == "a"
    with pytest.raises(InternalError, match="CUDA out of memory"):
        next(stream)
    fake.settle()
    assert not fake.received[fake.subjects.model("m1", "cancel")], "the server ended it; no cancel"


def test_multipart_reply_is_reassembled(client: Client, fake: FakeNats) -> None:
    fake.describe("m1", model_type="embedding")
    vectors = [[float(i) / 7 + j for i in range(384)] for j in range(3)]
    reply = {
        "object": "list",
        "data": [{"object": "embedding", "index": j, "embedding": v} for j, v in enumerate(vectors)],
        "model": "m1",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }

    async def in_parts(nc: nats.NATS, msg: Msg) -> None:
        data, headers = encode_like(msg, reply)
        size = -(-len(data) // 3)
        parts = [data[i * size : (i + 1) * size] for i in range(3)]
        # Out of order on purpose: the part index, not arrival, decides the place.
        for index in (1, 0, 2):
            await nc.publish(
                msg.reply,
                parts[index],
                headers={**headers, "Natserve-Parts": "3", "Natserve-Part": str(index)},
            )

    fake.on(fake.subjects.model("m1", "embed"), in_parts)
    model = client.get_model("m1")
    assert isinstance(model, EmbeddingModelHandle)
    assert model.create_embedding(["a", "b", "c"]) == reply
    assert decode(fake.received[fake.subjects.model("m1", "embed")][0])["input"] == ["a", "b", "c"]


ERRORS = [
    (400, "BadRequest", BadRequest),
    (404, "NotFound", NotFound),
    (409, "Conflict", Conflict),
    (429, "Overloaded", Overloaded),
    (500, "InternalError", InternalError),
    (503, "Unavailable", Unavailable),
    (504, "ServerTimeout", ServerTimeout),
]


@pytest.mark.parametrize(("code", "type_name", "cls"), ERRORS)
@pytest.mark.parametrize("with_body", [True, False])
def test_error_headers_become_typed_exceptions(
    client: Client, fake: FakeNats, code: int, type_name: str, cls: type, with_body: bool
) -> None:
    fake.describe("m1")
    message = f"replica says {code} for model_uid 'm1'"

    async def fail(nc: nats.NATS, msg: Msg) -> None:
        headers = {"Nats-Service-Error-Code": str(code), "Nats-Service-Error": message}
        data = b""
        if with_body:
            data, ct = encode_like(msg, {"error": {"type": type_name, "code": code, "message": message}})
            headers.update(ct)
        await nc.publish(msg.reply, data, headers=headers)

    fake.on(fake.subjects.model("m1", "chat"), fail)
    with pytest.raises(cls) as info:
        chat_model(client, "m1").chat([{"role": "user", "content": "hi"}])
    assert type(info.value) is cls
    assert isinstance(info.value, ServiceError) and isinstance(info.value, NatserveError)
    assert info.value.code == code
    assert info.value.message == message


def test_chat_accepts_xinference_legacy_form(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "chat"), replier({"object": "chat.completion", "choices": []}))
    model = chat_model(client, "m1")
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    model.chat(prompt="three", system_prompt="be brief", chat_history=history)
    model.chat("positional prompt")
    first, second = (decode(m)["messages"] for m in fake.received[fake.subjects.model("m1", "chat")])
    assert first == [
        {"role": "system", "content": "be brief"},
        *history,
        {"role": "user", "content": "three"},
    ]
    assert second == [{"role": "user", "content": "positional prompt"}]


def test_json_encoding(nats_url: str, prefix: str, fake: FakeNats) -> None:
    fake.describe("m1", abilities=["generate"])
    fake.on(fake.subjects.model("m1", "generate"), replier(completion("ok")))
    with Client(nats_url, prefix=prefix, encoding="json") as client:
        assert reply_of(generate_model(client, "m1").generate("hi"))["choices"][0]["text"] == "ok"
    [msg] = fake.received[fake.subjects.model("m1", "generate")]
    # A JSON object needs no Content-Type: the wire rule reads it from its first byte.
    assert not msg.headers and msg.data.startswith(b"{")
    assert json.loads(msg.data)["prompt"] == "hi"


# ---------------------------------------------------------------------------- registry calls


def test_registry_reply_shapes(client: Client, fake: FakeNats) -> None:
    description = {"model_uid": "m1", "model_name": "nsql-2B", "model_type": "LLM"}
    fake.on(fake.subjects.models_list, replier({"models": {"m1": description}}))
    fake.on(fake.subjects.workers_list, replier({"workers": [{"worker_id": "w1", "devices": []}]}))
    fake.on(fake.subjects.registry_list, replier({"registrations": [{"model_name": "nsql-2B"}]}))
    fake.on(fake.subjects.registry_register, replier({"model_type": "LLM", "model_name": "nsql-2B"}))
    fake.on(fake.subjects.registry_get, replier(NSQL_2B))
    fake.on(fake.subjects.registry_unregister, replier({}))
    fake.on(fake.subjects.models_terminate, replier({}))

    assert client.list_models() == {"m1": description}
    assert client.list_workers() == [{"worker_id": "w1", "devices": []}]
    assert client.list_model_registrations(model_type="LLM") == [{"model_name": "nsql-2B"}]
    assert client.register_model(model_type="LLM", model=json.dumps(NSQL_2B), persist=True) == {
        "model_type": "LLM",
        "model_name": "nsql-2B",
    }
    assert client.get_model_registration(model_type="LLM", model_name="nsql-2B") == NSQL_2B
    client.unregister_model(model_type="LLM", model_name="nsql-2B")
    client.terminate_model(model_uid="m1")

    [register] = fake.received[fake.subjects.registry_register]
    # The definition travels as given (a JSON string here), with persist.
    assert decode(register) == {"model_type": "LLM", "model": json.dumps(NSQL_2B), "persist": True}
    assert decode(fake.received[fake.subjects.registry_list][0]) == {"model_type": "LLM"}
    assert decode(fake.received[fake.subjects.models_terminate][0]) == {"model_uid": "m1"}


def test_launch_waits_and_reports_progress(client: Client, fake: FakeNats) -> None:
    async def launch(nc: nats.NATS, msg: Msg) -> None:
        body = decode(msg)
        uid = body.get("model_uid") or body["model_name"]
        events = [
            ModelEvent(model_uid="other", model_name="other-model", stage="loading"),
            ModelEvent(model_uid=uid, model_name=body["model_name"], stage="placing"),
            ModelEvent(model_uid=uid, model_name=body["model_name"], stage="download", fraction=0.5),
            ModelEvent(model_uid=uid, stage="loading", replica_index=0, worker_id="w1"),
            ModelEvent(model_uid=uid, model_name=body["model_name"], stage="ready"),
        ]
        for event in events:
            await nc.publish(fake.subjects.events(event.model_uid), msgpack.packb(event.model_dump()))
        data, headers = encode_like(msg, {"model_uid": uid})
        await nc.publish(msg.reply, data, headers=headers)

    fake.on(fake.subjects.models_launch, launch)
    seen: list[ModelEvent] = []
    uid = client.launch_model(model_name="nsql-2B", quantization="4-bit", timeout=60, progress=seen.append)
    assert uid == "nsql-2B"
    assert [e.stage for e in seen] == ["placing", "download", "loading", "ready"]
    assert seen[1].fraction == 0.5

    [request] = fake.received[fake.subjects.models_launch]
    body = decode(request)
    assert body["model_name"] == "nsql-2B" and body["quantization"] == "4-bit"
    # The registry bounds its own wait with the call's timeout.
    assert body["wait"] is True and body["timeout"] == 60

    assert client.launch_model(model_name="nsql-2B", model_uid="mine", wait=False) == "mine"
    assert decode(fake.received[fake.subjects.models_launch][1])["wait"] is False


def test_dropping_the_sync_client_cleans_up(nats_url: str, prefix: str) -> None:
    client = Client(nats_url, prefix=prefix)
    with pytest.raises(NoResponders):
        client.list_models()
    thread = client._loop_thread.thread
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del client
    thread.join(5)
    assert not thread.is_alive()


def test_launch_progress_bar_renders(
    client: Client, fake: FakeNats, capsys: pytest.CaptureFixture[str]
) -> None:
    async def launch(nc: nats.NATS, msg: Msg) -> None:
        for event in (
            ModelEvent(model_uid="m1", model_name="nsql-2B", stage="download", fraction=0.25),
            ModelEvent(model_uid="m1", stage="loading", replica_index=0, message="on cpu"),
            ModelEvent(model_uid="m1", model_name="nsql-2B", stage="ready"),
        ):
            await nc.publish(fake.subjects.events("m1"), msgpack.packb(event.model_dump()))
        data, headers = encode_like(msg, {"model_uid": "m1"})
        await nc.publish(msg.reply, data, headers=headers)

    fake.on(fake.subjects.models_launch, launch)
    assert client.launch_model(model_name="nsql-2B", progress=True) == "m1"
    err = capsys.readouterr().err
    assert "m1" in err and "ready" in err


def test_a_handle_keeps_its_client_alive(nats_url: str, prefix: str, fake: FakeNats) -> None:
    fake.describe("m1", abilities=["generate"])
    fake.on(fake.subjects.model("m1", "generate"), streamer(["x", "y"]))
    # No reference to the Client is kept here: the handle and the stream must keep it open.
    model = generate_model(Client(nats_url, prefix=prefix), "m1")
    assert [c["choices"][0]["text"] for c in stream_of(model.generate("hi", {"stream": True}))] == ["x", "y"]
    stream = stream_of(generate_model(Client(nats_url, prefix=prefix), "m1").generate("hi", {"stream": True}))
    assert [c["choices"][0]["text"] for c in stream] == ["x", "y"]


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="sends itself SIGINT")
def test_ctrl_c_in_a_sync_stream_sends_cancel(client: Client, fake: FakeNats) -> None:
    fake.describe("m1")
    fake.on(fake.subjects.model("m1", "generate"), streamer(["a"], end=False))
    fake.on(fake.subjects.model("m1", "cancel"))
    stream = stream_of(generate_model(client, "m1").generate("hi", {"stream": True}))
    assert next(stream)["choices"][0]["text"] == "a"
    # A real signal, as a terminal sends it: the main thread is blocked waiting for a chunk.
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(stream)
    finally:
        timer.cancel()
    sent, cancelled = _cancel_request_id(fake, "m1")
    assert sent == cancelled
