"""The gateway's HTTP protocol (natserve/gateway/protocol.py) on a real uvicorn server, read from
a raw socket: a response with a Content-Length leaves in one write, and keep-alive, HEAD,
chunked streams, empty answers and failing apps behave as with uvicorn's own protocol."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from natserve.gateway.protocol import OneWriteHttpToolsProtocol, _OneWriteCycle
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
# The class of each /json request's cycle (its ``send`` is the cycle's bound method).
CYCLES: list[type] = []


class _Recording(OneWriteHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _Recorder(transport, WRITES)  # type: ignore[assignment]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    message = await receive()
    body = message.get("body", b"")
    if path == "/json":
        CYCLES.append(type(send.__self__))
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
    else:
        raise AssertionError(f"no route {path}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app, http=_Recording, lifespan="off", access_log=False, log_config=None, server_header=False
    )
    served = _server_class()(config)
    task = asyncio.create_task(served.serve(sockets=[sock]))
    await within(served.serving.wait(), "the uvicorn server to start")
    WRITES.clear()
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
            assert "connection" not in headers
            assert len(WRITES) == 1, WRITES
            assert WRITES[0].startswith(b"HTTP/1.1 200 OK\r\n") and WRITES[0].endswith(body)
    finally:
        conn.close()


async def test_each_cycle_is_made_as_a_one_write_cycle_and_uvicorn_is_left_as_it_was(
    server: tuple[str, int],
) -> None:
    conn = await _connect(server)
    CYCLES.clear()
    try:
        for n in range(2):
            assert (await conn.request("POST", "/json", b"c%d" % n))[0] == 200
    finally:
        conn.close()
    # Made as ours, not turned into ours (which slows every attribute access on it).
    assert CYCLES == [_OneWriteCycle, _OneWriteCycle]
    assert httptools_impl.RequestResponseCycle is RequestResponseCycle


async def test_a_body_in_parts_goes_out_whole(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        assert (await conn.request("GET", "/parts"))[2] == b"abcdef"
        # The head rides with the first part; the second is a write of its own.
        assert len(WRITES) == 2 and WRITES[0].endswith(b"\r\n\r\nabc") and WRITES[1] == b"def", WRITES
        assert (await conn.request("POST", "/json", b"again"))[2] == b'{"echo": "again"}'
    finally:
        conn.close()


async def test_head_answers_the_head_alone(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        status, headers, _ = await conn.request("HEAD", "/json")
        assert status == 200 and headers["content-length"] == str(len(b'{"echo": ""}'))
        assert len(WRITES) == 1 and WRITES[0].endswith(b"\r\n\r\n"), WRITES
        # Nothing of a body followed: the next answer on the connection reads right.
        assert (await conn.request("POST", "/json", b"x"))[2] == b'{"echo": "x"}'
    finally:
        conn.close()


async def test_a_stream_sends_its_head_at_once_and_chunks(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        status, headers, body = await conn.request("GET", "/stream")
        assert (status, body) == (200, b"onetwo")
        assert headers["transfer-encoding"] == "chunked"
        assert WRITES[0].endswith(b"\r\n\r\n"), "the head of a stream goes out on its own, first"
        assert (await conn.request("POST", "/json", b"y"))[2] == b'{"echo": "y"}'
    finally:
        conn.close()


async def test_an_empty_answer_and_connection_close(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        assert (await conn.request("GET", "/nothing"))[0] == 204
        status, headers, body = await conn.request("GET", "/close")
        assert (status, body, headers["connection"]) == (200, b"ok", "close")
        assert await conn.closed()
    finally:
        conn.close()


async def test_a_failing_app_gets_uvicorns_500_or_a_closed_connection(server: tuple[str, int]) -> None:
    conn = await _connect(server)
    try:
        status, _, body = await conn.request("GET", "/broken")
        assert (status, body) == (500, b"Internal Server Error")
        assert await conn.closed()
    finally:
        conn.close()
    conn = await _connect(server)
    try:
        conn.writer.write(b"GET /broken-after-head HTTP/1.1\r\nhost: test\r\n\r\n")
        # The held head never went out: the connection just closes.
        assert await conn.closed()
    finally:
        conn.close()
