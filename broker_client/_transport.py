"""The one module that talks to ``nats``: connections, requests, streams, service replies.

Client side: ``Transport`` multiplexes every request of a connection over one wildcard inbox
subscription, so a reply may be one message, several parts of a large payload, or a stream
of chunks ended by an empty message, and every wait is bounded by the call's timeout.

Service side: ``Responder`` wraps one incoming request: it decodes the body into a wire
model (a 400 naming the fields when it does not fit), answers in the request's encoding,
splits replies above the server's max payload into parts, streams chunks with
``Natserve-Seq`` and turns exceptions into the error headers and body.

Wire headers:
    Content-Type            application/json | application/msgpack, on stream chunks, parts and
                            errors; on a request only when its first byte would be misread by
                            the rule for bodies without one (a Transport's msgpack and JSON
                            objects never are, so its requests carry no headers at all); a
                            single successful reply has none either (it is in the request's
                            encoding)
    Natserve-Seq            1, 2, ... on stream chunks; the end is an empty message
    Natserve-Parts          N on every part of a reply split into N parts
    Natserve-Part           the part's index, 0 .. N-1
    Natserve-Request-Id     optional on a request, to follow it through logs (the natserve
                            client puts ``request_id`` in the body instead)
    Natserve-Ack            1 on a request, or ``"ack": true`` in a model request's body (the
                            client's way): tell me which worker takes it (opt-in, so that
                            `nats req` still sees the answer as the first message)
    Natserve-Accepted       <worker_id>, on an empty message a worker sends first when asked:
                            it admitted the request. The Transport records it (a request whose
                            worker dies is failed with ``fail_worker``) and never yields it.
    Natserve-Hops           n on a request a saturated replica passed on (workers/balancing.py)
    Nats-Service-Error-Code / Nats-Service-Error   on errors (with an {"error": ...} body)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATSConnection
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from . import codec, logcontext
from ._definition import format_validation_error
from ._errors import (
    BadRequest,
    InternalError,
    NatserveError,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    TransportError,
    error_from_wire,
)

__all__ = [
    "ACCEPTED_HEADER",
    "ACK_HEADER",
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "HOPS_HEADER",
    "PARTS_HEADER",
    "PART_HEADER",
    "REQUEST_ID_HEADER",
    "SEQ_HEADER",
    "EndpointInfo",
    "NATSConnection",
    "RequestOutcome",
    "RequestTask",
    "Responder",
    "ServiceHost",
    "Transport",
    "connect",
    "current_request",
]

logger = logging.getLogger(__name__)

SEQ_HEADER = "Natserve-Seq"
PARTS_HEADER = "Natserve-Parts"
PART_HEADER = "Natserve-Part"
REQUEST_ID_HEADER = "Natserve-Request-Id"
ACK_HEADER = "Natserve-Ack"
ACCEPTED_HEADER = "Natserve-Accepted"
HOPS_HEADER = "Natserve-Hops"
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
STATUS_HEADER = "Status"
# How long a request runs before its worker sends the opt-in ack (see Responder.accept).
ACK_DELAY = 0.05
# How often a Transport looks for requests past their timeout (see Transport._next).
_SWEEP = 0.05
# Room left in a message for headers and protocol framing when splitting large replies.
_HEADER_ROOM = 1024

M = TypeVar("M", bound=BaseModel)


# Answers to a first connect that no retry can change: wrong credentials, a TLS mismatch.
_REFUSED_MARKERS = ("authorization violation", "authentication", "tls required", "secure connection")


def _is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLError):
        return True  # certificate not trusted, hostname mismatch, client certificate refused
    return isinstance(exc, nats.errors.Error) and any(m in str(exc).lower() for m in _REFUSED_MARKERS)


async def _discard(nc: NATSConnection) -> None:
    """Close a connection that never came up; bounded, as the close of a failed TLS
    handshake waits for a socket that nobody will close."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 1.0)


