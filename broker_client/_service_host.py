"""``ServiceHost``: a NATS micro service whose endpoints answer concurrently, within a bound.

It answers the micro protocol itself (``_micro``: ``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``)
with nats-py's public API alone: one subscription per endpoint, straight to the request, and one
per control subject. Each request gets a ``Responder`` and runs in a task of its own (or starts
eagerly, ``_request_task``), at most ``max_concurrency`` at a time; its outcome counts in the
endpoint's stats and goes to the host's ``observer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATSConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from . import logcontext
from ._errors import ServiceError, TransportError
from ._micro import (
    DEFAULT_QUEUE_GROUP,
    VERBS,
    EndpointStats,
    Identity,
    check_endpoint,
    check_service,
    control_subjects,
    info_response,
    ping_response,
    stats_response,
)
from ._request_task import _CURRENT_REQUEST, RequestTask, start_eagerly
from ._responder import Responder

__all__ = ["EndpointInfo", "Handler", "RequestObserver", "RequestOutcome", "ServiceHost"]

logger = logging.getLogger(__name__)

Handler = Callable[[Responder], Awaitable[None]]

_NUID = NUID()


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


class _Endpoint:
    """An endpoint the host serves: what the observer sees, what stats show, its subscription."""

    __slots__ = ("info", "stats", "subscription")

    def __init__(self, info: EndpointInfo, stats: EndpointStats) -> None:
        self.info = info
        self.stats = stats
        self.subscription: Subscription | None = None


class ServiceHost:
    """A NATS micro service whose endpoints answer concurrently.

    nats-py runs one subscription's callbacks one at a time, so each request gets its own
    task (bounded by ``max_concurrency``); errors count in ``nats micro stats``, with the last
    error and the time the tasks took. Each request's task runs with the log context
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
        check_service(name, version)
        self.nc = nc
        self.name = name
        self._identity = Identity(name, _NUID.next().decode(), version, description, metadata or {})
        self._started = datetime.now(UTC)
        self._endpoints: list[_Endpoint] = []
        self._control: list[Subscription] = []
        self._max_concurrency = max_concurrency
        # Set while a request waits for one of the max_concurrency tasks to end.
        self._room: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_context = {k: v for k, v in (metadata or {}).items() if k in logcontext.FIELDS}
        self.observer: RequestObserver | None = None

    @property
    def id(self) -> str:
        """This instance's id, unique among the instances of its name."""
        return self._identity.id

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._identity.metadata

    # ------------------------------------------------------------------ the micro protocol

    async def start(self) -> None:
        """Answer ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` in their three forms."""
        if self._control:
            return
        identity = self._identity
        ping = ping_response(identity)  # it never changes

        async def on_ping(msg: Msg) -> None:
            await self._answer(msg, ping)

        async def on_info(msg: Msg) -> None:
            await self._answer(msg, info_response(identity, (e.stats for e in self._endpoints)))

        async def on_stats(msg: Msg) -> None:
            stats = (e.stats for e in self._endpoints)
            await self._answer(msg, stats_response(identity, self._started, stats))

        handlers = dict(zip(VERBS, (on_ping, on_info, on_stats), strict=True))
        for verb, handler in handlers.items():
            for subject in control_subjects(verb, identity.name, identity.id):
                self._control.append(await self.nc.subscribe(subject, cb=handler))
        self._started = datetime.now(UTC)
        await self.nc.flush()

    async def _answer(self, msg: Msg, data: bytes) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, data)

    # ------------------------------------------------------------------ endpoints

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
        its own only when it first waits (see ``_request_task``); a request that never waits
        (the echo engine's) costs no task at all. The handler must not keep
        ``asyncio.current_task()`` from before its first wait: :func:`current_request` says
        which task runs it.
        """
        group = queue_group or DEFAULT_QUEUE_GROUP
        check_endpoint(name, subject, group)
        info = EndpointInfo(name, subject, dict(metadata or {}))
        endpoint = _Endpoint(info, EndpointStats(name, subject, group, info.metadata))
        stats = endpoint.stats
        log_context = {
            **self._log_context,
            **{k: v for k, v in info.metadata.items() if k in logcontext.FIELDS},
        }
        nc = self.nc

        async def _run(msg: Msg, box: RequestTask | None = None) -> None:
            if box is not None:
                _CURRENT_REQUEST.set(box)  # in the request's own context (see start_eagerly)
            started = time.perf_counter()
            responder = Responder(msg, nc)
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
                self._done(info, stats, responder, False, time.perf_counter() - started)
                return
            self._done(info, stats, responder, True, time.perf_counter() - started)

        bound: list[bool] = []
        tasks = self._tasks

        async def _start(msg: Msg) -> None:
            # Straight from the subscription to the request: counted here, its time and
            # errors in _done.
            stats.num_requests += 1
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
                task = start_eagerly(_run(msg, box), box)
                if task is None:
                    return  # it ran to its end without waiting
            else:
                task = asyncio.create_task(_run(msg))
            tasks.add(task)
            task.add_done_callback(self._task_done)

        endpoint.subscription = await nc.subscribe(subject, queue=group, cb=_start)
        self._endpoints.append(endpoint)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)

    def _done(
        self, info: EndpointInfo, stats: EndpointStats, responder: Responder, ok: bool, seconds: float
    ) -> None:
        error = responder.error
        stats.processing_time += int(seconds * 1e9)
        if ok:
            code = 200 if responder.replied else 0
        else:
            stats.num_errors += 1
            stats.last_error = error.message[:1000] if error is not None else "error"
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
        subject = control_subjects("PING", self.name, self.id)[2]
        try:
            await self.nc.request(subject, b"", timeout=timeout)
        except Exception as exc:
            raise TransportError(
                f"service {self.name!r} does not answer its own ping on {subject!r} within {timeout:g} s"
            ) from exc

    async def remove_endpoints(self, subjects: set[str]) -> None:
        """Stop answering on these subjects; they leave the service's info and stats."""
        keep = []
        for endpoint in self._endpoints:
            if endpoint.info.subject in subjects:
                await self._unsubscribe(endpoint)
            else:
                keep.append(endpoint)
        self._endpoints = keep

    async def drain_endpoints(self, subjects: set[str]) -> None:
        """As :meth:`remove_endpoints`, without losing a request: the requests NATS routed here
        before it took the unsubscribe in are still handled (their tasks started) when this
        returns, rather than dropped with the subscription."""
        keep: list[_Endpoint] = []
        draining: list[_Endpoint] = []
        for endpoint in self._endpoints:
            (draining if endpoint.info.subject in subjects else keep).append(endpoint)
        self._endpoints = keep
        for endpoint in draining:
            sub, endpoint.subscription = endpoint.subscription, None
            if sub is not None:
                try:
                    await sub.drain()  # type: ignore[no-untyped-call]
                except Exception:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    @staticmethod
    async def _unsubscribe(endpoint: _Endpoint) -> None:
        sub, endpoint.subscription = endpoint.subscription, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish; False if some were still running at the end."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def stop(self, *, grace: float = 0.0) -> None:
        """Take no more requests and leave the micro protocol; after ``grace`` seconds for the
        requests in flight, cancel the rest (each answers a 503)."""
        endpoints, self._endpoints = self._endpoints, []
        for endpoint in endpoints:
            await self._unsubscribe(endpoint)
        control, self._control = self._control, []
        for sub in control:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        if grace > 0:
            await self.wait_idle(grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
