"""The worker's endpoints: the only code that reads requests from and writes replies to NATS.

Each handler decodes its request, calls the worker, the served model or a replica, and encodes
the typed reply (:mod:`workers.replies`) in the request's encoding; an error it raises is
answered by the service host (``broker_client.runtime.ServiceHost``) as a natserve error.

:class:`WorkerEndpoints`, the worker's own subjects:

* ``<prefix>.worker.<id>.launch``     ``WorkerLaunch`` → ``WorkerLaunchReply`` once the replica serves
* ``<prefix>.worker.<id>.terminate``  ``WorkerTerminate`` → ``{}`` (409 when ``if_idle_for`` is
  given and a replica had a request more recently)
* ``<prefix>.worker.<id>.info``       → ``WorkerInfo``
* ``<prefix>.workers.resync``          a heartbeat now (and ``WorkerInfo`` to a request)

:class:`ModelEndpoints`, the subjects of one model uid, added with its first replica:

* ``<prefix>.model.<uid>.generate`` / ``.chat`` / ``.embed`` in the queue group
  ``<prefix>.model.<uid>``, so NATS spreads requests over every worker serving the uid; inside a
  worker the least busy local replica takes it (:meth:`ServedModel.pick`), and a saturated
  worker passes it on (:mod:`workers.balancing`) on the ``overflow`` subjects, served alike;
* ``<prefix>.model.<uid>.cancel`` in a queue group of this worker's own, so every worker sees every
  cancel and the one holding the request stops it. Only that one answers, so a cancel is best
  sent as a plain publish; a request gets ``{"request_id", "cancelled": true}`` from the holder.
* ``<prefix>.model.<uid>.keepalive.<worker id>``: the acks of the readers of its streams that
  asked for the keepalive (``"keepalive": N``); such a stream stops, a 503, once its reader has
  been silent for ``keepalive_silence`` seconds (``broker_client._keepalive``, through
  ``broker_client.runtime.Keepalives``).

Endpoints are per uid rather than per replica because ``ServiceHost.remove_endpoints`` removes
by subject: two replicas of one uid on one worker, each with its own endpoints, could not be
removed one at a time.

Model requests run eagerly in the subscription's task until they first wait (see
``ServiceHost.add_endpoint``); a streamed reply is its chunks, then the empty end message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from typing import Any, Protocol

from nats.aio.msg import Msg

from broker_client import (
    BadRequest,
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Subjects,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    WorkerTerminate,
)
from broker_client.runtime import KEEPALIVE_SILENCE, Keepalives, NATSConnection, Responder, ServiceHost

from . import balancing
from .limits import WorkerLimits
from .served import ServedModel

logger = logging.getLogger(__name__)

__all__ = ["ModelEndpoints", "WorkerCommands", "WorkerEndpoints"]

_OPERATIONS = ("generate", "chat", "embed")
_REQUEST_ID_MAX = 128


class WorkerCommands(Protocol):
    """What the worker's own endpoints call (:class:`workers.service.Worker`)."""

    async def launch(self, launch: WorkerLaunch) -> WorkerLaunchReply: ...

    async def terminate(
        self, model_uid: str, replica_index: int | None = None, *, if_idle_for: float | None = None
    ) -> None: ...

    def info(self) -> WorkerInfo: ...

    def resync(self) -> None: ...