class _Refused(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def connect(
    url: str | list[str],
    *,
    name: str,
    connect_timeout: float = 5.0,
    reconnect: bool = True,
    **options: Any,
) -> NATSConnection:
    """Connect with natserve's defaults: keep reconnecting, never give up silently.

    A first connect that the server refuses (bad credentials, TLS) fails at once with a
    TransportError; one that finds no server keeps trying (bound it with ``asyncio.wait_for``).
    """
    # "nats://a:4222,nats://b:4222" (one NATSERVE_NATS_URL for a cluster) is a list of servers.
    given = [url] if isinstance(url, str) else list(url)
    servers = [s.strip() for u in given for s in u.split(",") if s.strip()]
    first_connect = True

    async def _log_error(exc: Exception) -> None:
        logger.debug("nats connection error on %s: %r", servers, exc)

    user_error_cb = options.pop("error_cb", None) or _log_error

    async def _error_cb(exc: Exception) -> None:
        await user_error_cb(exc)
        if first_connect and _is_refusal(exc):
            # nats-py retries a refused first connect forever when reconnecting is on: it
            # cannot tell a wrong password from a server still starting. Raising from its
            # error callback is the one way out of that loop.
            raise _Refused(exc)

    async def _disconnected_cb() -> None:
        logger.info("disconnected from NATS %s", servers)

    async def _reconnected_cb() -> None:
        logger.info("reconnected to NATS %s", servers)

    options.setdefault("disconnected_cb", _disconnected_cb)
    options.setdefault("reconnected_cb", _reconnected_cb)
    settings: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": reconnect,
        # -1: keep trying while the server is away instead of giving up after 60 tries.
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "error_cb": _error_cb,
    }
    nc = NATSConnection()
    try:
        await nc.connect(**settings, **options)
    except _Refused as refused:
        await _discard(nc)
        raise TransportError(
            f"NATS at {', '.join(servers)} refused the connection of {name!r}: {refused.cause}"
        ) from refused.cause
    except BaseException as exc:
        await _discard(nc)
        if not isinstance(exc, Exception):
            raise  # cancellation (a caller's wait_for) stays a cancellation
        raise TransportError(f"cannot connect to NATS at {', '.join(servers)}: {exc}") from exc
    first_connect = False
    return nc


def _raise_for_error(headers: Mapping[str, str] | None, data: bytes, subject: str) -> None:
    if not headers:
        return
    if headers.get(STATUS_HEADER) == "503" and not data:
        raise NoResponders(f"no service answers on {subject!r}", subject=subject)
    code = headers.get(ERROR_CODE_HEADER)
    if code is None:
        return
    message = headers.get(ERROR_HEADER, "")
    type_name = None
    try:
        body = codec.decode(data, codec.detect(data, headers))
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            type_name = err.get("type")
    except BadRequest:
        pass
    try:
        numeric = int(code)
    except ValueError:
        numeric = 500
    raise error_from_wire(numeric, message or f"error {code} from {subject!r}", type_name)


