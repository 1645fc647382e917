"""``Responder``: one incoming service request, answered by the wire rules.

It decodes the body into a wire model (a 400 naming the fields when it does not fit), answers in
the request's encoding, splits replies above the server's max payload into parts, streams chunks
with ``Natserve-Seq``, turns exceptions into the error headers and body, and sends the opt-in ack
(``Natserve-Accepted``) of requests that are still running after ``ACK_DELAY``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, TypeVar

from nats.aio.client import Client as NATSConnection
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from . import codec
from ._definition import format_validation_error
from ._errors import BadRequest, ServiceError
from ._keepalive import KeepaliveState
from ._request_task import _CURRENT_REQUEST
from .wire import (
    ACCEPTED_HEADER,
    ACK_HEADER,
    HEADER_ROOM,
    KEEPALIVE_HEADER,
    REQUEST_ID_HEADER,
    SEQ_HEADER,
    as_service_error,
    error_body,
    error_headers,
    headers_size,
    split_parts,
)

__all__ = ["ACK_DELAY", "Responder"]

logger = logging.getLogger(__name__)

# How long a request runs before its worker sends the opt-in ack (see Responder.accept).
ACK_DELAY = 0.05

M = TypeVar("M", bound=BaseModel)


class Responder:
    """One incoming service request: decode it, answer it, stream to it, fail it cleanly.

    ``nc`` is the connection the request came in on (the service's): the replies go out on it.
    """

    __slots__ = (
        "__weakref__",
        "_ack",
        "_bad_type",
        "_body_type",
        "_clock",
        "_seq",
        "content_type",
        "error",
        "keepalive",
        "msg",
        "nc",
        "replied",
        "request_id",
        "subject",
    )

    def __init__(self, msg: Msg, nc: NATSConnection) -> None:
        self.msg = msg
        self.nc = nc
        self.subject = msg.subject
        self._seq = 0
        # Set when the reader asked to acknowledge the stream (_keepalive.Keepalives.arm).
        self.keepalive: KeepaliveState | None = None
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
    def streamed(self) -> int:
        """How many chunks this request has streamed so far."""
        return self._seq

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
        nc = self.nc
        if len(data) <= nc.max_payload - HEADER_ROOM:
            # Published here rather than through _send: a coroutine less per reply. No
            # headers: the body is in the request's encoding, which its sender knows (a header
            # to build and parse cost 8 % of the throughput of small requests).
            if self._replying():
                await nc.publish(self.msg.reply, data)
            return
        for part, headers in split_parts(data, nc.max_payload, self.content_type):
            await self._send(part, headers)

    async def chunk(self, obj: Any) -> None:
        """Send the stream's next chunk; raises ``StreamAbandoned`` instead when its reader asked
        for the keepalive and stopped acknowledging (``_keepalive``)."""
        self._seq += 1
        headers = {codec.CONTENT_TYPE: self.content_type, SEQ_HEADER: str(self._seq)}
        if self._ack is not None:
            # The stream started before the ack was due: its first chunk carries it.
            headers[ACCEPTED_HEADER] = self._ack
        keepalive = self.keepalive
        if keepalive is not None:
            if self._seq == 1:
                headers[KEEPALIVE_HEADER] = keepalive.header
            else:
                keepalive.check(self._seq, self.subject)
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
                # waiting, and need no ack. start_eagerly calls ack_outlives_start if it waits.
                box.pending_ack = self
            else:
                self._schedule_ack()

    def ack_outlives_start(self) -> None:
        """The eagerly started request waits: its ack, if still due, may fall due now."""
        if self._ack is not None:
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
        err = exc if isinstance(exc, ServiceError) else as_service_error(exc, self.subject)
        self.error = err
        headers = error_headers(err, self.content_type, self._seq)
        # The server counts the headers against max_payload too; a body over it would be
        # refused, and the caller left waiting for its timeout.
        limit = self.nc.max_payload - headers_size(headers)
        await self._send(error_body(err, self.content_type, limit), headers)


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
