"""The stream keepalive (``broker_client._keepalive``): the reader acknowledges every N chunks and
a stream whose reader went silent stops; a reader that did not ask sees today's stream.

The rules without a server, the client's acks over the memory transport, then a service on a
real nats-server streaming to three readers: the natserve transport (acks, gets every chunk), a
raw subscriber that asked for the keepalive and went away (stopped within the silence), and a
raw `nats req`-like reader that did not ask (gets every chunk, no header).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from broker_client import AsyncClient, GenerateRequest, MemoryRequest, MemoryTransport, Subjects, codec
from broker_client._keepalive import KeepaliveState, ack_body, header_value, parse_header
from broker_client.runtime import (
    KEEPALIVE_HEADER,
    SEQ_HEADER,
    Keepalives,
    NatsTransport,
    Responder,
    ServiceHost,
    StreamAbandoned,
    connect,
)
from tests.support.waits import within

S = Subjects("ka")

# ---------------------------------------------------------------------------- the rules


def test_the_header_says_how_often_and_where() -> None:
    assert parse_header(header_value(16, "ka.model.m.keepalive.w1")) == (16, "ka.model.m.keepalive.w1")
    for bad in ("", "16", "x ka.s", "0 ka.s", "2000 ka.s", "16 a b"):
        assert parse_header(bad) is None, bad


def test_a_stream_stops_only_after_two_windows_unacknowledged_for_the_silence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    state = KeepaliveState(4, "ka.ack", silence=5.0)
    for seq in range(1, 9):
        state.check(seq, "s")  # up to 2 x 4 chunks in flight: fine, whatever the time
    now[0] += 60
    state.check(9, "s")  # an ack is overdue from here on
    now[0] += 4.9
    state.check(10, "s")
    state.acknowledged(8)  # the reader is there after all
    now[0] += 60
    for seq in range(11, 17):
        state.check(seq, "s")
    state.check(17, "s")
    now[0] += 5.1
    with pytest.raises(StreamAbandoned, match=r"9 chunks unacknowledged for 5 s") as info:
        state.check(18, "s")
    assert info.value.code == 503
    state.acknowledged(3)  # an old ack changes nothing
    assert state.acked == 8


# ---------------------------------------------------------------------------- the client's side


def chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"text": text, "index": 0}]}


async def test_the_client_asks_for_it_and_acknowledges_what_it_hands_over() -> None:
    describe = {"model_uid": "m1", "model_type": "LLM", "model_ability": ["generate"]}
    transport = MemoryTransport({S.models_describe: lambda request: describe})
    ack_subject = S.model_keepalive("m1", "w1")

    async def stream(request: MemoryRequest) -> None:
        assert request.body["keepalive"] == 4 and request.body["request_id"] == "r-ka"
        for seq in range(1, 11):
            headers = {codec.CONTENT_TYPE: codec.MSGPACK, SEQ_HEADER: str(seq)}
            if seq == 1:
                headers[KEEPALIVE_HEADER] = header_value(4, ack_subject)
            await request.send(codec.encode(chunk(f"t{seq}"), codec.MSGPACK), headers)
        await request.end_stream()

    transport.route(S.model("m1", "generate"), stream)
    async with AsyncClient(transport=transport, prefix=S.prefix, stream_keepalive=4) as client:
        model: Any = await client.get_model("m1")
        result = await model.generate("hi", {"stream": True}, request_id="r-ka")
        texts = [c["choices"][0]["text"] async for c in result]
    assert texts == [f"t{n}" for n in range(1, 11)]
    acks = [codec.decode(m.data, codec.MSGPACK) for m in transport.published if m.subject == ack_subject]
    assert [a["received"] for a in acks] == [4, 8]
    assert len({a["reply"] for a in acks}) == 1

    # Turned off, streams do not ask.
    async def plain(request: MemoryRequest) -> AsyncIterator[dict[str, Any]]:
        assert "keepalive" not in request.body
        yield chunk("a")

    transport = MemoryTransport(
        {S.models_describe: lambda request: describe, S.model("m1", "generate"): plain}
    )
    async with AsyncClient(transport=transport, prefix=S.prefix, stream_keepalive=None) as client:
        model = await client.get_model("m1")
        assert [c async for c in await model.generate("hi", {"stream": True})] == [chunk("a")]


# ---------------------------------------------------------------------------- on a real server


@pytest.fixture
async def streaming(nats_url: str, unique: str) -> AsyncIterator[tuple[str, Keepalives, dict[str, Any]]]:
    """A service streaming 400 chunks, 5 ms apart, with the keepalive when asked (0.5 s silence)."""
    nc = await connect(nats_url, name=f"ka-{unique}")
    host = ServiceHost(nc, name=f"ka-{unique}", version="0.0.1")
    await host.start()
    subject, ack_subject = f"{unique}.generate", f"{unique}.keepalive.w1"
    keepalives = Keepalives(ack_subject, silence=0.5)
    await nc.subscribe(ack_subject, cb=keepalives.on_ack)
    outcome: dict[str, Any] = {"ended": defaultdict(asyncio.Event)}

    async def generate(resp: Responder) -> None:
        req = resp.parse(GenerateRequest)
        if req.keepalive:
            keepalives.arm(resp, req.keepalive)
        try:
            for n in range(400):
                await resp.chunk(chunk(f"t{n}"))
                await asyncio.sleep(0.005)  # a token's time
            await resp.end_stream()
            outcome[req.request_id or ""] = "finished"
        except StreamAbandoned as exc:
            outcome[req.request_id or ""] = ("abandoned", resp.streamed, exc.message)
            raise
        finally:
            keepalives.disarm(resp)
            outcome["ended"][req.request_id or ""].set()

    await host.add_endpoint("generate", subject, generate)
    await host.until_subscribed()
    try:
        yield subject, keepalives, outcome
    finally:
        await host.stop()
        await nc.close()


async def test_a_silent_reader_stops_its_stream_and_others_read_to_the_end(
    nats_url: str, streaming: tuple[str, Keepalives, dict[str, Any]]
) -> None:
    subject, keepalives, outcome = streaming
    reader = await nats.connect(nats_url)
    try:
        # The natserve transport acknowledges every 8 chunks: it gets all 400.
        transport = NatsTransport(reader)
        await transport.start()
        body = {"prompt": "x", "request_id": "kept", "keepalive": 8}
        chunks = [c async for c in transport.stream(subject, body, timeout=30)]
        assert len(chunks) == 400 and outcome["kept"] == "finished"

        # A raw reader that asked and then went away: the stream stops within the silence.
        first: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def once(msg: Msg) -> None:
            if not first.done():
                first.set_result(msg)

        inbox = reader.new_inbox()
        sub = await reader.subscribe(inbox, cb=once)
        started = time.monotonic()
        await reader.publish(
            subject, json.dumps({"prompt": "x", "request_id": "gone", "keepalive": 8}).encode(), reply=inbox
        )
        msg = await within(first, "the first chunk")
        assert parse_header(msg.headers[KEEPALIVE_HEADER]) == (8, keepalives.subject)  # type: ignore[index]
        await sub.unsubscribe()

        await within(outcome["ended"]["gone"].wait(), "the abandoned stream to stop", timeout=10)
        took = time.monotonic() - started
        what, sent, message = outcome["gone"]
        # It stopped soon after 2 x 8 chunks went unacknowledged, not at 400.
        assert what == "abandoned" and 17 <= sent < 400 and "stopped acknowledging" in message, outcome
        assert took < 2.0, f"the abandoned stream ran {took:.1f} s"
        assert len(keepalives) == 0

        # A reader that did not ask (nats req): no header, every chunk, as before.
        got: list[Msg] = []
        done = asyncio.get_running_loop().create_future()

        async def collect(msg: Msg) -> None:
            got.append(msg)
            if not msg.data and not done.done():
                done.set_result(None)

        inbox = reader.new_inbox()
        await reader.subscribe(inbox, cb=collect)
        await reader.publish(subject, b'{"prompt": "x", "request_id": "raw"}', reply=inbox)
        await within(done, "the raw reader's stream", timeout=30)
        assert len(got) == 401 and KEEPALIVE_HEADER not in (got[0].headers or {})
        assert outcome["raw"] == "finished"
    finally:
        await reader.close()


def test_an_ack_body_names_the_reply_and_the_count() -> None:
    assert ack_body("_INBOX.x.1", 16) == {"reply": "_INBOX.x.1", "received": 16}
