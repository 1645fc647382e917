"""Stream keepalive: a streamed reply stops when its reader stops acknowledging it.

A stream whose reader has gone (a process killed, a raw subscriber that left) otherwise runs to
its ``max_tokens``, spending a batch slot on nobody. The keepalive is opt-in, so that `nats req`
readers keep today's behaviour:

1. The reader asks for it in the request body: ``"keepalive": N`` (the natserve client does, for
   every stream; :data:`DEFAULT_EVERY`).
2. The service arms the request (:meth:`Keepalives.arm`); its first chunk carries
   ``Natserve-Keepalive: <N> <ack subject>``.
3. The reader publishes ``{"reply": <its reply subject>, "received": <chunks so far>}`` on the
   ack subject each time it has taken N more chunks (the client's multiplexer does).
4. When more than 2 x N chunks have gone out unacknowledged (one window may be in flight) and
   stayed so for ``silence`` seconds, the next chunk raises :class:`StreamAbandoned` (a 503)
   instead of being sent: the handler's generation ends there, as on a cancel.

The service's cost is a comparison per chunk of an armed stream, and a clock read only while
an ack is overdue; acks are looked up by reply subject, unique per request.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from . import codec
from ._bounds import MAX_KEEPALIVE
from ._errors import BadRequest, Unavailable

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ._responder import Responder

__all__ = [
    "DEFAULT_EVERY",
    "DEFAULT_SILENCE",
    "KeepaliveState",
    "Keepalives",
    "StreamAbandoned",
    "ack_body",
    "header_value",
    "parse_header",
]

logger = logging.getLogger(__name__)

# Chunks between two acks of the natserve client (a reader may ask for up to MAX_KEEPALIVE),
# and how long an overdue ack may stay away before the stream stops.
DEFAULT_EVERY = 16
DEFAULT_SILENCE = 5.0


class StreamAbandoned(Unavailable):
    """The reader of a stream stopped acknowledging it: nobody reads the rest."""


def header_value(every: int, subject: str) -> str:
    """The ``Natserve-Keepalive`` value: ack every ``every`` chunks on ``subject``."""
    return f"{every} {subject}"


def parse_header(value: str) -> tuple[int, str] | None:
    """``(every, subject)`` from a ``Natserve-Keepalive`` value; None when it is not one."""
    every, _, subject = value.partition(" ")
    try:
        n = int(every)
    except ValueError:
        return None
    if not 1 <= n <= MAX_KEEPALIVE or not subject or " " in subject:
        return None
    return n, subject


def ack_body(reply: str, received: int) -> dict[str, Any]:
    """What a reader publishes on the ack subject after ``received`` chunks of ``reply``'s stream."""
    return {"reply": reply, "received": received}


class KeepaliveState:
    """One armed stream: what its reader acknowledged, and since when an ack is overdue."""

    __slots__ = ("acked", "due_since", "every", "header", "silence")

    def __init__(self, every: int, subject: str, silence: float) -> None:
        self.every = every
        self.silence = silence
        self.header = header_value(every, subject)
        self.acked = 0
        self.due_since: float | None = None

    def acknowledged(self, received: int) -> None:
        if received > self.acked:
            self.acked = received
            self.due_since = None

    def check(self, seq: int, subject: str) -> None:
        """Before chunk ``seq`` goes out: raise StreamAbandoned when the reader has been silent
        too long."""
        if seq - self.acked <= 2 * self.every:
            return
        now = time.monotonic()
        if self.due_since is None:
            self.due_since = now
        elif now - self.due_since > self.silence:
            raise StreamAbandoned(
                f"the reader of the stream on {subject!r} stopped acknowledging it: "
                f"{seq - 1 - self.acked} chunks unacknowledged for {self.silence:g} s"
            )


class Keepalives:
    """The armed streams whose acks arrive on one subject (``on_ack`` is its handler)."""

    def __init__(self, subject: str, *, silence: float = DEFAULT_SILENCE) -> None:
        self.subject = subject
        self.silence = silence
        self._streams: dict[str, KeepaliveState] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def arm(self, responder: Responder, every: int) -> None:
        """Have ``responder``'s stream acknowledged every ``every`` chunks (its reader asked)."""
        reply = responder.msg.reply
        if not reply:
            return
        state = KeepaliveState(every, self.subject, self.silence)
        responder.keepalive = state
        self._streams[reply] = state

    def disarm(self, responder: Responder) -> None:
        self._streams.pop(responder.msg.reply, None)

    async def on_ack(self, msg: Msg) -> None:
        try:
            body = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
        except BadRequest:
            return
        if not isinstance(body, dict):
            return
        reply, received = body.get("reply"), body.get("received")
        state = self._streams.get(reply) if isinstance(reply, str) else None
        if state is not None and type(received) is int:
            state.acknowledged(received)
