"""A minimal HTTP/1.1 load client for the benchmarks: keep-alive connections, one request in
flight on each, responses with a ``Content-Length``.

The HTTP benchmarks measure the server, so the client must cost as little as the direct NATS
client does: httpx and aiohttp spend 100-300 us of Python per request, which on a 2-core machine
would take turns from the server under test. This one parses only the status line and the
``Content-Length`` header (about 10 us a request).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

__all__ = ["HttpConnection", "HttpError", "connect"]


class HttpError(Exception):
    """A response that is not a 200, or a connection that closed mid-response."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = exc or HttpError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.closed)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            waiter.set_exception(HttpError(f"response without a Content-Length: {head[:200]!r}"))
            return
        end = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : end if end > 0 else None])
        total = head_end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[head_end + 4 : total])
        del self.buffer[:total]
        waiter.set_result((status, body))


class HttpConnection:
    """One keep-alive connection to ``host:port``; ``post_json`` and ``get`` one at a time."""

    def __init__(self, protocol: _Protocol, host: str, port: int, headers: dict[str, str]) -> None:
        self._protocol = protocol
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._host = f"Host: {host}:{port}\r\n{extra}".encode()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        protocol = self._protocol
        if protocol.closed is not None:
            raise HttpError(f"connection closed: {protocol.closed!r}")
        assert protocol.transport is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._host
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        protocol.waiter = asyncio.get_running_loop().create_future()
        protocol.transport.write(head + b"\r\n" + body)
        return await protocol.waiter

    async def post_json(self, path: str, payload: bytes) -> Any:
        status, body = await self.request("POST", path, payload)
        if status != 200:
            raise HttpError(f"POST {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()


async def connect(host: str, port: int, headers: dict[str, str] | None = None) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Protocol, host, port)
    return HttpConnection(protocol, host, port, headers or {})
