"""``MemoryTransport``: a client transport whose services are handlers in the same process.

For tests of code that uses the client, with no server (as httpx's ``MockTransport``)::

    async def generate(request: MemoryRequest) -> dict[str, Any]:
        return {"choices": [{"text": request.body["prompt"].upper()}]}

    transport = MemoryTransport({"natserve.model.m1.generate": generate})
    client = AsyncClient(transport=transport)

A handler gets a :class:`MemoryRequest` and answers by what it returns, or by the
``Responder``-like calls on the request for finer control:

- a value: the reply (``None``: no reply, unless the handler sent one itself);
- an iterator or async iterator (a generator function as handler): a stream, each item a chunk,
  then the empty end; an exception raised while iterating is an error mid-stream;
- an exception raised: the error reply, with its wire code (a ``NatserveError``) or as a 500.

Subjects are matched as NATS does (``*`` one token, ``>`` the rest); a request nobody routes
gets "no responders". Replies travel as encoded messages and are read by the same wire rules as
over NATS (``_multiplexer``, ``broker_client.wire``), so errors, parts, stream order and malformed replies
behave as they would over the network. ``requests`` and ``published`` record what was sent.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from . import codec
from ._client_transport import EventHandler
from ._errors import BadRequest, TransportError
from ._multiplexer import Multiplexer
from .wire import (
    ACCEPTED_HEADER,
    HEADER_ROOM,
    SEQ_HEADER,
    STATUS_HEADER,
    as_service_error,
    error_headers,
    split_parts,
)

__all__ = ["MemoryHandler", "MemoryRequest", "MemoryTransport"]

logger = logging.getLogger(__name__)

MemoryHandler = Callable[["MemoryRequest"], Any]


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches ``pattern`` with NATS wildcards (``*``, a final ``>``)."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


class _Message:
    """A message as the multiplexer reads it."""

    __slots__ = ("data", "headers", "subject")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers


class MemoryRequest:
    """One request a :class:`MemoryTransport` handler answers.

    ``body`` is decoded (``{}`` for an empty one), ``data`` and ``headers`` are as sent. The
    answering calls mirror the service side's ``Responder``; a published message (a cancel)
    has no reply subject, and its answers go nowhere.
    """

    def __init__(
        self,
        transport: MemoryTransport,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        reply: str | None,
    ) -> None:
        self.transport = transport
        self.subject = subject
        self.data = data
        self.headers: dict[str, str] = dict(headers or {})
        self.reply = reply
        self.content_type = codec.detect(data, headers)
        self.body: Any = codec.decode(data, self.content_type)
        self.streamed = 0
        self.replied = False
        # What went to the reply subject: (data, headers) per message.
        self.sent: list[tuple[bytes, dict[str, str]]] = []

    def __repr__(self) -> str:
        return f"<MemoryRequest {self.subject!r} {self.body!r}>"

    async def send(self, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Send one raw message to the reply subject, as it is (for malformed replies)."""
        if self.reply is not None:
            self.replied = True
            self.sent.append((data, dict(headers or {})))
            await self.transport._on_reply(_Message(self.reply, data, dict(headers) if headers else None))

    async def respond(self, obj: Any) -> None:
        """Reply with ``obj`` in the request's encoding (in parts when it is too large)."""
        data = codec.encode(obj, self.content_type)
        limit = self.transport.max_payload
        if len(data) <= limit - HEADER_ROOM:
            await self.send(data)
            return
        for part, headers in split_parts(data, limit, self.content_type):
            await self.send(part, headers)

    async def accept(self, worker_id: str) -> None:
        """Say which worker took the request (``Natserve-Accepted``), as a worker's ack."""
        await self.send(b"", {ACCEPTED_HEADER: worker_id})

    async def chunk(self, obj: Any) -> None:
        """Stream one chunk."""
        self.streamed += 1
        headers = {codec.CONTENT_TYPE: self.content_type, SEQ_HEADER: str(self.streamed)}
        await self.send(codec.encode(obj, self.content_type), headers)

    async def end_stream(self) -> None:
        await self.send(b"")

    async def error(self, exc: BaseException) -> None:
        """Answer with the error ``exc`` maps to on the wire."""
        err = as_service_error(exc, self.subject)
        headers = error_headers(err, self.content_type, self.streamed)
        await self.send(codec.encode(err.to_wire(), self.content_type), headers)