class _Failure:
    """Put in a request's queue to end it with an error (its worker died, the connection
    dropped): the waiting call raises ``make()``, a fresh exception per request."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], NatserveError]) -> None:
        self.make = make


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Pending:
    """The messages of one in-flight request, fed by the shared inbox subscription.

    A deque and at most one waiting future rather than an ``asyncio.Queue`` and
    ``asyncio.timeout``: both cost more than the rest of a small request's bookkeeping.
    """

    __slots__ = ("deadline", "items", "on_accept", "waiter", "worker_id")

    def __init__(self, worker_id: str | None = None) -> None:
        self.items: deque[Msg | _Failure] = deque()
        self.waiter: asyncio.Future[None] | None = None
        # When the current wait ends (time.monotonic()), for the Transport's sweep.
        self.deadline = float("inf")
        # The worker that accepted it (Natserve-Accepted), or the one it was sent to.
        self.worker_id = worker_id
        self.on_accept: Callable[[str], None] | None = None

    def put(self, item: Msg | _Failure) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float | None) -> Msg | _Failure:
        """The next item; TimeoutError when none comes within ``timeout`` seconds (``None``:
        no timer of its own, the Transport's sweep ends the wait at ``deadline``)."""
        if not self.items:
            loop = asyncio.get_running_loop()
            self.waiter = waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self.waiter = None
        return self.items.popleft()


class Transport:
    """Requests and streams over one connection, answered on one wildcard inbox."""

    def __init__(self, nc: NATSConnection, *, encoding: str = codec.MSGPACK) -> None:
        self.nc = nc
        self.encoding = encoding
        self._prefix = nc.new_inbox()
        self._pending: dict[str, _Pending] = {}
        self._sub: Any = None
        self._counter = 0
        self._sweep_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                f"{self._prefix}.*",
                cb=self._on_reply,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

    async def close(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_reply(self, msg: Msg) -> None:
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
            self._sweep_timer = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def fail_worker(self, worker_id: str, make: Callable[[], NatserveError]) -> int:
        """End every request ``worker_id`` accepted (or was sent) with ``make()``: it died,
        so no reply will come. Returns how many there were."""
        failed = 0
        for pending in self._pending.values():
            if pending.worker_id == worker_id:
                pending.put(_Failure(make))
                failed += 1
        return failed

    def fail_all(self, make: Callable[[], NatserveError]) -> int:
        """End every request in flight with ``make()`` (the connection dropped: replies and
        stream chunks sent meanwhile are lost, so waiting on would hang or leave a gap)."""
        for pending in self._pending.values():
            pending.put(_Failure(make))
        return len(self._pending)

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
        if len(data) > self.nc.max_payload:
            raise PayloadTooLarge(
                f"request of {len(data)} bytes is above the NATS server's max_payload of "
                f"{self.nc.max_payload} bytes"
            )
        return data, hdrs

    async def _publish(self, subject: str, token: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        if self._sub is None:
            await self.start()
        try:
            await self.nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=hdrs)
        except nats.errors.ConnectionClosedError as exc:
            raise TransportError(f"NATS connection is closed; cannot send to {subject!r}") from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"request to {subject!r} is above max_payload: {exc}") from exc

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
            await self._publish(subject, token, data, hdrs)
            first = await self._next(pending, deadline, subject, timeout)
            _raise_for_error(first.headers, first.data, subject)
            body = first.data
            if first.headers and PARTS_HEADER in first.headers:
                body = await self._gather_parts(first, pending, deadline, subject, timeout)
            # A single successful reply has no Content-Type: the wire rule for bodies without
            # one (JSON when it starts with '{' or '[', else msgpack) reads it, whatever
            # encoding the replier chose.
            return codec.decode(body, codec.detect(body, first.headers))
        finally:
            self._pending.pop(token, None)

    async def _gather_parts(
        self, first: Msg, pending: _Pending, deadline: float, subject: str, timeout: float
    ) -> bytes:
        assert first.headers is not None
        total = int(first.headers[PARTS_HEADER])
        parts: dict[int, bytes] = {int(first.headers.get(PART_HEADER, 0)): first.data}
        while len(parts) < total:
            msg = await self._next(pending, deadline, subject, timeout)
            _raise_for_error(msg.headers, msg.data, subject)
            parts[int((msg.headers or {}).get(PART_HEADER, len(parts)))] = msg.data
        return b"".join(parts[i] for i in range(total))

    async def _next(self, pending: _Pending, deadline: float, subject: str, timeout: float) -> Msg:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout(
                f"no reply on {subject!r} within {timeout:g} s", subject=subject, timeout=timeout
            )
        try:
            if pending.items:
                item = pending.items.popleft()
            elif remaining < 2 * _SWEEP:
                item = await pending.get(remaining)  # a short wait: a precise timer of its own
            else:
                # One sweep every _SWEEP s for all of the connection's waits, rather than a
                # timer set and cancelled per request: a timeout fires up to _SWEEP s late.
                pending.deadline = deadline
                if self._sweep_timer is None:
                    self._sweep_timer = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)
                item = await pending.get(None)
            if isinstance(item, _Failure):
                raise item.make()
            return item
        except TimeoutError:
            if self.nc.is_closed:
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
    ) -> AsyncIterator[Any]:
        """Yield decoded chunks until the empty end message.

        ``timeout`` bounds the whole stream. When the consumer stops early, the stream times
        out or the connection fails, ``on_abandon`` runs (it sends the cancel request).
        ``on_accept`` gets the worker id of a ``Natserve-Accepted`` message.
        """
        data, hdrs = self._encode(payload, headers)
        token, pending = self._open()
        pending.on_accept = on_accept
        deadline = time.monotonic() + timeout
        expected = 1
        finished = False
        try:
            await self._publish(subject, token, data, hdrs)
            while True:
                msg = await self._next(pending, deadline, subject, timeout)
                if not msg.data and not (msg.headers and ERROR_CODE_HEADER in msg.headers):
                    if msg.headers and msg.headers.get(STATUS_HEADER) == "503":
                        finished = True
                        raise NoResponders(f"no service answers on {subject!r}", subject=subject)
                    finished = True
                    return
                _raise_for_error(msg.headers, msg.data, subject)
                seq = (msg.headers or {}).get(SEQ_HEADER)
                if seq is not None and int(seq) != expected:
                    raise TransportError(
                        f"stream from {subject!r} lost chunks: got {seq}, expected {expected}"
                    )
                expected += 1
                yield codec.decode(msg.data, codec.detect(msg.data, msg.headers))
        except ServiceError:
            # The server ends an errored stream itself; nothing to cancel.
            finished = True
            raise
        finally:
            self._pending.pop(token, None)
            if not finished and on_abandon is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(on_abandon())

    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data, hdrs = self._encode(payload, headers)
        await self.nc.publish(subject, data, headers=hdrs)


