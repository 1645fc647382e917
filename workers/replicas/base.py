"""One loaded replica of a model: admission, the requests in flight, counters and shutdown.

A :class:`Replica` is one loaded copy of a model on one device: its engine, its admission limit
(``request_limits``), the requests it has in flight and its counters. Its operations return the
typed replies (:mod:`workers.replies`); :mod:`workers.endpoints` decodes the requests and sends
the replies. Each request registers itself (:meth:`Replica.track`) so that a cancel, a terminate
or a shutdown can end it; one ended that way becomes a 503 naming why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from broker_client import (
    BadRequest,
    ChatRequest,
    Conflict,
    EmbeddingDefinition,
    EmbedRequest,
    GenerateRequest,
    LLMDefinition,
    Overloaded,
    ReplicaInfo,
    Unavailable,
    logcontext,
)
from broker_client.runtime import RequestTask, current_request

from ..engines import RequestCancelledError
from ..limits import ReplicaLimits
from ..replies import (
    ChatCompletionBody,
    ChatCompletionChunkBody,
    CompletionBody,
    CompletionChunkBody,
    EmbeddingListBody,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_REQUEST_LIMITS", "Flight", "Replica"]

DEFAULT_REQUEST_LIMITS = 256
_monotonic = time.monotonic


class Flight:
    """One admitted request; as a context manager (what :meth:`Replica.track` returns), its
    lifetime on the replica. A class rather than a generator-based context manager, which costs
    several times more, on every request."""

    __slots__ = ("_runner", "cancel_reason", "replica", "request_id", "started")

    def __init__(self, replica: Replica, request_id: str, runner: RequestTask) -> None:
        self.replica = replica
        self.request_id = request_id
        self._runner = runner
        # Set when someone else ends the request; becomes the 503's message.
        self.cancel_reason: str | None = None
        self.started = time.perf_counter()

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task running the request (requests start eagerly: see ServiceHost)."""
        return self._runner.task

    def __enter__(self) -> Flight:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        replica = self.replica
        del replica.flights[self.request_id]
        replica.last_request = _monotonic()
        if exc_type is None:
            return
        if issubclass(exc_type, asyncio.CancelledError):
            if self.cancel_reason is None:
                return  # the worker's own shutdown: stays a cancellation
            if self.task is not None:
                self.task.uncancel()
            replica.errors += 1
            raise Unavailable(self.cancel_reason) from None
        replica.errors += 1
        if issubclass(exc_type, RequestCancelledError):
            raise Unavailable(self.cancel_reason or f"request {self.request_id!r} was cancelled") from None