class _MemorySubscription:
    __slots__ = ("_entry", "_transport")

    def __init__(self, transport: MemoryTransport, entry: tuple[str, EventHandler]) -> None:
        self._transport = transport
        self._entry = entry

    async def close(self) -> None:
        subscriptions = self._transport._subscriptions
        if self._entry in subscriptions:
            subscriptions.remove(self._entry)


class MemoryTransport(Multiplexer):
    """A client transport answered by handlers per subject, in this process (see the module)."""

    def __init__(
        self,
        routes: Mapping[str, MemoryHandler] | None = None,
        *,
        encoding: str = codec.MSGPACK,
        max_payload: int = 1024 * 1024,
    ) -> None:
        super().__init__("_MEMORY", self, encoding=encoding)
        self.max_payload = max_payload
        self.routes: dict[str, MemoryHandler] = dict(routes or {})
        # Every request and every published message, in order.
        self.requests: list[MemoryRequest] = []
        self.published: list[MemoryRequest] = []
        self._subscriptions: list[tuple[str, EventHandler]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def route(self, subject: str, handler: MemoryHandler) -> None:
        """Answer requests on ``subject`` (wildcards allowed) with ``handler``."""
        self.routes[subject] = handler

    def _handler_for(self, subject: str) -> MemoryHandler | None:
        handler = self.routes.get(subject)
        if handler is not None:
            return handler
        for pattern, candidate in self.routes.items():
            if subject_matches(pattern, subject):
                return candidate
        return None

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        if self._closed:
            raise TransportError("this memory transport is closed")

    async def close(self) -> None:
        """Stop: the handlers still running are cancelled."""
        self._closed = True
        await super().close()
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, subject: str, token: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        if self._closed:
            raise TransportError(f"this memory transport is closed; cannot send to {subject!r}")
        reply = f"{self._prefix}.{token}"
        handler = self._handler_for(subject)
        if handler is None:
            # What a NATS server answers when nobody subscribes.
            await self._on_reply(_Message(reply, b"", {STATUS_HEADER: "503"}))
            return
        try:
            request = MemoryRequest(self, subject, data, hdrs, reply)
        except BadRequest as exc:
            # A body the transport itself encoded always decodes; raw bytes may not.
            raise TransportError(
                f"memory transport: the request to {subject!r} does not decode: {exc}"
            ) from exc
        self.requests.append(request)
        self._spawn(self._serve(handler, request))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, handler: MemoryHandler, request: MemoryRequest) -> None:
        """Run ``handler`` as a service would: its result, stream or error becomes the reply."""
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, AsyncIterator):
                async for item in result:
                    await request.chunk(item)
                await request.end_stream()
            elif isinstance(result, Iterator):
                for item in result:
                    await request.chunk(item)
                await request.end_stream()
            elif result is not None:
                await request.respond(result)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await request.error(exc)
            if request.streamed:
                await request.end_stream()

    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """A message nobody answers: recorded, given to a route's handler (its answers go
        nowhere) and to the subscriptions that match."""
        if self._closed:
            raise TransportError(f"this memory transport is closed; cannot publish to {subject!r}")
        data, hdrs = self._encode(payload, headers)
        message = MemoryRequest(self, subject, data, hdrs, None)
        self.published.append(message)
        handler = self._handler_for(subject)
        if handler is not None:
            self._spawn(self._serve(handler, message))
        await self._deliver_event(subject, data, hdrs)

    async def emit(self, subject: str, body: Any) -> None:
        """Publish an event, as a service would, to the subscriptions that match ``subject``."""
        data, hdrs = self._encode(body, None)
        await self._deliver_event(subject, data, hdrs)

    async def _deliver_event(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        for pattern, handler in list(self._subscriptions):
            if subject_matches(pattern, subject):
                decoded, body = self._event_body(subject, data, headers)
                if decoded:
                    try:
                        await handler(subject, body)
                    except Exception:
                        logger.exception("event handler for %s failed", subject)

    async def subscribe(self, subject: str, handler: EventHandler) -> _MemorySubscription:
        entry = (subject, handler)
        self._subscriptions.append(entry)
        return _MemorySubscription(self, entry)
