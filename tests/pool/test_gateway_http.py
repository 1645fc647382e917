"""The gateway's HTTP/1.1 from outside: raw sockets against the real gateway server
(``run_gateway`` on a socket of its own) over a registry and a worker in this process, serving
echo models. Every test writes the bytes of its requests and reads the bytes of the replies, so
what it pins is what any HTTP client sees, whatever serves the routes inside.

- keep-alive: one connection answers request after request, each with its ``content-length``,
  ``x-request-id`` and ``date``; pipelined requests (one write) come back whole and in order;
- ``Expect: 100-continue`` gets its ``100 Continue`` before the body is sent; a chunked request
  body is read whole;
- a body above the gateway's limit (``max_body_bytes``) is a 400 ``payload_too_large`` naming the
  limit: a declared ``Content-Length`` before the body is sent, a chunked body once it grows past;
- HTTP/1.0, and ``Connection: close``, are answered with ``connection: close`` and the connection
  closed;
- a stream is ``text/event-stream`` in chunks, ``data: [DONE]`` and the last chunk, and the
  connection goes on; a client that leaves mid-stream stops the generation on the replica;
- ``X-Request-Id`` comes back as given (or made); a query string is the route's; other methods are
  405s and unknown paths 404s, OpenAI error objects; bad bodies are 400s naming the field, and the
  connection goes on after each;
- a stop lets the request in flight finish (its reply says ``connection: close``), closes idle
  connections and takes no new ones;
- 64 connections at once are all answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from natserve.gateway.server import HttpListener, bind_listener, run_gateway
from tests.support.batches import ECHO_CHAT_TEMPLATE
from tests.support.nats_server import NatsServer
from tests.support.pool import echo_definition, words
from tests.support.system import running_registry_and_workers
from tests.support.waits import eventually, within

# One pool and one gateway for the module, on the module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

ECHO = "echo"  # answers at once
SLOW = "slow"  # 20 ms a word
DELAY = 0.02
MAX_BODY = 16 * 1024
TIMEOUT = 10.0  # a reply comes in milliseconds; this only turns a lost one into a failure
JSON_HEADERS = {"date", "content-type", "content-length", "x-request-id"}
STREAM_HEADERS = {
    "date",
    "content-type",
    "cache-control",
    "x-accel-buffering",
    "x-request-id",
    "transfer-encoding",
}
CHUNKED = [("Transfer-Encoding", "chunked")]
LAST_CHUNK = b"0\r\n\r\n"


@dataclass
class Gateway:
    port: int
    prefix: str
    nats_url: str
    workers: list[Any]

    def replica(self, uid: str) -> Any:
        [worker] = self.workers
        [replica] = worker.models[uid].replicas.values()
        return replica


@contextlib.asynccontextmanager
async def serving(
    nats_url: str, prefix: str, **options: Any
) -> AsyncIterator[tuple[HttpListener, asyncio.Event]]:
    """A gateway on a free port of 127.0.0.1 until the block ends or its ``stop`` is set."""
    listener = HttpListener(bind_listener("127.0.0.1", 0))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_gateway(nats_url=nats_url, listener=listener, stop=stop, ready=ready, prefix=prefix, **options)
    )
    try:
        await within(ready.wait(), "the gateway to serve")
        yield listener, stop
    finally:
        stop.set()
        await within(task, "the gateway to stop")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    prefix = f"gh{uuid.uuid4().hex[:10]}"
    db_url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('gateway-http') / 'registry.db'}"
    async with running_registry_and_workers(nats_server.url, db_url, prefix, [f"w-{prefix}"]) as (
        client,
        workers,
    ):
        for name, uri in ((ECHO, "echo:"), (SLOW, f"echo:?delay={DELAY}")):
            await client.register_model("LLM", echo_definition(name, uri, chat_template=ECHO_CHAT_TEMPLATE))
            await within(client.launch_model(name, progress=False), f"the launch of {name}")
        async with serving(nats_server.url, prefix, max_body_bytes=MAX_BODY, drain_timeout=10) as (
            listener,
            _,
        ):
            yield Gateway(listener.port, prefix, nats_server.url, workers)


# ---------------------------------------------------------------------------- raw HTTP/1.1


@dataclass
class Reply:
    status: str  # the status line, "HTTP/1.1 200 OK"
    headers: list[tuple[str, str]]  # names lower-cased, in the order they came
    body: bytes  # the body, its chunks joined when it came chunked
    chunks: list[bytes] | None = None  # the chunks' data, when it came chunked

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.headers}

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} came {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[bytes]:
        """The server-sent events of the body, each the data after ``data: ``."""
        text = self.body
        assert text.endswith(b"\n\n"), text[-200:]
        events = text[:-2].split(b"\n\n")
        assert all(e.startswith(b"data: ") for e in events), events
        return [e[len(b"data: ") :] for e in events]


def request(
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: Sequence[tuple[str, str]] = (),
    version: str = "1.1",
) -> bytes:
    """The bytes of one request: a JSON (or raw bytes) body with its Content-Length, unless
    ``headers`` say Transfer-Encoding (then only the head: the caller sends the chunks)."""
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
    if body is not None:
        lines.append("Content-Type: application/json")
        if not chunked:
            lines.append(f"Content-Length: {len(data)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if chunked else data)


def post(path: str, body: Any, **options: Any) -> bytes:
    return request("POST", path, body, **options)


def completion(prompt: str, model: str = ECHO, **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, **fields}


def chat(content: str, model: str = ECHO, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Connection:
    """One TCP connection to the gateway: bytes out, replies in, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await within(self.writer.drain(), "the request to be written")

    async def head(self, what: str = "the reply's head") -> tuple[str, list[tuple[str, str]]]:
        raw = await within(self.reader.readuntil(b"\r\n\r\n"), what, TIMEOUT)
        status, *lines = raw[:-4].decode("latin-1").split("\r\n")
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon, f"not a header line: {line!r}"
            headers.append((name.lower(), value.strip()))
        return status, headers

    async def chunk(self, what: str = "a chunk") -> bytes:
        """One chunk's data (b"" for the last chunk, which must end the body: no trailers)."""
        size_line = await within(self.reader.readuntil(b"\r\n"), what, TIMEOUT)
        size = int(size_line[:-2].split(b";")[0], 16)
        data = await within(self.reader.readexactly(size + 2), what, TIMEOUT)
        assert data.endswith(b"\r\n"), data[-20:]
        return data[:-2]

    async def reply(self, what: str = "the reply") -> Reply:
        status, headers = await self.head(f"the head of {what}")
        reply = Reply(status, headers, b"")
        length = reply.header("content-length")
        if reply.header("transfer-encoding") == "chunked":
            assert length is None, headers
            reply.chunks = []
            while data := await self.chunk(f"a chunk of {what}"):
                reply.chunks.append(data)
            reply.body = b"".join(reply.chunks)
        else:
            assert length is not None, f"{what}: neither a length nor chunks: {headers}"
            reply.body = await within(self.reader.readexactly(int(length)), f"the body of {what}", TIMEOUT)
        return reply

    async def ask(self, data: bytes, what: str = "the reply") -> Reply:
        await self.send(data)
        return await self.reply(what)

    async def closed_by_server(self) -> None:
        rest = await within(self.reader.read(), "the server to close the connection", TIMEOUT)
        assert rest == b"", f"more after the reply: {rest[:200]!r}"

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Connection]:
    reader, writer = await within(asyncio.open_connection("127.0.0.1", port), "the connection")
    conn = Connection(reader, writer)
    try:
        yield conn
    finally:
        conn.close()
        with contextlib.suppress(ConnectionError):
            await within(writer.wait_closed(), "the connection to close")