class Responder:
    """One incoming service request: decode it, answer it, stream to it, fail it cleanly."""

    __slots__ = (
        "__weakref__",
        "_ack",
        "_bad_type",
        "_body_type",
        "_clock",
        "_seq",
        "content_type",
        "error",
        "msg",
        "replied",
        "request_id",
        "subject",
    )

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.subject = msg.subject
        self._seq = 0
        # The error this request was answered with, for stats, metrics and logs.
        self.error: ServiceError | None = None
        self.replied = False
        # The worker id an ack would carry, while the ack is due and not yet sent, and the
        # clock that will send it.
        self._ack: str | None = None
        self._clock: _AckClock | None = None
        # A Content-Type that is not supported: body() raises it.
        self._bad_type: BadRequest | None = None
        headers = msg.headers
        if not headers:  # the natserve client's requests: the body rule alone, which cannot fail
            self.request_id: str | None = None
            self.content_type = codec.detect(msg.data)
        else:
            self.request_id = headers.get(REQUEST_ID_HEADER)
            try:
                self.content_type = codec.detect(msg.data, headers)
            except BadRequest as exc:
                # Answer the bad Content-Type itself in JSON, which every tool can read.
                self.content_type = codec.JSON
                self._bad_type = exc
        # What the body is read as (content_type, the reply's encoding, may change below).
        self._body_type = self.content_type

    @property
    def nc(self) -> NATSConnection:
        return self.msg._client

    def body(self) -> Any:
        try:
            if self._bad_type is not None:
                raise self._bad_type
            return codec.decode(self.msg.data, self._body_type)
        except BadRequest:
            if not (self.msg.headers or {}).get(codec.CONTENT_TYPE):
                # Undeclared bytes that are not msgpack most likely came from a person with
                # `nats req`: tell them in JSON, which they can read.
                self.content_type = codec.JSON
            raise

    def parse(self, model: type[M]) -> M:
        """The body as ``model``; a 400 naming each offending field when it does not fit."""
        body = self.body()
        if not isinstance(body, dict):
            raise BadRequest(f"request body on {self.subject!r} must be an object, got {type(body).__name__}")
        try:
            # The validator itself: model_validate's keyword handling costs more than a small
            # request's validation.
            return model.__pydantic_validator__.validate_python(body)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise BadRequest(f"invalid request: {format_validation_error(exc)}") from exc

    def _replying(self) -> bool:
        """Whether anyone waits for an answer; if so the request counts as answered from here
        on, and its ack is no longer due."""
        if not self.msg.reply:
            return False
        self.replied = True
        if self._ack is not None:
            self._ack = None
            if self._clock is not None:
                self._clock.discard(self)
        return True

    async def _send(self, data: bytes, headers: dict[str, str]) -> None:
        if self._replying():
            await self.nc.publish(self.msg.reply, data, headers=headers)

    async def respond(self, obj: Any) -> None:
        data = codec.encode(obj, self.content_type)
        msg = self.msg
        nc = msg._client
        if len(data) <= nc.max_payload - _HEADER_ROOM:
            # Published here rather than through _send: a coroutine less per reply. No
            # headers: the body is in the request's encoding, which its sender knows (a header
            # to build and parse cost 8 % of the throughput of small requests).
            if self._replying():
                await nc.publish(msg.reply, data)
            return
        limit = nc.max_payload - _HEADER_ROOM
        total = -(-len(data) // limit)
        for i in range(total):
            await self._send(
                data[i * limit : (i + 1) * limit],
                {
                    codec.CONTENT_TYPE: self.content_type,
                    PARTS_HEADER: str(total),
                    PART_HEADER: str(i),
                },
            )

    async def chunk(self, obj: Any) -> None:
        self._seq += 1
        headers = {codec.CONTENT_TYPE: self.content_type, SEQ_HEADER: str(self._seq)}
        if self._ack is not None:
            # The stream started before the ack was due: its first chunk carries it.
            headers[ACCEPTED_HEADER] = self._ack
        await self._send(codec.encode(obj, self.content_type), headers)

    async def end_stream(self) -> None:
        await self._send(b"", {})

    @property
    def wants_ack(self) -> bool:
        """Whether the request asked for an ack in its headers (``Natserve-Ack``)."""
        headers = self.msg.headers
        return bool(headers and headers.get(ACK_HEADER) and self.msg.reply)

    def accept(self, worker_id: str, asked: bool = False) -> None:
        """Tell a client that asked (``asked``: its body's ``ack``, or ``Natserve-Ack``) which
        worker admitted its request.

        Only requests still unanswered after ``ACK_DELAY`` get the ack message (a stream gets
        it on its first chunk): the worker's death matters to long requests, and a message
        more per short request halved the throughput of small requests.
        """
        if (asked and self.msg.reply) or self.wants_ack:
            self._ack = worker_id
            box = _CURRENT_REQUEST.get()
            if box is not None and box.task is None:
                # Started eagerly and has not waited yet: most such requests end without ever
                # waiting, and need no ack. _start_eagerly schedules it if this one waits.
                box.pending_ack = self
            else:
                self._schedule_ack()

    def _schedule_ack(self) -> None:
        self._clock = _ack_clock()
        self._clock.add(self)

    def _late_ack(self) -> None:
        worker_id, self._ack = self._ack, None
        if worker_id is None or self.replied or not self.msg.reply:
            return
        task = asyncio.ensure_future(
            self.nc.publish(self.msg.reply, b"", headers={ACCEPTED_HEADER: worker_id})
        )
        task.add_done_callback(_log_failed_ack)

    async def respond_error(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, ServiceError) else _as_service_error(exc, self.subject)
        self.error = err
        line = " ".join(err.message.split())[:1000]
        headers = {
            codec.CONTENT_TYPE: self.content_type,
            ERROR_CODE_HEADER: str(err.code),
            ERROR_HEADER: line,
        }
        if self._seq:
            headers[SEQ_HEADER] = str(self._seq + 1)
        await self._send(codec.encode(err.to_wire(), self.content_type), headers)


class _AckClock:
    """Sends the acks that fall due, with one timer for all of a loop's requests.

    A timer per request (``call_later``, then its cancel when the request ends first, as nearly
    all do) cost more than the rest of the ack's bookkeeping; requests are due in the order they
    arrive, so a dict in insertion order is the queue.
    """

    __slots__ = ("_due", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: dict[Responder, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, responder: Responder) -> None:
        due = self._loop.time() + ACK_DELAY
        self._due[responder] = due
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._tick)

    def discard(self, responder: Responder) -> None:
        self._due.pop(responder, None)

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        due = self._due
        while due:
            responder, when = next(iter(due.items()))
            if when > now:
                self._timer = self._loop.call_at(when, self._tick)
                return
            del due[responder]
            try:
                responder._late_ack()
            except Exception:
                logger.exception("could not send an ack")


_ACK_CLOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AckClock] = weakref.WeakKeyDictionary()