class Replica:
    """One loaded replica: admission, in-flight tracking, counters and shutdown."""

    model_type = ""

    def __init__(
        self,
        *,
        model_uid: str,
        replica_index: int,
        model_name: str,
        definition: LLMDefinition | EmbeddingDefinition,
        device: str,
        memory_bytes: int = 0,
        request_limits: int | None = None,
        loaded: Any = None,
        limits: ReplicaLimits | None = None,
        on_first_token: Callable[[float], None] | None = None,
    ) -> None:
        self.model_uid = model_uid
        self.replica_index = replica_index
        self.model_name = model_name
        self.definition = definition
        self.abilities: tuple[str, ...] = tuple(definition.model_ability)
        self.device = device
        self.memory_bytes = memory_bytes
        self.request_limits = request_limits or DEFAULT_REQUEST_LIMITS
        # max_tokens cap and rate limit (workers/limits.py); the time-to-first-token metric.
        self.limits = limits or ReplicaLimits()
        self.on_first_token = on_first_token
        self.status = "ready"
        # Requests it runs at once; beyond that they queue, and the worker passes new ones on to
        # other replicas (``workers/balancing.py``). ``request_limits`` is the hard cap.
        self.capacity = self.request_limits
        self._loaded = loaded
        # The admitted requests not yet answered, by request id.
        self.flights: dict[str, Flight] = {}
        self.requests = 0
        self.errors = 0
        self.cancelled = 0
        # When its last request ended (monotonic; its start while it has had none): idle_for.
        self.last_request = _monotonic()

    # -- admission ------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.flights)

    @property
    def accepting(self) -> bool:
        return self.status == "ready"

    @property
    def label(self) -> str:
        return f"model {self.model_uid!r} replica {self.replica_index}"

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the replica last had a request in flight; 0 while it has one."""
        if self.flights:
            return 0.0
        return max(0.0, (_monotonic() if now is None else now) - self.last_request)

    def check_capacity(self) -> None:
        if len(self.flights) >= self.request_limits:
            raise self._overloaded()

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self.label} is at its request limit of {self.request_limits} concurrent "
            f"requests ({len(self.flights)} in flight); retry later"
        )

    def track(self, request_id: str) -> Flight:
        """Admit one request (429 at the limit, 409 for a request_id in flight) for its lifetime.

        A cancellation that came from :meth:`cancel` turns into a 503 carrying its reason; any
        other cancellation (the worker's own shutdown) stays a cancellation.
        """
        flights = self.flights
        if self.status != "ready":
            raise Unavailable(f"{self.label} is {self.status} and takes no new requests")
        if len(flights) >= self.request_limits:
            raise self._overloaded()
        if request_id in flights:
            raise Conflict(f"request_id {request_id!r} is already in flight on {self.label}")
        if self.limits.rate_limit is not None:
            self.limits.admit(self.label)  # the rate limit: 429 past it
        # This request's own context: its logs carry the id it runs under from here on.
        logcontext.set_request_id(request_id)
        flight = flights[request_id] = Flight(self, request_id, current_request())
        self.requests += 1
        return flight

    def cancel(self, request_id: str, reason: str) -> bool:
        """End one in-flight request; False when it is not here."""
        flight = self.flights.get(request_id)
        if flight is None:
            return False
        self._end(flight, reason)
        return True

    def _end(self, flight: Flight, reason: str) -> None:
        if flight.cancel_reason is None:
            flight.cancel_reason = reason
            self.cancelled += 1
        if not self._engine_cancel(flight.request_id) and flight.task is not None:
            # Not in the engine (still parsing, tokenising or embedding): stop the task itself.
            flight.task.cancel()

    def _engine_cancel(self, request_id: str) -> bool:
        return False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when some still were after ``timeout``."""
        tasks = {f.task for f in self.flights.values() if f.task is not None}
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self, reason: str, *, grace: float = 5.0) -> None:
        """Stop: end every request with ``reason`` (503), close the engine, free the model."""
        if self.status == "closed":
            return
        self.status = "stopping"
        for flight in list(self.flights.values()):
            self._end(flight, reason)
        if not await self.wait_idle(grace):
            logger.warning("%s: requests still running %.1f s after being cancelled", self.label, grace)
        try:
            await self._close_engine()
        finally:
            self._release()
            self.status = "closed"

    async def _close_engine(self) -> None:
        return None

    def _release(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and hasattr(loaded, "unload"):
            # unload() drops the model, runs gc and empties the CUDA cache.
            loaded.unload()

    # -- operations (the typed replies; workers/endpoints.py sends them)

    async def generate(self, req: GenerateRequest, flight: Flight) -> CompletionBody:
        raise self.wrong_ability("generate")

    async def generate_stream(
        self, req: GenerateRequest, flight: Flight
    ) -> AsyncGenerator[CompletionChunkBody, None]:
        """The chunks of a streamed completion: checks first (their errors come before any
        chunk), then an iterator the caller closes."""
        raise self.wrong_ability("generate")

    async def chat(self, req: ChatRequest, flight: Flight) -> ChatCompletionBody:
        raise self.wrong_ability("chat")

    async def chat_stream(
        self, req: ChatRequest, flight: Flight
    ) -> AsyncGenerator[ChatCompletionChunkBody, None]:
        """As :meth:`generate_stream`, for a chat."""
        raise self.wrong_ability("chat")

    async def embed(self, req: EmbedRequest, flight: Flight) -> EmbeddingListBody:
        raise self.wrong_ability("embed")

    def wrong_ability(self, ability: str) -> BadRequest:
        return BadRequest(
            f"model {self.model_uid!r} cannot {ability}: its abilities are {', '.join(self.abilities)}"
        )

    # -- reporting ------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(active, waiting) for the heartbeat."""
        active = min(len(self.flights), 1)
        return active, len(self.flights) - active

    def extra_info(self) -> dict[str, Any]:
        return {}

    def info(self) -> ReplicaInfo:
        active, waiting = self.counts()
        # ReplicaInfo keeps extra keys: the per-replica counters ride along in the heartbeat.
        return ReplicaInfo.model_validate(
            {
                "model_uid": self.model_uid,
                "replica_index": self.replica_index,
                "model_name": self.model_name,
                "model_type": self.model_type,
                "device": self.device,
                "status": self.status,
                "memory_bytes": self.memory_bytes,
                "active": active,
                "waiting": waiting,
                "request_limits": self.request_limits,
                "requests": self.requests,
                "errors": self.errors,
                "cancelled": self.cancelled,
                "idle_for": round(self.idle_for(), 3),
                **self.extra_info(),
            }
        )
