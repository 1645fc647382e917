"""``NatsTransport``: the client transport over a NATS connection.

Every request of the connection is answered on one wildcard inbox subscription
(``_INBOX.<nuid>.*``, see ``_multiplexer``); events are plain subscriptions. The connection is
the caller's: closing the transport ends its subscriptions, not the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client as NATSConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import codec
from ._client_transport import EventHandler
from ._errors import PayloadTooLarge, TransportError
from ._multiplexer import Multiplexer

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

# How long closing an event subscription waits for the events already on their way.
_DRAIN = 2.0


class _NatsSubscription:
    """An event subscription; closing drains it, so the events queued before (a launch's final
    "ready" among them) still reach the handler; bounded, as draining waits on the server."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._sub.drain(), _DRAIN)  # type: ignore[no-untyped-call]
        except Exception as exc:
            logger.debug("draining the subscription to %s failed: %r", self._sub.subject, exc)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class NatsTransport(Multiplexer):
    """Requests and streams over one connection, answered on one wildcard inbox."""

    def __init__(self, nc: NATSConnection, *, encoding: str = codec.MSGPACK) -> None:
        super().__init__(nc.new_inbox(), nc, encoding=encoding)
        self.nc = nc
        self._sub: Subscription | None = None

    @property
    def is_closed(self) -> bool:
        return bool(self.nc.is_closed)

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                f"{self._prefix}.*",
                cb=self._on_reply,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

    async def close(self) -> None:
        await super().close()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _send(self, subject: str, token: str, data: bytes, hdrs: dict[str, str] | None) -> None:
        if self._sub is None:
            await self.start()
        try:
            await self.nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=hdrs)
        except nats.errors.ConnectionClosedError as exc:
            raise TransportError(f"NATS connection is closed; cannot send to {subject!r}") from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"request to {subject!r} is above max_payload: {exc}") from exc

    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data, hdrs = self._encode(payload, headers)
        await self.nc.publish(subject, data, headers=hdrs)

    async def subscribe(self, subject: str, handler: EventHandler) -> _NatsSubscription:
        event_body = self._event_body

        async def on_event(msg: Msg) -> None:
            decoded, body = event_body(msg.subject, msg.data, msg.headers)
            if decoded:
                await handler(msg.subject, body)

        return _NatsSubscription(await self.nc.subscribe(subject, cb=on_event))