class WorkerEndpoints:
    """The worker's launch, terminate and info endpoints and its resync subscription."""

    def __init__(
        self,
        host: ServiceHost,
        nc: NATSConnection,
        subjects: Subjects,
        worker_id: str,
        worker: WorkerCommands,
    ) -> None:
        self.host = host
        self.nc = nc
        self.subjects = subjects
        self.worker_id = worker_id
        self.worker = worker
        self._resync_sub: Any = None

    async def open(self) -> None:
        meta = {"worker_id": self.worker_id}
        for verb, handler in (
            ("launch", self._on_launch),
            ("terminate", self._on_terminate),
            ("info", self._on_info),
        ):
            await self.host.add_endpoint(
                verb, self.subjects.worker(self.worker_id, verb), handler, metadata=meta
            )
        self._resync_sub = await self.nc.subscribe(self.subjects.workers_resync, cb=self._on_resync)
        await self.host.until_subscribed()

    async def stop_launches(self) -> None:
        """Take no more launches: they go to other workers."""
        await self.host.remove_endpoints({self.subjects.worker(self.worker_id, "launch")})

    async def close(self) -> None:
        """Leave the resync subject (the service host's endpoints go with the host)."""
        sub, self._resync_sub = self._resync_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_info(self, resp: Responder) -> None:
        await resp.respond(self.worker.info().model_dump(mode="json"))

    async def _on_launch(self, resp: Responder) -> None:
        reply = await self.worker.launch(resp.parse(WorkerLaunch))
        await resp.respond(reply.model_dump(mode="json"))

    async def _on_terminate(self, resp: Responder) -> None:
        req = resp.parse(WorkerTerminate)
        await self.worker.terminate(req.model_uid, req.replica_index, if_idle_for=req.if_idle_for)
        await resp.respond({})

    async def _on_resync(self, msg: Msg) -> None:
        self.worker.resync()
        if msg.reply:
            with contextlib.suppress(Exception):
                await Responder(msg, self.nc).respond(self.worker.info().model_dump(mode="json"))


