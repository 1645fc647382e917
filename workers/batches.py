"""Batch requests: the worker pulls them from JetStream while its replicas have free batch slots.

For every model uid it serves, a :class:`BatchPuller` binds to the uid's work-queue stream
(``<prefix>_batch_<uid>``, durable pull consumer ``workers``; the registry makes both when a job
is submitted) and fetches only as many requests as it has free batch slots: ``batch_slots`` per
ready replica, and never past the replica's capacity counting the online requests in flight;
none while the uid's replicas have ``batch_pause_at`` online requests each in flight (and for a
second after). A batch request runs on a replica like an online one (``Replica.track``, the same
engine), so online requests share it with at most ``batch_slots`` batch requests per replica,
and only until those end once online traffic comes.

Each request is marked in progress every ``IN_PROGRESS_EVERY`` seconds while it runs, and
acknowledged only after its result is stored in the results stream (the ``PubAck``), with the
``Nats-Msg-Id`` ``<batch id>:<custom id>`` so that JetStream drops a second copy. A worker
SIGKILLed mid-request leaves it unacknowledged: JetStream delivers it again after ``ACK_WAIT``.
A request the replica cannot take now (429, or 503 while it stops) is handed back (``nak``) for
another worker or a later try; after ``MAX_DELIVERIES`` deliveries it is answered with an error
line instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from broker_client import (
    IN_PROGRESS_EVERY,
    MAX_DELIVERIES,
    WORKERS_CONSUMER,
    BatchNames,
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Overloaded,
    ServiceError,
    Unavailable,
    batch_error_line,
    batch_success_line,
)
from broker_client.runtime import NATSConnection

from .served import ServedModel

__all__ = ["DEFAULT_BATCH_SLOTS", "DEFAULT_PAUSE_AT", "BatchPuller"]

logger = logging.getLogger(__name__)

# Concurrent batch requests per ready replica. Two leave an online request at concurrency 8
# sharing the engine with at most two batch rows (bench/batch.py measures the online p99 with
# and without a job running).
DEFAULT_BATCH_SLOTS = 2
# Online requests in flight per ready replica at which it takes no new batch requests (0: never
# pauses). On two CPU cores, 8 online callers with two batch rows beside them had a 61% higher
# p99 (bench/batch.py, tiny Llama): the CPU is the batch's only room, and it is the online
# requests' too. A GPU replica, whose extra rows cost little, can take a higher figure or 0.
DEFAULT_PAUSE_AT = 4
# How long one fetch waits for requests; also how soon a new stream is noticed.
_FETCH_WAIT = 1.0
# While paused for online traffic, the online load is looked at this often, and the pause lasts
# this long after the last look that found it busy: callers at concurrency 8 leave their replica
# with 7 requests for a moment between two of theirs, which must not end the pause.
_PAUSED_LOOK = 0.25
_PAUSE_HOLD = 1.0
# Between two looks for a stream that does not exist yet (no job was ever submitted for the uid):
# the first job of a uid waits up to this long for its workers, at one consumer-info request per
# look per worker.
_NO_STREAM_WAIT = 0.5
# A result that cannot be stored (the nats-server restarting) is tried again for this long; past
# it the request stays unacknowledged and is delivered again.
_PUBLISH_FOR = 60.0


class _UidPuller:
    """The pull loop of one served uid."""

    def __init__(self, owner: BatchPuller, served: ServedModel) -> None:
        self.owner = owner
        self.served = served
        self.uid = served.model_uid
        self.inflight: set[asyncio.Task[None]] = set()
        # Requests holding a batch slot: running on a replica. A slot is free again as soon as its
        # request is answered, while the answer is still being stored (a PubAck's round trip,
        # 1-5 ms on two loaded cores, is a tenth of a tiny-model request).
        self.running = 0
        self.stopping = False
        # When the replicas last had pause_at online requests in flight.
        self.busy_at = -_PAUSE_HOLD
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._loop(), name=f"natserve-batches {self.uid}")

    def free_slots(self) -> int:
        ready = [r for r in self.served.replicas.values() if r.accepting]
        if not ready:
            return 0
        flights = sum(len(r.flights) for r in ready)
        pause_at = self.owner.pause_at
        now = time.monotonic()
        if pause_at and flights - self.running >= pause_at * len(ready):
            self.busy_at = now
        if now - self.busy_at < _PAUSE_HOLD:
            return 0  # online traffic: the batch waits (requests running end as usual)
        room = sum(r.capacity for r in ready) - flights
        return max(0, min(self.owner.slots * len(ready) - self.running, room))

    async def _loop(self) -> None:
        names = self.owner.names
        stream = names.requests_stream(self.uid)
        sub: JetStreamContext.PullSubscription | None = None
        while not self.stopping:
            free = self.free_slots()
            if free <= 0:
                self.wake.clear()
                # Woken when a batch request ends; the bound covers online requests ending.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1 if self.running else _PAUSED_LOOK):
                        await self.wake.wait()
                continue
            try:
                if sub is None:
                    await self.owner.js.consumer_info(stream, WORKERS_CONSUMER)
                    sub = await self.owner.js.pull_subscribe_bind(durable=WORKERS_CONSUMER, stream=stream)
                msgs = await sub.fetch(free, timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.js.errors.NotFoundError:
                await self._drop(sub)
                sub = None
                await asyncio.sleep(_NO_STREAM_WAIT)  # a service timer: no job for this uid yet
                continue
            except asyncio.CancelledError:
                await self._drop(sub)
                raise
            except Exception as exc:
                # JetStream unavailable for a moment (the server restarting): bind again later.
                logger.debug("batch fetch for %s failed: %r", self.uid, exc)
                await self._drop(sub)
                sub = None
                await asyncio.sleep(_FETCH_WAIT)  # a service timer: wait for the server to return
                continue
            if self.stopping:
                await self._drop(sub)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.nak()
                return
            for msg in msgs:
                self.running += 1
                task = asyncio.create_task(self._run(msg))
                self.inflight.add(task)
                task.add_done_callback(self._done)
        await self._drop(sub)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self.wake.set()

    @staticmethod
    async def _drop(sub: JetStreamContext.PullSubscription | None) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _free_slot(self) -> None:
        self.running -= 1
        self.wake.set()

    async def _run(self, msg: Msg) -> None:
        try:
            item = json.loads(msg.data)
            batch_id, custom_id = item["batch_id"], item["custom_id"]
        except (ValueError, KeyError, TypeError):
            self._free_slot()
            logger.warning("dropping a malformed batch request on %s", msg.subject)
            with contextlib.suppress(Exception):
                await msg.term()
            return
        beat = asyncio.create_task(self._in_progress(msg))
        try:
            try:
                line = await self._answer(msg, item)
            finally:
                self._free_slot()
            if line is None:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)
                return
            failed = line["error"] is not None
            result = {"line": item.get("line"), "custom_id": custom_id, "failed": failed, "output": line}
            if await self._store(batch_id, custom_id, json.dumps(result).encode()):
                with contextlib.suppress(Exception):
                    await msg.ack()
        finally:
            beat.cancel()

    async def _in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(IN_PROGRESS_EVERY)  # the in-progress beat, a third of ACK_WAIT
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _answer(self, msg: Msg, item: dict[str, Any]) -> dict[str, Any] | None:
        """The output line of one request; None to hand it back (nak) for a later try."""
        rid = uuid.uuid4().hex
        custom_id = item["custom_id"]
        delivered = msg.metadata.num_delivered or 1
        if delivered > MAX_DELIVERIES:
            return batch_error_line(
                rid,
                custom_id,
                500,
                f"the request was delivered {delivered - 1} times and never answered "
                f"(its worker died each time); given up",
                "internal_error",
            )
        operation = item.get("operation")
        try:
            replica = self.served.pick(str(operation))
            body = item.get("request")
            with replica.track(rid) as flight:
                if operation == "chat":
                    reply: Any = await replica.chat(ChatRequest.model_validate(body), flight)
                elif operation == "generate":
                    reply = await replica.generate(GenerateRequest.model_validate(body), flight)
                else:
                    reply = await replica.embed(EmbedRequest.model_validate(body), flight)
        except (Overloaded, Unavailable):
            return None  # busy or stopping here: another worker, or a later try
        except ServiceError as exc:
            return batch_error_line(rid, custom_id, exc.code, exc.message, type(exc).__name__)
        except Exception as exc:
            logger.warning("batch request %s of %s failed", custom_id, self.uid, exc_info=True)
            return batch_error_line(rid, custom_id, 500, f"{type(exc).__name__}: {exc}", "InternalError")
        return batch_success_line(rid, custom_id, reply)

    async def _store(self, batch_id: str, custom_id: str, data: bytes) -> bool:
        names = self.owner.names
        headers = {"Nats-Msg-Id": names.msg_id(batch_id, custom_id)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PUBLISH_FOR
        while True:
            try:
                await self.owner.js.publish(names.results_subject(batch_id), data, headers=headers, timeout=5)
                return True
            except Exception as exc:
                if loop.time() > deadline:
                    logger.warning("result %s of %s not stored: %r", custom_id, batch_id, exc)
                    return False
                await asyncio.sleep(0.5)  # a retry timer: the server is restarting

    async def stop(self, grace: float) -> None:
        self.stopping = True
        self.task.cancel()
        # Bounded: a cancel that lands inside a nats-py request can be lost there, and the loop
        # then ends at its next turn (``stopping``).
        await asyncio.wait({self.task}, timeout=_FETCH_WAIT + 1)
        if self.inflight:
            _, late = await asyncio.wait(set(self.inflight), timeout=grace)
            for task in late:
                task.cancel()  # unacknowledged: JetStream delivers it again


class BatchPuller:
    """The batch pull loops of one worker: one per served uid, following ``models()``."""

    def __init__(
        self,
        nc: NATSConnection,
        names: BatchNames,
        models: Callable[[], dict[str, ServedModel]],
        *,
        slots: int = DEFAULT_BATCH_SLOTS,
        pause_at: int = DEFAULT_PAUSE_AT,
    ) -> None:
        self.pause_at = pause_at
        self.names = names
        self.js = nc.jetstream()
        self.models = models
        self.slots = slots
        self._pullers: dict[str, _UidPuller] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def sync(self) -> None:
        """Pull for the uids served now (call when the served models change)."""
        if self.slots <= 0:
            return
        served = self.models()
        for uid in list(self._pullers):
            if uid not in served or self._pullers[uid].served is not served[uid]:
                task = asyncio.ensure_future(self._pullers.pop(uid).stop(0))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        for uid, model in served.items():
            if uid not in self._pullers:
                self._pullers[uid] = _UidPuller(self, model)

    async def stop(self, grace: float) -> None:
        pullers, self._pullers = list(self._pullers.values()), {}
        await asyncio.gather(*(p.stop(grace) for p in pullers))