# ---------------------------------------------------------------------------- what a reply holds


def check_date(value: str | None) -> None:
    assert value is not None and value.endswith(" GMT"), value
    assert email.utils.parsedate_to_datetime(value).tzinfo is not None, value


def check_json_head(reply: Reply, status: str, *, close: bool = False, extra: Sequence[str] = ()) -> None:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.names == JSON_HEADERS | set(extra) | ({"connection"} if close else set()), reply.headers
    assert reply.header("content-type") == "application/json"
    assert reply.header("content-length") == str(len(reply.body))
    assert reply.header("connection") == ("close" if close else None)
    check_date(reply.header("date"))
    rid = reply.header("x-request-id")
    assert rid and rid.isascii() and rid.isprintable() and " " not in rid and len(rid) <= 128, rid


def check_completion(reply: Reply, text: str, *, model: str = ECHO, close: bool = False) -> None:
    check_json_head(reply, "HTTP/1.1 200 OK", close=close)
    body = reply.json()
    assert (body["object"], body["model"]) == ("text_completion", model), body
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, text, "stop")], body
    n = len(text.split())
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}, body


def check_chat(reply: Reply, text: str, *, model: str = ECHO, close: bool = False) -> None:
    check_json_head(reply, "HTTP/1.1 200 OK", close=close)
    body = reply.json()
    assert (body["object"], body["model"]) == ("chat.completion", model), body
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    n = len(text.split())
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}, body