class ModelEndpoints:
    """The endpoints of one model uid, answered by the replicas of its :class:`ServedModel`."""

    def __init__(
        self,
        host: ServiceHost,
        subjects: Subjects,
        served: ServedModel,
        *,
        limits: WorkerLimits | None = None,
        keepalive_silence: float = KEEPALIVE_SILENCE,
    ) -> None:
        self.host = host
        self.subjects = subjects
        self.served = served
        self.model_uid = served.model_uid
        self.worker_id = served.worker_id
        # The worker's policy; here for its request body limit.
        self.limits = limits or WorkerLimits()
        self._subjects: set[str] = set()
        self.keepalives = Keepalives(
            subjects.model_keepalive(served.model_uid, served.worker_id), silence=keepalive_silence
        )
        self._keepalive_sub: Any = None

    @property
    def subjects_served(self) -> set[str]:
        return set(self._subjects)

    async def open(self) -> None:
        """Serve the uid's subjects (once: a second replica of the uid finds them there)."""
        if self._subjects:
            return
        uid = self.model_uid
        group = self.subjects.model_queue_group(uid)
        meta = {"model_uid": uid}
        # partials rather than methods per operation: a coroutine less per request.
        handlers = {
            "generate": functools.partial(self._serve, operation="generate", model=GenerateRequest),
            "chat": functools.partial(self._serve, operation="chat", model=ChatRequest),
            "embed": functools.partial(self._serve, operation="embed", model=EmbedRequest),
        }
        try:
            for op in _OPERATIONS:
                subject = self.subjects.model(uid, op)
                await self.host.add_endpoint(
                    f"{uid}-{op}", subject, handlers[op], queue_group=group, metadata=meta, eager=True
                )
                self._subjects.add(subject)
            for op in _OPERATIONS:
                # Requests a saturated replica passed on (workers/balancing.py).
                subject = self.subjects.model_overflow(uid, op)
                await self.host.add_endpoint(
                    f"{uid}-{op}-overflow",
                    subject,
                    handlers[op],
                    queue_group=group,
                    metadata=meta,
                    eager=True,
                )
                self._subjects.add(subject)
            subject = self.subjects.model(uid, "cancel")
            # Each worker its own group: every worker must see a cancel to find the request.
            await self.host.add_endpoint(
                f"{uid}-cancel",
                subject,
                self._cancel,
                queue_group=f"{group}.cancel.{self.worker_id}",
                metadata=meta,
            )
            self._subjects.add(subject)
            # A plain subscription: acks are published, nobody waits for an answer.
            self._keepalive_sub = await self.host.nc.subscribe(
                self.keepalives.subject, cb=self.keepalives.on_ack
            )
        except BaseException:
            await self.close()
            raise
        # Subscriptions must reach the server before the launch reply says "ready".
        await self.host.until_subscribed()

    async def stop_accepting(self) -> None:
        """Take no new requests (they go to other workers, or get no responders); cancels still
        reach the requests that are draining."""
        cancel = self.subjects.model(self.model_uid, "cancel")
        await self._remove({s for s in self._subjects if s != cancel})

    async def drain(self) -> None:
        """Take no new requests, losing none: the ones already routed here are still served
        (an idle stop: the registry answers the uid's subjects meanwhile)."""
        cancel = self.subjects.model(self.model_uid, "cancel")
        subjects = {s for s in self._subjects if s != cancel}
        if subjects:
            self._subjects -= subjects
            await self.host.drain_endpoints(subjects)

    async def close(self) -> None:
        await self._remove(set(self._subjects))
        sub, self._keepalive_sub = self._keepalive_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _remove(self, subjects: set[str]) -> None:
        if subjects:
            self._subjects -= subjects
            await self.host.remove_endpoints(subjects)

    # -- requests

    @staticmethod
    def _request_id(resp: Responder, body_id: str | None) -> str:
        rid = body_id or resp.request_id
        if not rid:
            return uuid.uuid4().hex
        if len(rid) > _REQUEST_ID_MAX:
            raise BadRequest(f"request_id is {len(rid)} characters long; at most {_REQUEST_ID_MAX}")
        return rid

    async def _serve(
        self, resp: Responder, operation: str, model: type[GenerateRequest | ChatRequest | EmbedRequest]
    ) -> None:
        msg = resp.msg
        if not msg.reply:
            return  # nobody to answer: do not spend a replica on it
        if self.limits.max_request_bytes is not None:
            self.limits.check_body(len(msg.data), resp.subject)
        served = self.served
        replicas = served.replicas
        if len(replicas) == 1:
            # One replica here, the common case: the rules of pick and balancing.saturated
            # without their lists (its capacity is checked again when it admits the request).
            (only,) = replicas.values()
            ready = only.status == "ready"
            if ready and len(only.flights) >= only.capacity and await self._pass_on(resp, operation):
                return
            req = resp.parse(model)
            replica = only if ready and operation in only.abilities else served.pick(operation)
        else:
            if balancing.saturated(replicas.values()) and await self._pass_on(resp, operation):
                return
            req = resp.parse(model)
            replica = served.pick(operation)
        with replica.track(self._request_id(resp, req.request_id)) as flight:
            resp.accept(self.worker_id, req.ack)
            if isinstance(req, EmbedRequest):
                await resp.respond(await replica.embed(req, flight))
                return
            config = req.generate_config
            if config is None or not config.stream:
                if isinstance(req, GenerateRequest):
                    await resp.respond(await replica.generate(req, flight))
                else:
                    await resp.respond(await replica.chat(req, flight))
                return
            chunks = await (
                replica.generate_stream(req, flight)
                if isinstance(req, GenerateRequest)
                else replica.chat_stream(req, flight)
            )
            if not req.keepalive:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await resp.chunk(chunk)
                await resp.end_stream()
                return
            # Its reader acknowledges: a chunk raises StreamAbandoned (a 503) once it has been
            # silent too long, and closing the chunks stops the generation.
            self.keepalives.arm(resp, req.keepalive)
            try:
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await resp.chunk(chunk)
            finally:
                self.keepalives.disarm(resp)
            await resp.end_stream()

    async def _pass_on(self, resp: Responder, operation: str) -> bool:
        """Saturated here: hand the request to another replica of the uid (balancing.py)."""
        subject = self.subjects.model_overflow(self.model_uid, operation)
        if await balancing.pass_on(resp.nc, resp.msg, subject, self.served.replicas.values()):
            self.served.passed_on += 1
            return True
        return False

    async def _cancel(self, resp: Responder) -> None:
        self.limits.check_body(len(resp.msg.data), resp.subject)
        body = resp.body()
        rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str) or not rid:
            raise BadRequest('cancel needs {"request_id": "..."}')
        replica = self.served.cancel(rid)
        if replica is not None:
            logger.debug("cancelled request %r on %s", rid, replica.label)
            await resp.respond({"request_id": rid, "cancelled": True})
        # Else other workers may hold it; staying silent lets the holder's answer be the one seen.