_last_clock: _AckClock | None = None


def _ack_clock() -> _AckClock:
    global _last_clock
    loop = asyncio.get_running_loop()
    clock = _last_clock
    if clock is not None and clock._loop is loop:
        return clock  # the common case, without a weak reference made per lookup
    clock = _ACK_CLOCKS.get(loop)
    if clock is None:
        clock = _ACK_CLOCKS[loop] = _AckClock(loop)
    _last_clock = clock
    return clock


def _log_failed_ack(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("could not send an ack: %r", task.exception())


def _as_service_error(exc: BaseException, subject: str) -> ServiceError:
    if isinstance(exc, NatserveError):
        return error_from_wire(exc.code, exc.message)
    if isinstance(exc, ValidationError):
        return BadRequest(f"invalid value: {format_validation_error(exc)}")
    # The traceback stays in the server log; the wire gets one line.
    logger.error("internal error on %s", subject, exc_info=exc)
    return InternalError(f"internal error on {subject!r}: {type(exc).__name__}: {exc}")


Handler = Callable[[Responder], Awaitable[None]]


class RequestTask:
    """The task that runs a request, once there is one (see :func:`current_request`)."""

    __slots__ = ("pending_ack", "task")

    def __init__(self, task: asyncio.Task[Any] | None = None) -> None:
        self.task = task
        # A Responder whose ack waits for the request's first wait (Responder.accept).
        self.pending_ack: Responder | None = None


_CURRENT_REQUEST: ContextVar[RequestTask | None] = ContextVar("natserve_request_task", default=None)


def current_request() -> RequestTask:
    """Where the current request's task is: for a request started eagerly, ``task`` is only
    set once the request first waits (before that nothing else can run, so nothing can need
    it); otherwise it is the current task."""
    box = _CURRENT_REQUEST.get()
    return box if box is not None else RequestTask(asyncio.current_task())


class _Resume:
    """Drives a coroutine that already ran up to its first wait (on ``first``) from inside a
    Task: ``first`` goes up to the Task as if the coroutine had yielded it there, and whatever
    the Task sends or throws (a result, a cancellation) goes down to the coroutine."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self.coro, self.first
        self.first = None
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration:
                    return


async def _resumed(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)


def _start_eagerly(coro: Coroutine[Any, Any, None], box: RequestTask) -> asyncio.Task[None] | None:
    """Run ``coro`` now, in a context of its own, up to its first wait; None if it ended
    without one, else the Task that carries it on from there, recorded in ``box`` (which the
    coroutine sets as its :func:`current_request` first thing).

    What Python 3.12's eager task factory does, for 3.11: creating and scheduling a Task per
    request cost more than everything else natserve does for a small request, and added a
    loop turn to its latency.
    """
    context = contextvars.copy_context()
    try:
        first = context.run(coro.send, None)
    except StopIteration:
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        logger.exception("request handler failed before its first wait")
        return None
    task = asyncio.get_running_loop().create_task(_resumed(coro, first), context=context)
    box.task = task
    responder, box.pending_ack = box.pending_ack, None
    if responder is not None and responder._ack is not None:
        responder._schedule_ack()  # it outlives this instant: its ack may fall due
    return task


class EndpointInfo:
    """One endpoint of a ``ServiceHost``, as its observer sees it: the same object for every
    request on it. ``observer_state`` is the observer's own, to keep what it derives from the
    endpoint (labels, a histogram) where the next request finds it without a lookup."""

    __slots__ = ("metadata", "name", "observer_state", "subject")

    def __init__(self, name: str, subject: str, metadata: Mapping[str, str]) -> None:
        self.name = name
        self.subject = subject
        self.metadata = metadata
        self.observer_state: Any = None

    def __repr__(self) -> str:
        return f"<EndpointInfo {self.name!r} on {self.subject!r}>"


@dataclass(slots=True)
class RequestOutcome:
    """How one request on a ``ServiceHost`` endpoint ended, for metrics and recent errors."""

    info: EndpointInfo
    # 200 when answered without an error, the wire error code after an error, 0 when nothing
    # was sent (passed on to another worker, a cancel held elsewhere, no reply subject).
    code: int
    message: str  # the error's message; "" on success
    seconds: float  # from the start of its task to its last reply
    request_id: str | None

    @property
    def endpoint(self) -> str:
        return self.info.name

    @property
    def subject(self) -> str:
        return self.info.subject

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.info.metadata


RequestObserver = Callable[[RequestOutcome], None]


class ServiceHost:
    """A ``nats.micro`` service whose endpoints answer concurrently.

    nats-py runs one subscription's callbacks one at a time, so each request gets its own
    task (bounded by ``max_concurrency``); errors still count in ``nats micro stats``, with
    the last error and the time the tasks took. Each request's task runs with the log context
    (``logcontext``) of its endpoint: ``worker_id`` and ``model_uid`` from the service's and
    the endpoint's metadata, ``request_id`` from the ``Natserve-Request-Id`` header.
    ``observer``, when set, is told how every request ended.
    """

    def __init__(
        self,
        nc: NATSConnection,
        *,
        name: str,
        version: str,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        max_concurrency: int = 4096,
    ) -> None:
        from nats.micro import ServiceConfig
        from nats.micro.service import Service

        self.nc = nc
        self._service = Service(
            nc,
            ServiceConfig(name=name, version=version, description=description, metadata=dict(metadata or {})),
        )
        self._max_concurrency = max_concurrency
        # Set while a request waits for one of the max_concurrency tasks to end.
        self._room: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_context = {k: v for k, v in (metadata or {}).items() if k in logcontext.FIELDS}
        self.observer: RequestObserver | None = None

    @property
    def id(self) -> str:
        return self._service.id

    async def start(self) -> None:
        await self._service.start()

    async def add_endpoint(
        self,
        name: str,
        subject: str,
        handler: Handler,
        *,
        queue_group: str | None = None,
        metadata: Mapping[str, str] | None = None,
        eager: bool = False,
    ) -> None:
        """Answer ``subject`` with ``handler``, each request in a task of its own.

        ``eager``: start each request at once in the subscription's task and give it a task of
        its own only when it first waits (see :func:`_start_eagerly`); a request that never
        waits (the echo engine's) costs no task at all. The handler must not keep
        ``asyncio.current_task()`` from before its first wait: :func:`current_request` says
        which task runs it.
        """
        from nats.micro.service import EndpointConfig

        info = EndpointInfo(name, subject, dict(metadata or {}))
        # nats.micro's endpoint, once added: its stats are counted here (see _done).
        micro: list[Any] = []
        log_context = {
            **self._log_context,
            **{k: v for k, v in info.metadata.items() if k in logcontext.FIELDS},
        }

        async def _run(msg: Msg, box: RequestTask | None = None) -> None:
            if box is not None:
                _CURRENT_REQUEST.set(box)  # in the request's own context (see _start_eagerly)
            started = time.perf_counter()
            responder = Responder(msg)
            if responder.request_id is not None:
                # This task's own context: the value ends with the request.
                logcontext.bind(request_id=responder.request_id)
            # handle() inlined: a coroutine less per request.
            try:
                await handler(responder)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await responder.respond_error(
                        ServiceError(f"request on {responder.subject!r} was cancelled", code=503)
                    )
                raise
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await responder.respond_error(exc)
                    if responder._seq:
                        await responder.end_stream()
                self._done(info, micro, responder, False, time.perf_counter() - started)
                return
            self._done(info, micro, responder, True, time.perf_counter() - started)

        bound: list[bool] = []
        tasks = self._tasks

        async def _start(msg: Msg) -> None:
            if micro:
                # nats.micro's own wrapper (a Request object and its timing, per message) is
                # bypassed: the request is counted here, its time and errors in _done.
                micro[0]._num_requests += 1
            if not bound:
                # This runs in the endpoint's own subscription task, whose context every
                # request task copies: the endpoint's fields are set once, here.
                logcontext.bind(**log_context)
                bound.append(True)
            while len(tasks) >= self._max_concurrency:
                # Full: this subscription waits (its messages queue in nats-py meanwhile).
                if self._room is None:
                    self._room = asyncio.get_running_loop().create_future()
                await self._room
            if eager:
                box = RequestTask()
                task = _start_eagerly(_run(msg, box), box)
                if task is None:
                    return  # it ran to its end without waiting
            else:
                task = asyncio.create_task(_run(msg))
            tasks.add(task)
            task.add_done_callback(self._task_done)

        async def _dispatch(request: Any) -> None:
            await _start(request._msg)

        await self._service.add_endpoint(
            EndpointConfig(
                name=name,
                subject=subject,
                handler=_dispatch,
                queue_group=queue_group,
                metadata=dict(metadata or {}),
            )
        )
        endpoint = self._service._endpoints[-1]
        sub = getattr(endpoint, "_subscription", None)
        if sub is not None and getattr(sub, "_cb", None) is not None:
            # Straight from the subscription to the request: see _start.
            micro.append(endpoint)
            sub._cb = _start

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)

    def _done(
        self, info: EndpointInfo, micro: list[Any], responder: Responder, ok: bool, seconds: float
    ) -> None:
        error = responder.error
        if micro:
            # The request's own task did the work: nats.micro saw none of its time or errors.
            endpoint = micro[0]
            total = endpoint._processing_time + int(seconds * 1e9)
            endpoint._processing_time = total
            endpoint._average_processing_time = total // (endpoint._num_requests or 1)
            if not ok:
                endpoint._num_errors += 1
                endpoint._last_error = error.message[:1000] if error is not None else "error"
        if ok:
            code = 200 if responder.replied else 0
        else:
            code = error.code if error is not None else 500
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %d in %.1f ms%s",
                info.name,
                responder.subject,
                code,
                seconds * 1000,
                f": {error.message}" if error is not None else "",
            )
        observer = self.observer
        if observer is not None:
            try:
                observer(
                    RequestOutcome(
                        info,
                        code,
                        error.message if error is not None else "",
                        seconds,
                        logcontext.get("request_id"),
                    )
                )
            except Exception:
                logger.exception("request observer failed")

    async def until_subscribed(self, timeout: float = 10.0) -> None:
        """Return once the server has every subscription this connection made so far.

        ``nc.flush()`` is not enough: nats-py writes its PING straight to the socket while
        SUBs may still wait in its pending buffer, so the PONG can come back before the server
        saw them, and a request sent right after would get "no responders". A request to our
        own ``$SRV.PING`` goes through that buffer behind the SUBs, so its answer proves them.
        """
        subject = f"$SRV.PING.{self._service._name}.{self.id}"
        try:
            await self.nc.request(subject, b"", timeout=timeout)
        except Exception as exc:
            raise TransportError(
                f"service {self._service._name!r} does not answer its own ping on {subject!r}"
            ) from exc

    async def remove_endpoints(self, subjects: set[str]) -> None:
        """Stop answering on these subjects (nats.micro has no public call for it)."""
        keep = []
        for endpoint in self._service._endpoints:
            if endpoint._subject in subjects:
                with contextlib.suppress(Exception):
                    await endpoint._stop()
            else:
                keep.append(endpoint)
        self._service._endpoints = keep

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish; False if some were still running at the end."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def stop(self, *, grace: float = 0.0) -> None:
        with contextlib.suppress(Exception):
            await self._service.stop()
        if grace > 0:
            await self.wait_idle(grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
