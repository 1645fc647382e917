"""The registry's endpoints: the only code that decodes what arrives and writes replies.

Subjects under the prefix (``nats micro`` service ``natserve-registry``):

    registry.register / unregister / list / get      custom-model registrations (SQL)
    models.launch / list / describe / terminate      running models and their replicas (SQL)
    workers.list                                     the workers' last heartbeats (memory)

and the heartbeats workers publish on ``workers.<id>.heartbeat``. Each handler parses its request
(a 400 for a malformed one), calls the launcher, the repository or the directory, and answers
with a view (``views.py``); the errors they raise become the error replies.

A heartbeat is taken only when every field is valid (``WorkerInfo`` is strict and bounded: a
worker id that is a subject token, finite times, a bounded heartbeat interval...) and the body's
``worker_id`` is the one its subject names, which NATS permissions can tie to the worker's
credentials (``deploy/nats-server.conf``). Anything else is ignored, with a warning at most every
``_WARN_EVERY`` seconds: a flood of forged beats must not flood the log either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import ValidationError

from broker_client import (
    BadRequest,
    DescribeRequest,
    GetRegistrationRequest,
    LaunchRequest,
    ListRegistrationsRequest,
    NotFound,
    RegisterRequest,
    Subjects,
    TerminateRequest,
    UnregisterRequest,
    WorkerInfo,
    codec,
    format_validation_error,
    parse_definition,
)
from broker_client.runtime import Responder

from .directory import WorkerDirectory
from .launcher import Launcher
from .liveness import Liveness
from .metrics import RegistryMetrics
from .models import ModelRow
from .ondemand import OnDemand
from .records import WorkerRecords
from .repository import RegistryRepository
from .views import model_description, registration_summary, registration_view, worker_view

__all__ = ["Handler", "RegistryEndpoints"]

logger = logging.getLogger(__name__)

Handler = Callable[[Responder], Awaitable[None]]

# Seconds between two warnings about ignored heartbeats (the ones between are counted).
_WARN_EVERY = 10.0


class _IgnoredBeats:
    """Warns about heartbeats the registry ignores: the first at once, then at most one every
    ``_WARN_EVERY`` seconds, saying how many were ignored since."""

    def __init__(self) -> None:
        self._last = -_WARN_EVERY
        self._since = 0

    def note(self, subject: str, why: str) -> None:
        now = time.monotonic()
        self._since += 1
        if now - self._last < _WARN_EVERY:
            return
        others = f" (and {self._since - 1} more since the last warning)" if self._since > 1 else ""
        logger.warning("ignoring a heartbeat on %s: %s%s", subject, why, others)
        self._last, self._since = now, 0


class RegistryEndpoints:
    """The request handlers of one registry, and its heartbeat handler."""

    def __init__(
        self,
        repository: RegistryRepository,
        directory: WorkerDirectory,
        launcher: Launcher,
        liveness: Liveness,
        records: WorkerRecords,
        metrics: RegistryMetrics,
        subjects: Subjects,
        *,
        ondemand: OnDemand | None = None,
    ) -> None:
        self.ondemand = ondemand
        self.repo = repository
        self.directory = directory
        self.launcher = launcher
        self.liveness = liveness
        self.records = records
        self.metrics = metrics
        self.subjects = subjects
        self._ignored = _IgnoredBeats()

    def routes(self, subjects: Subjects) -> list[tuple[str, str, Handler]]:
        """``(endpoint name, subject, handler)`` for each endpoint of the service."""
        s = subjects
        return [
            ("register", s.registry_register, self.register),
            ("unregister", s.registry_unregister, self.unregister),
            ("list_registrations", s.registry_list, self.list_registrations),
            ("get_registration", s.registry_get, self.get_registration),
            ("launch", s.models_launch, self.launch),
            ("list_models", s.models_list, self.list_models),
            ("describe", s.models_describe, self.describe),
            ("terminate", s.models_terminate, self.terminate),
            ("list_workers", s.workers_list, self.list_workers),
        ]

    # ------------------------------------------------------------------ heartbeats

    async def on_heartbeat(self, msg: Msg) -> None:
        subject = msg.subject
        worker_id = self.subjects.heartbeat_worker(subject)
        if worker_id is None:
            self._ignored.note(subject, "not a worker's heartbeat subject")
            return
        try:
            body = codec.decode(msg.data, codec.detect(msg.data, msg.headers))
            info = WorkerInfo.model_validate(body)
        except BadRequest as exc:
            self._ignored.note(subject, exc.message)
            return
        except ValidationError as exc:
            self._ignored.note(subject, f"invalid value: {format_validation_error(exc)}"[:1000])
            return
        if info.worker_id != worker_id:
            self._ignored.note(
                subject, f"its worker_id {info.worker_id!r} is not the one its subject names ({worker_id!r})"
            )
            return
        entry, changed = self.directory.heard(info)
        if changed:
            self.liveness.wake()  # a worker joined, or says it is stopping or stopped
        self.records.note(entry)

    # ------------------------------------------------------------------ registrations

    async def register(self, resp: Responder) -> None:
        req = resp.parse(RegisterRequest)
        definition = parse_definition(req.model_type, req.model)
        stored = definition.model_dump(mode="json", exclude_none=True)
        await self.repo.add_registration(req.model_type, definition.model_name, stored, req.persist)
        logger.info("registered %s model %r (persist=%s)", req.model_type, definition.model_name, req.persist)
        await resp.respond({"model_type": req.model_type, "model_name": definition.model_name})

    async def unregister(self, resp: Responder) -> None:
        req = resp.parse(UnregisterRequest)
        if not await self.repo.delete_registration(req.model_type, req.model_name):
            raise NotFound(
                f"model_name {req.model_name!r} is not registered for model_type {req.model_type!r}"
            )
        logger.info("unregistered %s model %r", req.model_type, req.model_name)
        await resp.respond({})

    async def list_registrations(self, resp: Responder) -> None:
        req = resp.parse(ListRegistrationsRequest)
        rows = await self.repo.list_registrations(req.model_type)
        await resp.respond({"registrations": [registration_summary(r) for r in rows]})

    async def get_registration(self, resp: Responder) -> None:
        req = resp.parse(GetRegistrationRequest)
        row = await self.repo.get_registration(req.model_type, req.model_name)
        if row is None:
            raise NotFound(
                f"model_name {req.model_name!r} is not registered for model_type {req.model_type!r}"
            )
        await resp.respond(registration_view(row))

    # ------------------------------------------------------------------ models

    async def launch(self, resp: Responder) -> None:
        req = resp.parse(LaunchRequest)
        uid, task = await self.launcher.start(req)
        if req.wait:
            await self.launcher.until_ready(uid, task)
        await resp.respond({"model_uid": uid})

    async def list_models(self, resp: Responder) -> None:
        resp.body()
        rows = await self.repo.list_models()
        await resp.respond(
            {
                "models": {
                    row.model_uid: model_description(row, self.directory, self._scale_state(row))
                    for row in rows
                }
            }
        )

    def _scale_state(self, row: ModelRow) -> tuple[str, int] | None:
        return self.ondemand.state_of(row.model_uid) if self.ondemand is not None else None

    async def describe(self, resp: Responder) -> None:
        req = resp.parse(DescribeRequest)
        row = await self.repo.get_model(req.model_uid)
        if row is None:
            raise self.launcher.not_running(req.model_uid)
        await resp.respond(model_description(row, self.directory, self._scale_state(row)))

    async def terminate(self, resp: Responder) -> None:
        req = resp.parse(TerminateRequest)
        await self.launcher.terminate(req.model_uid)
        await resp.respond({})

    # ------------------------------------------------------------------ workers

    async def list_workers(self, resp: Responder) -> None:
        resp.body()  # a malformed body is still a 400, even with nothing to read from it
        now = time.monotonic()
        entries = sorted(self.directory.entries(), key=lambda e: e.info.worker_id)
        workers = [worker_view(e, self.directory, now) for e in entries]
        # The registry's last launch failures ride along for `natserve status`.
        await resp.respond({"workers": workers, "recent_failures": self.metrics.recent_failures()})
