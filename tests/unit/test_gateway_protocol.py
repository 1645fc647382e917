"""The gateway's HTTP protocol (natserve/gateway/protocol.py) on a real uvicorn server, read from
a raw socket: a POST to one of the app's ``hot`` paths runs on the lean cycle, everything else on
uvicorn's; on either, keep-alive, bodies in parts, chunked streams, 100 Continue, pipelining,
empty answers and failing apps behave as with uvicorn's own protocol, and a response with a
Content-Length on the lean cycle leaves in one write."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from natserve.gateway.protocol import GatewayHttpProtocol, HotCycle
from natserve.gateway.server import _server_class, bind_listener
from tests.support.waits import within


class _Recorder:
    """The connection's transport, counting the writes."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


WRITES: list[bytes] = []
# The class of each request's cycle (its ``send`` is the cycle's bound method).
CYCLES: list[type] = []


class _Recording(GatewayHttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _Recorder(transport, WRITES)  # type: ignore[assignment]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    CYCLES.append(type(send.__self__))
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if path == "/json":
        data = b'{"echo": "' + body + b'"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))],
            }
        )
        await send({"type": "http.response.body", "body": data})
    elif path == "/parts":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"6")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def"})
    elif path == "/stream":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for part in (b"one", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/nothing":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/broken-after-head":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        raise RuntimeError("the app fails after its head")
    elif path == "/broken":
        raise RuntimeError("the app fails before answering")
    elif path == "/close":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"2"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/silent":
        return
    elif path == "/until-gone":
        # A stream that runs until the client leaves: what the endpoint's receive says then.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        GONE.put_nowait(await receive())
    else:
        raise AssertionError(f"no route {path}")


# What /until-gone's receive said once the client left (a queue of the test's loop, per test).
GONE: asyncio.Queue[Any] = asyncio.Queue()
PATHS = (
    "/json",
    "/parts",
    "/stream",
    "/nothing",
    "/broken-after-head",
    "/broken",
    "/close",
    "/silent",
    "/until-gone",
)


class _App:
    """An app whose ``hot`` paths the protocol serves on its lean cycle (as ``GatewayApp``'s)."""

    hot = {path: _app for path in PATHS}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _app(scope, receive, send)


KEEP_ALIVE_S = 1


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _App(),
        http=_Recording,
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    served = _server_class()(config)
    task = asyncio.create_task(served.serve(sockets=[sock]))
    await within(served.serving.wait(), "the uvicorn server to start")
    global GONE
    WRITES.clear()
    CYCLES.clear()
    GONE = asyncio.Queue()
    try:
        yield "127.0.0.1", port
    finally:
        served.should_exit = True
        await within(task, "the uvicorn server to stop")
        sock.close()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        return await within(self._response(method), f"the answer to {method} {path}")

    async def _response(self, method: str) -> tuple[int, dict[str, str], bytes]:
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        headers = {k.lower(): v for k, v in headers.items()}
        if method == "HEAD" or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]

    async def closed(self) -> bool:
        return await within(self.reader.read(1), "the server to close the connection") == b""

    def close(self) -> None:
        self.writer.close()


async def _connect(address: tuple[str, int]) -> _Connection:
    reader, writer = await asyncio.open_connection(*address, family=socket.AF_INET)
    return _Connection(reader, writer)


async def test_a_post_to_a_hot_path_runs_on_the_lean_cycle_and_the_rest_on_uvicorns(
    server: tuple[str, int],
) -> None:
    conn = await _connect(server)
    try:
        assert (await conn.request("POST", "/json", b"a"))[2] == b'{"echo": "a"}'
        assert (await conn.request("GET", "/json", b"b"))[2] == b'{"echo": "b"}'
        assert (await conn.request("POST", "/json?x=1", b"c"))[2] == b'{"echo": "c"}'
    finally:
        conn.close()
    assert CYCLES == [HotCycle, RequestResponseCycle, HotCycle]


async def test_a_response_with_a_length_is_one_write_and_keeps_the_connection(
    server: tuple[str, int],
) -> None:
    conn = await _connect(server)
    try:
        for n in range(3):
            WRITES.clear()
            status, headers, body = await conn.request("POST", "/json", b"hi%d" % n)
            assert (status, body) == (200, b'{"echo": "hi%d"}' % n)
            assert headers["content-type"] == "application/json"
            assert "date" in headers, "uvicorn's default headers go out too"
            assert "connection" not in headers
            assert len(WRITES) == 1, WRITES
            assert WRITES[0].startswith(b"HTTP/1.1 200 OK\r\n") and WRITES[0].endswith(body)
    finally:
        conn.close()
    assert CYCLES == [HotCycle] * 3


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_body_in_parts_goes_out_whole(server: tuple[str, int], method: str) -> None:
    conn = await _connect(server)
    try:
        assert (await conn.request(method, "/parts"))[2] == b"abcdef"
        if method == "POST":
            # The head rides with the first part; the second is a write of its own.
            assert len(WRITES) == 2 and WRITES[0].endswith(b"\r\n\r\nabc") and WRITES[1] == b"def", WRITES
        assert (await conn.request("POST", "/json", b"again"))[2] == b'{"echo": "again"}'
    finally:
        conn.close()


