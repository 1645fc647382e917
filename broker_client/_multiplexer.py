"""The client's request multiplexer: every request of a transport answered on one inbox.

Each request gets a token under the transport's inbox prefix; the replies that come back on
``<prefix>.<token>`` go to its queue, so a reply may be one message, several parts of a large
payload, or a stream of chunks ended by an empty message, and every wait is bounded by the
call's timeout. Sending is the subclass's (``NatsTransport`` over NATS, ``MemoryTransport`` in
process); what comes back is read by the wire rules (``wire``) here, once for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from . import codec
from ._client_transport import EventHandler, EventSubscription, FailureFactory
from ._errors import (
    BadRequest,
    NatserveError,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    TransportError,
)
from ._keepalive import ack_body
from ._keepalive import parse_header as parse_keepalive
from .wire import (
    ACCEPTED_HEADER,
    KEEPALIVE_HEADER,
    PARTS_HEADER,
    WireMessage,
    join_parts,
    malformed,
    part_index,
    parts_total,
    raise_for_error,
    stream_message,
)

__all__ = ["Multiplexer"]

logger = logging.getLogger(__name__)

# How often a multiplexer looks for requests past their timeout (see Multiplexer._next).
_SWEEP = 0.05


class _Sized(Protocol):
    @property
    def max_payload(self) -> int: ...


class _Failure:
    """Put in a request's queue to end it with an error (its worker died, the connection
    dropped): the waiting call raises ``make()``, a fresh exception per request."""

    __slots__ = ("make",)

    def __init__(self, make: FailureFactory) -> None:
        self.make = make


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Pending:
    """The messages of one in-flight request, fed by the shared inbox.

    A deque and at most one waiting future rather than an ``asyncio.Queue`` and
    ``asyncio.timeout``: both cost more than the rest of a small request's bookkeeping.
    """

    __slots__ = ("deadline", "items", "on_accept", "waiter", "worker_id")

    def __init__(self, worker_id: str | None = None) -> None:
        self.items: deque[WireMessage | _Failure] = deque()
        self.waiter: asyncio.Future[None] | None = None
        # When the current wait ends (time.monotonic()), for the multiplexer's sweep.
        self.deadline = float("inf")
        # The worker that accepted it (Natserve-Accepted), or the one it was sent to.
        self.worker_id = worker_id
        self.on_accept: Callable[[str], None] | None = None

    def put(self, item: WireMessage | _Failure) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float | None, loop: asyncio.AbstractEventLoop) -> WireMessage | _Failure:
        """The next item; TimeoutError when none comes within ``timeout`` seconds (``None``:
        no timer of its own, the multiplexer's sweep ends the wait at ``deadline``). ``loop``:
        the running one, which the multiplexer keeps (``Multiplexer._running_loop``)."""
        if not self.items:
            self.waiter = waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self.waiter = None
        return self.items.popleft()


class Multiplexer(ABC):
    """Requests and streams answered on one inbox prefix; a subclass sends them.

    ``_sizer`` says the largest message the other end takes (the NATS connection's
    ``max_payload``: read where it is, as it may change with the server after a reconnect).
    """

    def __init__(self, prefix: str, sizer: _Sized, *, encoding: str = codec.MSGPACK) -> None:
        self.encoding = encoding
        self._prefix = prefix
        self._sizer = sizer
        self._pending: dict[str, _Pending] = {}
        self._counter = 0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of the transport's requests, looked up once: a transport serves the
        one loop its connection lives on. On Python 3.11 ``asyncio.get_running_loop()`` calls
        ``getpid()``, a syscall: 6 % of the gateway's samples at C = 256 (py-spy,
        bench/gateway.py), made once per request that waits for its reply."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # ------------------------------------------------------------------ what a subclass adds

    @property
    @abstractmethod
    def is_closed(self) -> bool:
        """Whether the connection underneath is closed for good."""

    @abstractmethod
    async def start(self) -> None:
        """Start taking replies on ``<prefix>.*`` (into :meth:`_on_reply`)."""

    @abstractmethod
    async def _send(self, subject: str, token: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        """Send a request whose replies go to ``<prefix>.<token>``."""

    @abstractmethod
    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """Send a message nobody answers."""

    @abstractmethod
    async def subscribe(self, subject: str, handler: EventHandler) -> EventSubscription:
        """Deliver the events on ``subject`` to ``handler`` (see :meth:`_event_body`)."""

    async def close(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    # ------------------------------------------------------------------ replies in

    async def _on_reply(self, msg: WireMessage) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        pending = self._pending.get(token)
        if pending is None:
            return
        headers = msg.headers
        if headers and ACCEPTED_HEADER in headers:
            # On its own empty message, or on a stream's first chunk.
            pending.worker_id = headers[ACCEPTED_HEADER]
            if pending.on_accept is not None:
                try:
                    pending.on_accept(pending.worker_id)
                except Exception:
                    logger.exception("on_accept callback failed")
            if not msg.data:
                return
        pending.put(msg)

    @staticmethod
    def _event_body(subject: str, data: bytes, headers: Mapping[str, str] | None) -> tuple[bool, Any]:
        """An event's decoded body, and whether it decoded (one that does not is dropped)."""
        try:
            return True, codec.decode(data, codec.detect(data, headers))
        except NatserveError as exc:
            logger.debug("ignoring an event on %s that does not decode: %s", subject, exc)
            return False, None

    async def _acknowledge(self, subject: str, token: str, received: int) -> None:
        """Tell the replica of a keepalive stream that ``received`` chunks were taken."""
        try:
            await self.publish(subject, ack_body(f"{self._prefix}.{token}", received))
        except Exception as exc:  # a lost ack costs at worst the stream; never the consumer
            logger.debug("could not acknowledge %d chunks on %s: %r", received, subject, exc)

    def _open(self, worker_id: str | None = None) -> tuple[str, _Pending]:
        self._counter += 1
        token = format(self._counter, "x")
        pending = _Pending(worker_id)
        self._pending[token] = pending
        return token, pending

    def _sweep(self) -> None:
        """End the waits that are past their deadline; again in ``_SWEEP`` s while any wait."""
        self._sweep_timer = None
        now = time.monotonic()
        waiting = False
        for pending in self._pending.values():
            waiter = pending.waiter
            if waiter is not None and not waiter.done():
                if pending.deadline <= now:
                    waiter.set_exception(TimeoutError())
                else:
                    waiting = True
        if waiting:
            self._sweep_timer = self._running_loop().call_later(_SWEEP, self._sweep)

    def fail_worker(self, worker_id: str, make: FailureFactory) -> int:
        """End every request ``worker_id`` accepted (or was sent) with ``make()``: it died,
        so no reply will come. Returns how many there were."""
        failed = 0
        for pending in self._pending.values():
            if pending.worker_id == worker_id:
                pending.put(_Failure(make))
                failed += 1
        return failed

    def fail_all(self, make: FailureFactory) -> int:
        """End every request in flight with ``make()`` (the connection dropped: replies and
        stream chunks sent meanwhile are lost, so waiting on would hang or leave a gap)."""
        for pending in self._pending.values():
            pending.put(_Failure(make))
        return len(self._pending)

    # ------------------------------------------------------------------ requests out

    def _encode(self, payload: Any, headers: Mapping[str, str] | None) -> tuple[bytes, dict[str, str] | None]:
        """The body, and the headers it needs: none when the rule for bodies without a
        Content-Type reads it right. Headers cost both ends more than the rest of a small
        request's messaging (nats-py builds and parses them in Python, key by key)."""
        data = payload if isinstance(payload, bytes) else codec.encode(payload, self.encoding)
        hdrs = None
        if not codec.detect_unambiguous(data, self.encoding):
            hdrs = {codec.CONTENT_TYPE: self.encoding}
        if headers:
            hdrs = {**(hdrs or {}), **headers}
        if len(data) > self._sizer.max_payload:
            raise PayloadTooLarge(
                f"request of {len(data)} bytes is above the NATS server's max_payload of "
                f"{self._sizer.max_payload} bytes"
            )
        return data, hdrs

    async def request(
        self,
        subject: str,
        payload: Any = None,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        worker_id: str | None = None,
    ) -> Any:
        """One request, one decoded reply (reassembled when sent in parts).

        ``worker_id``: the worker the request goes to, so that ``fail_worker`` ends it when
        that worker dies (requests sent with ``Natserve-Ack`` learn it from the worker).
        """
        data, hdrs = self._encode({} if payload is None else payload, headers)
        token, pending = self._open(worker_id)
        deadline = time.monotonic() + timeout
        try:
            await self._send(subject, token, data, hdrs)
            first = await self._next(pending, deadline, subject, timeout)
            raise_for_error(first.headers, first.data, subject)
            body = first.data
            if first.headers and PARTS_HEADER in first.headers:
                body = await self._gather_parts(first, pending, deadline, subject, timeout)
            # A single successful reply has no Content-Type: the wire rule for bodies without
            # one (JSON when it starts with '{' or '[', else msgpack) reads it, whatever
            # encoding the replier chose.
            try:
                return codec.decode(body, codec.detect(body, first.headers))
            except BadRequest as exc:  # the codec's verdict on garbage: here the reply's fault
                raise malformed(subject, exc) from exc
        finally:
            self._pending.pop(token, None)

    async def _gather_parts(
        self, first: WireMessage, pending: _Pending, deadline: float, subject: str, timeout: float
    ) -> bytes:
        assert first.headers is not None
        total = parts_total(first.headers, subject)
        parts: dict[int, bytes] = {part_index(first.headers, 0, total, subject): first.data}
        while len(parts) < total:
            msg = await self._next(pending, deadline, subject, timeout)
            raise_for_error(msg.headers, msg.data, subject)
            parts[part_index(msg.headers, len(parts), total, subject)] = msg.data
        return join_parts(parts, total)

    async def _next(self, pending: _Pending, deadline: float, subject: str, timeout: float) -> WireMessage:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout(
                f"no reply on {subject!r} within {timeout:g} s", subject=subject, timeout=timeout
            )
        try:
            if pending.items:
                item = pending.items.popleft()
            elif remaining < 2 * _SWEEP:
                # A short wait: a precise timer of its own.
                item = await pending.get(remaining, self._running_loop())
            else:
                # One sweep every _SWEEP s for all of the transport's waits, rather than a
                # timer set and cancelled per request: a timeout fires up to _SWEEP s late.
                pending.deadline = deadline
                loop = self._running_loop()
                if self._sweep_timer is None:
                    self._sweep_timer = loop.call_later(_SWEEP, self._sweep)
                item = await pending.get(None, loop)
            if isinstance(item, _Failure):
                raise item.make()
            return item
        except TimeoutError:
            if self.is_closed:
                raise TransportError(f"NATS connection closed while waiting on {subject!r}") from None
            raise RequestTimeout(
                f"no reply on {subject!r} within {timeout:g} s", subject=subject, timeout=timeout
            ) from None

    async def stream(
        self,
        subject: str,
        payload: Any,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        on_abandon: Callable[[], Awaitable[None]] | None = None,
        on_accept: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Yield decoded chunks until the empty end message.

        ``timeout`` bounds the whole stream. When the consumer stops early, the stream times
        out or the connection fails, ``on_abandon`` runs (it sends the cancel request).
        ``on_accept`` gets the worker id of a ``Natserve-Accepted`` message. When the first
        chunk carries ``Natserve-Keepalive`` (the request asked for it), every N chunks the
        consumer takes are acknowledged on its subject (``_keepalive``).
        """
        data, hdrs = self._encode(payload, headers)
        token, pending = self._open()
        pending.on_accept = on_accept
        deadline = time.monotonic() + timeout
        expected = 1
        finished = False
        keepalive: tuple[int, str] | None = None
        try:
            await self._send(subject, token, data, hdrs)
            while True:
                msg = await self._next(pending, deadline, subject, timeout)
                try:
                    more = stream_message(msg.headers, msg.data, expected, subject)
                except NoResponders:
                    finished = True  # nothing runs there to cancel
                    raise
                if not more:
                    finished = True
                    return
                if expected == 1 and msg.headers and KEEPALIVE_HEADER in msg.headers:
                    keepalive = parse_keepalive(msg.headers[KEEPALIVE_HEADER])
                expected += 1
                try:
                    chunk = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
                except BadRequest as exc:
                    raise malformed(subject, exc) from exc
                yield chunk
                # The consumer took it and asks for the next one.
                if keepalive is not None and (expected - 1) % keepalive[0] == 0:
                    await self._acknowledge(keepalive[1], token, expected - 1)
        except ServiceError:
            # The server ends an errored stream itself; nothing to cancel.
            finished = True
            raise
        finally:
            self._pending.pop(token, None)
            if not finished and on_abandon is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(on_abandon())