def both_routes(text: str) -> list[tuple[str, dict[str, Any], Callable[..., None]]]:
    """``/v1/completions`` and ``/v1/chat/completions``, each with a body asking for ``text``
    and the check of its reply."""
    return [
        ("/v1/completions", completion(text), check_completion),
        ("/v1/chat/completions", chat(text), check_chat),
    ]


def check_error(
    reply: Reply,
    status: str,
    message: str,
    *,
    param: str | None = None,
    code: str,
    prefix: bool = False,
    extra: Sequence[str] = (),
) -> None:
    """An OpenAI error object (with Xinference's ``detail``); ``prefix``: the message starts so."""
    check_json_head(reply, status, extra=extra)
    body = reply.json()
    error = body["error"]
    got = error["message"]
    assert got.startswith(message) if prefix else got == message, got
    assert body == {
        "error": {"message": got, "type": "invalid_request_error", "param": param, "code": code},
        "detail": got,
    }


# ---------------------------------------------------------------------------- 1. keep-alive


async def test_one_connection_answers_request_after_request(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        ids = []
        for i in range(3):
            reply = await conn.ask(post("/v1/completions", completion(f"keep {i} alive")), f"completion {i}")
            check_completion(reply, f"keep {i} alive")
            reply_chat = await conn.ask(post("/v1/chat/completions", chat(f"chat {i}")), f"chat {i}")
            check_chat(reply_chat, f"chat {i}")
            ids += [reply.header("x-request-id"), reply_chat.header("x-request-id")]
        assert len(set(ids)) == len(ids), ids


# ---------------------------------------------------------------------------- 2. pipelining


async def test_pipelined_requests_come_back_whole_and_in_order(gateway: Gateway) -> None:
    # The first is the slowest (five words at 20 ms): the others wait for it.
    requests = [
        post(
            "/v1/completions", completion("slow one two three four", SLOW), headers=[("X-Request-Id", "p-1")]
        ),
        post("/v1/chat/completions", chat("second"), headers=[("X-Request-Id", "p-2")]),
        post("/v1/completions", completion("third"), headers=[("X-Request-Id", "p-3")]),
    ]
    async with connect(gateway.port) as conn:
        await conn.send(b"".join(requests))
        first, second, third = [await conn.reply(f"pipelined reply {i}") for i in (1, 2, 3)]
        check_completion(first, "slow one two three four", model=SLOW)
        check_chat(second, "second")
        check_completion(third, "third")
        assert [r.header("x-request-id") for r in (first, second, third)] == ["p-1", "p-2", "p-3"]
        # And the connection goes on.
        check_completion(await conn.ask(post("/v1/completions", completion("after"))), "after")


# ---------------------------------------------------------------------------- 3. Expect: 100-continue


async def test_expect_100_continue_is_answered_before_the_body_is_sent(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        for path, body, check in both_routes("expected"):
            data = json.dumps(body).encode()
            head = request("POST", path, data, headers=[("Expect", "100-continue")])[: -len(data)]
            await conn.send(head)
            interim = await within(conn.reader.readuntil(b"\r\n\r\n"), "the 100 Continue", TIMEOUT)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await conn.send(data)
            check(await conn.reply(f"the reply of {path}"), "expected")


# ---------------------------------------------------------------------------- 4. chunked request body


async def test_a_chunked_request_body_is_read_whole(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        for path, body, check in both_routes("in three chunks"):
            data = json.dumps(body).encode()
            await conn.send(post(path, b"", headers=CHUNKED))
            third = len(data) // 3
            for part in (data[:third], data[third : 2 * third], data[2 * third :]):
                await conn.send(chunk(part))
            await conn.send(LAST_CHUNK)
            check(await conn.reply(f"the reply to a chunked {path}"), "in three chunks")


# ---------------------------------------------------------------------------- 5. the body's limit


async def test_a_declared_length_above_the_limit_is_refused_before_the_body_is_sent(gateway: Gateway) -> None:
    size = MAX_BODY + 1
    expected = (
        f"the request body of {size} bytes is above the gateway's limit of {MAX_BODY} bytes "
        "(NATSERVE_HTTP_MAX_BODY_BYTES)"
    )
    async with connect(gateway.port) as conn:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n"
            # The refusal comes while the body is still unsent.
            reply = await conn.ask(head.encode(), f"the refusal of {path}")
            check_error(reply, "HTTP/1.1 400 Bad Request", expected, code="payload_too_large")
            # Sent after all, the body is skipped, and the connection goes on.
            await conn.send(b"x" * size)
            check_completion(await conn.ask(post("/v1/completions", completion("next"))), "next")
        # With Expect: 100-continue, the refusal comes instead of the 100 Continue.
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
        reply = await conn.ask(f"{head}Content-Length: {size}\r\n\r\n".encode(), "the refusal, no 100")
        check_error(reply, "HTTP/1.1 400 Bad Request", expected, code="payload_too_large")


async def test_a_chunked_body_growing_past_the_limit_is_refused(gateway: Gateway) -> None:
    expected = (
        f"the request body is above the gateway's limit of {MAX_BODY} bytes (NATSERVE_HTTP_MAX_BODY_BYTES)"
    )
    async with connect(gateway.port) as conn:
        # 1 MiB in 16 chunks, more than the server reads at once: it is refused while it comes,
        # before its last chunk is sent.
        await conn.send(post("/v1/completions", b"", headers=CHUNKED))
        for _ in range(16):
            conn.writer.write(chunk(b" " * 65536))
        reply = await conn.reply("the refusal of a chunked body past the limit")
        check_error(reply, "HTTP/1.1 400 Bad Request", expected, code="payload_too_large")


@pytest.mark.parametrize("last", [True, False], ids=["whole", "last-chunk-held-back"])
async def test_a_chunked_body_past_the_limit_in_one_read_is_refused(gateway: Gateway, last: bool) -> None:
    # The whole body in one write, so that the server gets it as one message: that message alone
    # is past the limit. Without its last chunk the refusal must not wait for more.
    expected = (
        f"the request body is above the gateway's limit of {MAX_BODY} bytes (NATSERVE_HTTP_MAX_BODY_BYTES)"
    )
    data = b'{"model": "x", "prompt": "' + b"p" * (MAX_BODY + 100) + b'"}'
    async with connect(gateway.port) as conn:
        await conn.send(
            post("/v1/completions", b"", headers=CHUNKED) + chunk(data) + (chunk(b"") if last else b"")
        )
        reply = await conn.reply("the refusal of a chunked body past the limit in one read")
        check_error(reply, "HTTP/1.1 400 Bad Request", expected, code="payload_too_large")


# ---------------------------------------------------------------------------- 6. closing requests


async def test_http_1_0_and_connection_close_are_answered_and_closed(gateway: Gateway) -> None:
    for version, headers in (("1.0", []), ("1.1", [("Connection", "close")])):
        for path, body, check in both_routes(f"closing {version}"):
            async with connect(gateway.port) as conn:
                reply = await conn.ask(
                    post(path, body, headers=headers, version=version), f"{path} {version}"
                )
                # The status line is HTTP/1.1's whatever the request's version.
                check(reply, f"closing {version}", close=True)
                await conn.closed_by_server()


# ---------------------------------------------------------------------------- 7. streams


def check_stream_head(reply: Reply) -> None:
    assert reply.status == "HTTP/1.1 200 OK", (reply.status, reply.body[:300])
    assert reply.names == STREAM_HEADERS, reply.headers
    assert reply.header("content-type") == "text/event-stream; charset=utf-8"
    assert reply.header("transfer-encoding") == "chunked"
    assert reply.header("cache-control") == "no-cache"
    assert reply.header("x-accel-buffering") == "no"
    check_date(reply.header("date"))


async def test_a_stream_is_events_in_chunks_and_the_connection_goes_on(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        for i in range(2):
            reply = await conn.ask(
                post(
                    "/v1/completions",
                    completion("stream these words", stream=True),
                    headers=[("X-Request-Id", f"s-{i}")],
                ),
                "the completion stream",
            )
            check_stream_head(reply)
            assert reply.header("x-request-id") == f"s-{i}"
            *events, done = reply.events()
            assert done == b"[DONE]"
            chunks = [json.loads(e) for e in events]
            assert {c["object"] for c in chunks} == {"text_completion"}
            assert len({c["id"] for c in chunks}) == 1
            assert "".join(c["choices"][0]["text"] for c in chunks) == "stream these words"
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]

            reply = await conn.ask(
                post("/v1/chat/completions", chat("chat stream", stream=True)), "the chat stream"
            )
            check_stream_head(reply)
            *events, done = reply.events()
            assert done == b"[DONE]"
            chunks = [json.loads(e) for e in events]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            deltas = [c["choices"][0]["delta"] for c in chunks]
            assert deltas[0] == {"role": "assistant"}, deltas
            assert "".join(d.get("content", "") for d in deltas) == "chat stream"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            # After a stream, a plain request on the same connection.
            check_completion(await conn.ask(post("/v1/completions", completion(f"then {i}"))), f"then {i}")


# ---------------------------------------------------------------------------- 8. a client that leaves


async def test_a_client_that_leaves_mid_stream_stops_the_generation(gateway: Gateway) -> None:
    replica = gateway.replica(SLOW)
    engine = replica.engine
    cancelled, engine_cancelled = replica.cancelled, engine.stats.cancelled
    generated = engine.stats.generated_tokens
    n = 500  # 10 s of words at 20 ms
    async with connect(gateway.port) as other:
        check_completion(await other.ask(post("/v1/completions", completion("before"))), "before")
        async with connect(gateway.port) as leaving:
            await leaving.send(
                post(
                    "/v1/completions",
                    completion(words(n), SLOW, max_tokens=n, stream=True),
                    headers=[("X-Request-Id", "leaves-1")],
                )
            )
            status, headers = await leaving.head()
            assert status == "HTTP/1.1 200 OK" and ("transfer-encoding", "chunked") in headers, headers
            first = await leaving.chunk("the first event")
            assert first.startswith(b"data: {"), first
            assert "leaves-1" in replica.flights
        # The socket is closed: the gateway cancels the request on the replica.

        async def stopped() -> bool:
            stats = engine.stats
            return (
                "leaves-1" not in replica.flights
                and replica.cancelled == cancelled + 1
                and stats.cancelled == engine_cancelled + 1
                and stats.running == stats.waiting == 0
            )

        await eventually(stopped, "the replica to cancel the abandoned stream", timeout=TIMEOUT)
        # Long before its 500 words.
        assert engine.stats.generated_tokens - generated < n // 2
        # The gateway goes on: the connection that was there, and a new one.
        check_completion(await other.ask(post("/v1/completions", completion("after"))), "after")
    async with connect(gateway.port) as new:
        check_completion(await new.ask(post("/v1/completions", completion("new", SLOW))), "new", model=SLOW)


# ---------------------------------------------------------------------------- 9. request ids


async def test_the_request_id_comes_back_as_given_or_is_made(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        for path, body, check in both_routes("ids"):
            reply = await conn.ask(post(path, body, headers=[("X-Request-Id", "abc-1")]))
            check(reply, "ids")
            assert reply.header("x-request-id") == "abc-1"
            made = []
            for _ in range(2):
                reply = await conn.ask(post(path, body))
                check(reply, "ids")
                made.append(reply.header("x-request-id"))
            assert len(set(made)) == 2 and "abc-1" not in made, made
        # An error carries the caller's id too; an id that is not visible ASCII is a 400 naming it.
        reply = await conn.ask(post("/v1/completions", {"prompt": "x"}, headers=[("X-Request-Id", "abc-2")]))
        assert reply.status == "HTTP/1.1 400 Bad Request" and reply.header("x-request-id") == "abc-2"
        reply = await conn.ask(post("/v1/completions", completion("x"), headers=[("X-Request-Id", "a b")]))
        check_error(
            reply,
            "HTTP/1.1 400 Bad Request",
            "X-Request-Id must be 1 to 128 visible ASCII characters, got b'a b'",
            param="X-Request-Id",
            code="invalid_value",
        )
        assert reply.header("x-request-id") != "a b"


# ---------------------------------------------------------------------------- 10. routes


async def test_a_query_string_is_the_routes_and_other_methods_and_paths_are_errors(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        check_completion(await conn.ask(post("/v1/completions?x=1", completion("queried"))), "queried")
        check_chat(await conn.ask(post("/v1/chat/completions?a=b&c", chat("queried"))), "queried")
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
            reply = await conn.ask(request("GET", path), f"GET {path}")
            check_error(
                reply,
                "HTTP/1.1 405 Method Not Allowed",
                f"GET is not allowed on {path}",
                code="method_not_allowed",
                extra=["allow"],
            )
            assert reply.header("allow") == "POST"
        reply = await conn.ask(post("/v1/nothing", completion("x")), "an unknown path")
        check_error(reply, "HTTP/1.1 404 Not Found", "no route POST /v1/nothing", code="not_found")
        # The connection went on through all of them.
        check_completion(await conn.ask(post("/v1/completions", completion("still here"))), "still here")


# ---------------------------------------------------------------------------- 11. bad bodies


@dataclass
class Bad:
    path: str
    body: Any  # bytes as they are, anything else as JSON
    message: str
    param: str | None
    code: str = "invalid_value"
    whole: bool = True  # False: the message starts so (the rest is the JSON parser's)


BAD_BODIES = [
    Bad("/v1/completions", b"{nope", "the request body is not valid JSON: ", None, "invalid_json", False),
    Bad("/v1/chat/completions", b"", "the request body is empty: ", None, "invalid_json", False),
    Bad(
        "/v1/completions",
        {"prompt": "x"},
        "'model' is required: the uid of a running model",
        "model",
        "missing",
    ),
    Bad(
        "/v1/chat/completions",
        {"messages": []},
        "'model' is required: the uid of a running model",
        "model",
        "missing",
    ),
    Bad(
        "/v1/completions",
        completion("x", max_tokens="5"),
        "invalid generate_config: generate_config.max_tokens: must be a valid integer (got '5')",
        "max_tokens",
    ),
    Bad("/v1/completions", completion("x", stream="yes"), "stream must be a boolean, got 'yes'", "stream"),
    Bad("/v1/completions", {"model": ECHO, "prompt": 5}, "prompt must be a string, got 5", "prompt"),
    Bad(
        "/v1/chat/completions",
        {"model": ECHO, "messages": "hi"},
        "messages must be a non-empty list, got 'hi'",
        "messages",
    ),
    Bad(
        "/v1/chat/completions",
        [1, 2],
        "the body of /v1/chat/completions must be a JSON object, got list",
        None,
    ),
    Bad(
        "/v1/embeddings",
        {"model": ECHO, "input": "x"},
        "model 'echo' cannot embed: its abilities are generate, chat",
        None,
        "bad_request",
    ),
]


async def test_bad_bodies_are_400s_naming_the_field_and_the_connection_goes_on(gateway: Gateway) -> None:
    async with connect(gateway.port) as conn:
        for bad in BAD_BODIES:
            data = bad.body if isinstance(bad.body, bytes) else json.dumps(bad.body).encode()
            reply = await conn.ask(post(bad.path, data), f"the 400 of {data[:40]!r} on {bad.path}")
            check_error(
                reply,
                "HTTP/1.1 400 Bad Request",
                bad.message,
                param=bad.param,
                code=bad.code,
                prefix=not bad.whole,
            )
            # Keep-alive after the error: the next request on the same connection is answered.
            check_completion(await conn.ask(post("/v1/completions", completion("fine"))), "fine")


# ---------------------------------------------------------------------------- 12. a graceful stop


async def test_a_stop_lets_the_request_in_flight_finish(gateway: Gateway) -> None:
    replica = gateway.replica(SLOW)
    prompt = words(25)  # half a second of words
    async with serving(gateway.nats_url, gateway.prefix, drain_timeout=10) as (listener, stop):
        port = listener.port
        async with connect(port) as busy, connect(port) as idle:
            check_completion(await idle.ask(post("/v1/completions", completion("idle"))), "idle")
            await busy.send(
                post("/v1/completions", completion(prompt, SLOW), headers=[("X-Request-Id", "in-flight")])
            )

            async def in_flight() -> bool:
                return "in-flight" in replica.flights

            await eventually(in_flight, "the slow request to reach the replica", timeout=TIMEOUT)
            stop.set()
            reply = await busy.reply("the reply of the request in flight")
            check_completion(reply, prompt, model=SLOW, close=True)
            assert reply.header("x-request-id") == "in-flight"
            await busy.closed_by_server()
            # The connection that had nothing in flight is closed.
            await idle.closed_by_server()
    # Stopped: the port takes no connection any more.
    with pytest.raises(ConnectionRefusedError):
        await within(asyncio.open_connection("127.0.0.1", port), "the refused connection")


# ---------------------------------------------------------------------------- 13. many connections


async def test_64_connections_at_once_are_all_answered(gateway: Gateway) -> None:
    async def one(c: int) -> None:
        async with connect(gateway.port) as conn:
            for i in range(4):
                if i % 2:
                    check_chat(await conn.ask(post("/v1/chat/completions", chat(f"c{c} r{i}"))), f"c{c} r{i}")
                else:
                    reply = await conn.ask(
                        post(
                            "/v1/completions",
                            completion(f"c{c} r{i}"),
                            headers=[("X-Request-Id", f"m-{c}-{i}")],
                        )
                    )
                    check_completion(reply, f"c{c} r{i}")
                    assert reply.header("x-request-id") == f"m-{c}-{i}"

    await within(asyncio.gather(*(one(c) for c in range(64))), "64 connections of 4 requests each", 30)