async def test_a_request_body_in_chunks_reaches_the_endpoint_whole(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        conn.writer.write(b"POST /json HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"one", b"-two", b"-three"):
            conn.writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await conn.writer.drain()
        conn.writer.write(b"0\r\n\r\n")
        status, _, body = await within(conn._response("POST"), "the answer to a chunked body")
        assert (status, body) == (200, b'{"echo": "one-two-three"}')
    finally:
        conn.close()
    assert CYCLES == [HotCycle]


async def test_a_client_that_waits_for_100_continue_gets_it_then_the_answer(
    server: tuple[str, int],
) -> None:
    conn = await _connect(server)
    try:
        conn.writer.write(
            b"POST /json HTTP/1.1\r\nhost: test\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
        interim = await within(conn.reader.readuntil(b"\r\n\r\n"), "the 100 Continue")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.writer.write(b"body")
        status, _, body = await within(conn._response("POST"), "the answer after the body")
        assert (status, body) == (200, b'{"echo": "body"}')
    finally:
        conn.close()


async def test_head_answers_the_head_alone(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        status, headers, _ = await conn.request("HEAD", "/json")
        assert status == 200 and headers["content-length"] == str(len(b'{"echo": ""}'))
        # Nothing of a body followed: the next answer on the connection reads right.
        assert (await conn.request("POST", "/json", b"x"))[2] == b'{"echo": "x"}'
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_stream_sends_its_head_at_once_and_chunks(server: tuple[str, int], method: str) -> None:
    conn = await _connect(server)
    try:
        status, headers, body = await conn.request(method, "/stream")
        assert (status, body) == (200, b"onetwo")
        assert headers["transfer-encoding"] == "chunked"
        assert WRITES[0].endswith(b"\r\n\r\n"), "the head of a stream goes out on its own, first"
        assert (await conn.request("POST", "/json", b"y"))[2] == b'{"echo": "y"}'
    finally:
        conn.close()


async def test_a_client_that_leaves_mid_stream_is_an_http_disconnect(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    conn.writer.write(b"POST /until-gone HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n")
    await within(conn.reader.readuntil(b"first\r\n"), "the stream's first chunk")
    conn.close()
    heard = await within(GONE.get(), "the endpoint to hear that the client left")
    assert heard == {"type": "http.disconnect"}


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_an_empty_answer_and_connection_close(server: tuple[str, int], method: str) -> None:
    conn = await _connect(server)
    try:
        assert (await conn.request(method, "/nothing"))[0] == 204
        status, headers, body = await conn.request(method, "/close")
        assert (status, body, headers["connection"]) == (200, b"ok", "close")
        assert await conn.closed()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("path", ["/broken", "/silent"])
async def test_an_app_that_fails_or_says_nothing_gets_uvicorns_500(
    server: tuple[str, int], method: str, path: str
) -> None:
    conn = await _connect(server)
    try:
        status, headers, body = await conn.request(method, path)
        assert (status, body, headers["connection"]) == (500, b"Internal Server Error", "close")
        assert await conn.closed()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_an_app_that_fails_after_its_head_closes_the_connection(
    server: tuple[str, int], method: str
) -> None:
    conn = await _connect(server)
    try:
        conn.writer.write(b"%s /broken-after-head HTTP/1.1\r\nhost: test\r\n\r\n" % method.encode())
        if method == "POST":
            # The held head never went out: the connection just closes.
            assert await conn.closed()
        else:
            await within(conn.reader.readuntil(b"\r\n\r\n"), "uvicorn's head")
            assert await conn.closed()
    finally:
        conn.close()


async def test_pipelined_requests_are_answered_in_order(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        conn.writer.write(
            b"".join(
                b"POST /json HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\n\r\np%d" % n for n in range(3)
            )
        )
        for n in range(3):
            status, _, body = await within(conn._response("POST"), f"pipelined answer {n}")
            assert (status, body) == (200, b'{"echo": "p%d"}' % n)
        assert (await conn.request("POST", "/json", b"after"))[2] == b'{"echo": "after"}'
    finally:
        conn.close()
    # Those behind one still answering wait in uvicorn's queue, on uvicorn's cycle.
    assert CYCLES[0] is HotCycle and CYCLES[-1] is HotCycle
    assert RequestResponseCycle in CYCLES[1:3]


async def test_http_1_0_is_answered_and_closed(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        conn.writer.write(b"POST /json HTTP/1.0\r\ncontent-length: 3\r\n\r\nold")
        status, headers, body = await within(conn._response("POST"), "the HTTP/1.0 answer")
        assert (status, body, headers["connection"]) == (200, b'{"echo": "old"}', "close")
        assert await conn.closed()
    finally:
        conn.close()
    assert CYCLES == [HotCycle]


async def test_an_idle_connection_closes_after_the_keep_alive_timeout_from_its_last_answer(
    server: tuple[str, int],
) -> None:
    loop = asyncio.get_running_loop()
    conn = await _connect(server)
    try:
        await conn.request("POST", "/json", b"1")
        # Idle for 0.6 of the timeout (the pause is the behaviour under test, not a wait for
        # something): the timer armed at the first answer must not close the connection.
        await asyncio.sleep(0.6 * KEEP_ALIVE_S)
        await conn.request("POST", "/json", b"2")
        answered = loop.time()
        assert await conn.closed()
        idle = loop.time() - answered
    finally:
        conn.close()
    assert 0.9 * KEEP_ALIVE_S <= idle <= KEEP_ALIVE_S + 2, idle
