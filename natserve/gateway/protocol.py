"""uvicorn's httptools protocol, with the inference routes' requests on a lean cycle of their own.

uvicorn serves the gateway: it accepts the connections, parses every request (httptools), keeps
connections alive and requests in order, refuses garbage, and drains on shutdown. Every request
it parses becomes an ASGI cycle: uvicorn's ``RequestResponseCycle``, for the Starlette app and
all its routes. A ``POST`` to one of the three inference routes, the only ones called thousands
of times a second, becomes a :class:`HotCycle` instead: the same ASGI endpoint
(``app._Inference``) over a lean ``receive`` and ``send``.

What the lean cycle leaves out, per request: uvicorn's cycle and its ``run_asgi`` wrapper, the URL
parse, and the header checks of each response (two regular expressions a header: the gateway's
own endpoints make every header it sends, and the one value from a caller, ``X-Request-Id``, is
checked before it is echoed). A head with a ``Content-Length`` waits for its body and goes out
with it, in one ``write``. On the AMD machine of 2026-12-04 (``bench/gateway.py``, C = 256, the
code before and after it alternating) the gateway process cost 10-16 us less a request, 15-20 %
of its CPU (docs/benchmarks.md, "Issue 14: the lean cycle").

What stays uvicorn's: everything outside one request's ``receive`` and ``send``. The cycle has the
attributes uvicorn's protocol reads and writes of a cycle (``body``, ``more_body``,
``message_event``, ``response_complete``, ``disconnected``, ``keep_alive``), so uvicorn's own
``on_body``, ``on_message_complete``, ``connection_lost``, ``shutdown`` and pipelining drive it
unchanged, and a finished response calls the protocol's ``on_response_complete`` (the next
pipelined request, or the keep-alive below). A request the lean cycle does not take goes to
uvicorn as it is: any other method or path, a request pipelined behind one still answering, an
upgrade, a server with a ``root_path`` or a concurrency limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = ["GatewayHttpProtocol", "HotCycle"]

logger = logging.getLogger("uvicorn.error")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_SERVER_ERROR = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"21"),
    (b"connection", b"close"),
]


def _nothing() -> None:
    pass


class HotCycle:
    """One request to an inference route: the ASGI ``receive`` and ``send`` of its endpoint.

    It holds what uvicorn's protocol reads and writes of a cycle under the same names, and
    answers as uvicorn's cycle does: 100 Continue when the client waits for it, a body in parts
    (``more_body``) while it comes, ``http.disconnect`` once the client is gone or the response
    is complete; a head with a ``Content-Length`` goes out with the body, a head without one
    (an event stream) at once, in chunked encoding; a 500 when the endpoint fails before it
    started its response, a closed connection when it fails after.
    """

    __slots__ = (
        "body",
        "chunked",
        "default_headers",
        "disconnected",
        "expected",
        "flow",
        "head",
        "keep_alive",
        "message_event",
        "more_body",
        "on_response",
        "response_complete",
        "response_started",
        "scope",
        "transport",
        "waiting_for_100_continue",
    )

    def __init__(self, protocol: HttpToolsProtocol, scope: Any, *, keep_alive: bool) -> None:
        self.scope = scope
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.default_headers = protocol.server_state.default_headers
        self.on_response = protocol.on_response_complete
        self.message_event = asyncio.Event()
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.disconnected = False
        # Bytes, not uvicorn's bytearray: uvicorn's on_body adds each part (``+=``), and a body
        # in one part is then the parser's own bytes object, handed on without a copy.
        self.body = b""
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.expected = 0
        self.head: bytes | None = None

    async def run_asgi(self, app: Any) -> None:
        """uvicorn's name for running the endpoint (``HttpToolsProtocol._start_asgi_task``)."""
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                logger.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": _SERVER_ERROR})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    async def receive(self) -> dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            # Set by uvicorn's on_body and on_message_complete: a body that came with its head
            # (every small request) is here before the endpoint first asks.
            event = self.message_event
            if not event.is_set():
                await event.wait()
            event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": self.body, "more_body": self.more_body}
        self.body = b""
        return message

    async def send(self, message: Mapping[str, Any]) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got {kind!r}.")
            self.response_started = True
            self.waiting_for_100_continue = False
            head = self._head(message["status"], message.get("headers", ()))
            if self.chunked:
                self.transport.write(head)  # a stream: the client wants its head before the first event
            else:
                self.head = head
            return
        if self.response_complete or kind != "http.response.body":
            raise RuntimeError(f"Unexpected ASGI message {kind!r} sent, after response already completed.")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += _LAST_CHUNK
        else:
            self.expected -= len(body)
            if self.expected < 0:
                raise RuntimeError("Response content longer than Content-Length")
            data = body
        if self.head is not None:
            data = self.head + data
            self.head = None
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The status line and headers (uvicorn's default ones first: ``date``), noting the
        length, chunking and ``connection: close`` as uvicorn's cycle does."""
        content = [STATUS_LINE[status]]
        close = False
        length = None
        # Lower-case names, as ASGI asks and the hot endpoints send; uvicorn's default ones are too.
        for name, value in (*self.default_headers, *headers):
            if name == b"content-length" and length is None:
                length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                close = True
            content += (name, b": ", value, b"\r\n")
        if length is not None:
            self.expected = length
        elif status not in (204, 304):
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        return b"".join(content)


class GatewayHttpProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=GatewayHttpProtocol)``: a ``POST`` to one of the app's inference
    routes (``config.app.hot``, path to ASGI endpoint) runs on a :class:`HotCycle`."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        hot: Mapping[str, Any] = getattr(config.app, "hot", None) or {}
        # A root path or a concurrency limit: uvicorn's own handling for every request.
        usable = not config.root_path and self.limit_concurrency is None
        self.hot = {path.encode("ascii"): endpoint for path, endpoint in hot.items()} if usable else {}

    # ------------------------------------------------------------------ keep-alive
    #
    # uvicorn arms a keep-alive timer at the end of every response and cancels it at the next
    # request's first bytes: a timer made and one cancelled a request, about 3 % of the gateway
    # process's samples at C = 256 on uvloop (py-spy --native, ``UVTimer_new`` and
    # ``TimerHandle.__cinit__``). Here a connection has at most one timer armed: a response's end
    # notes when the connection fell idle (arming the timer if none is), a request's first bytes
    # note it busy, and the timer, when it fires, closes a connection idle for
    # ``timeout_keep_alive`` or waits out the rest. A connection still closes after the same idle
    # time, up to a timer's lateness.

    _idle_since: float | None = None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        # uvicorn's, with the idle stretch noted rather than a timer armed.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self._keep_alive_due
                )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy: the end of its response arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    # ------------------------------------------------------------------ the inference routes

    def on_headers_complete(self) -> None:
        path, _, query = self.url.partition(b"?")
        endpoint = self.hot.get(path)
        parser = self.parser
        if (
            endpoint is None
            or parser.get_method() != b"POST"
            or parser.should_upgrade()
            or (self.cycle is not None and not self.cycle.response_complete)
        ):
            super().on_headers_complete()
            return
        scope = self.scope
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["method"] = "POST"
        scope["path"] = path.decode("ascii")  # one of the app's own paths: plain ASCII
        scope["raw_path"] = path
        scope["query_string"] = query
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        self.cycle = HotCycle(self, scope, keep_alive=keep_alive)  # type: ignore[assignment]
        self._start_asgi_task(self.cycle, endpoint)  # type: ignore[arg-type]
