"""``ClientTransport``: what the client and its handles need of the messaging underneath.

One request and its decoded reply, a stream of replies, a fire-and-forget publish, a
subscription to events, the bookkeeping that ends the requests of a worker that died (or all of
them when the connection drops), and close. Two implementations: ``NatsTransport`` (the real
one, ``broker_client.runtime``) and ``MemoryTransport`` (handlers per subject in the same
process, for tests that need no server, as httpx's ``MockTransport``). Both apply the same wire
rules to what comes back (``wire``), so the client cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from ._errors import NatserveError

__all__ = ["ClientTransport", "EventHandler", "EventSubscription", "FailureFactory"]

# Makes the exception a failed request raises: a fresh one per request.
FailureFactory = Callable[[], NatserveError]
# Gets each event: its subject and its decoded body (events that do not decode are dropped).
EventHandler = Callable[[str, Any], Awaitable[None]]


class EventSubscription(Protocol):
    """A subscription made with :meth:`ClientTransport.subscribe`."""

    async def close(self) -> None:
        """Stop it; the events that already arrived still reach the handler (bounded)."""


class ClientTransport(Protocol):
    """Requests, streams and events for ``AsyncClient`` and the model handles."""

    encoding: str

    @property
    def is_closed(self) -> bool:
        """Whether the connection underneath is closed for good (no reconnect will come)."""

    async def start(self) -> None:
        """Get ready to take replies; ``request`` and ``stream`` call it when needed."""

    async def request(
        self,
        subject: str,
        payload: Any = None,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        worker_id: str | None = None,
    ) -> Any:
        """Send one request and return its decoded reply.

        Raises the typed error a reply carries, ``NoResponders`` when nobody listens,
        ``RequestTimeout`` after ``timeout`` seconds, ``ProtocolError`` for a reply that breaks
        the wire rules. ``worker_id``: the worker it is sent to, for :meth:`fail_worker`.
        """

    def stream(
        self,
        subject: str,
        payload: Any,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        on_abandon: Callable[[], Awaitable[None]] | None = None,
        on_accept: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Send one request and yield its decoded chunks until the stream's end.

        ``timeout`` bounds the whole stream. ``on_abandon`` runs when the consumer stops early,
        the stream times out or the connection fails; ``on_accept`` gets the worker id of the
        replica that took it.
        """

    async def publish(self, subject: str, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        """Send a message nobody answers (a cancel)."""

    async def subscribe(self, subject: str, handler: EventHandler) -> EventSubscription:
        """Call ``handler`` with every event published on ``subject`` (wildcards allowed)."""

    def fail_worker(self, worker_id: str, make: FailureFactory) -> int:
        """End every request ``worker_id`` took with ``make()``; how many there were."""

    def fail_all(self, make: FailureFactory) -> int:
        """End every request in flight with ``make()``; how many there were."""

    async def close(self) -> None:
        """Take no more replies; the connection itself belongs to whoever made it."""
