"""Models that start on demand and stop when idle: the registry's side (NATS, SQL).

A model launched with ``min_replicas`` and/or ``idle_timeout`` (or whose definition's ``launch``
key gives them) scales:

* **Held while it has no replica.** While such a model has no replica, the registry subscribes
  to its request subjects (``<prefix>.model.<uid>.generate`` / ``chat`` / ``embed``) in the
  uid's queue group, and only then: live replicas get the traffic. A request is checked as a
  replica would (a 400 at once for a malformed one or an ability the model lacks) and held
  (:class:`~.hold.HoldQueue`: past ``max_requests`` a 429 naming the bound). The first one starts
  the model (``Launcher.start_replicas``: placed as its launch asked, on the pinned worker with
  its ``n_gpu``, eviction included); once its
  replicas are ready the held requests are handed to them unchanged, with their original reply
  subjects, on ``<prefix>.model.<uid>.overflow.<op>`` (as ``workers/balancing.py`` passes a
  request on), and the subscriptions are drained, the requests that still arrive meanwhile
  going the same way. A caller sees one slow first reply. A request held ``max_age`` seconds
  gets a 504 naming the wait; when the start fails, every held request gets its error.
* **Cancelled while held.** The registry also subscribes to ``<prefix>.model.<uid>.cancel``
  (outside any queue group, as each worker does: every holder sees every cancel). A cancel
  naming a held request's ``request_id`` takes it out of the hold and answers it as a worker
  answers a cancelled request: a 503 ``request '<id>' on model '<uid>' was cancelled``, and
  ``{"request_id", "cancelled": true}`` to a cancel sent as a request.
* **Backed off after a failed start.** A start that failed is not tried again for a window
  (:class:`~.backoff.StartBackoff`: 2 s doubling to 60 s, reset by a start that succeeds);
  meanwhile a request gets a 503 at once naming the model, the last failure and when the next
  try is, and the event of the failure (stage ``backoff``) says how long the window is.
* **Stopped when idle.** Every ``interval`` the registry looks at the replicas' idleness in the
  heartbeats (``ReplicaInfo.idle_for``) and stops the ones idle past the model's idle timeout,
  down to ``min_replicas`` (``decisions.idle_stops``), with a terminate that says ``if_idle_for``:
  the worker refuses (409) when a request came since its heartbeat. Before the last replica
  stops, the registry subscribes to the subjects, so no request meets "no responders"; a worker
  stopping the last one drains its subscriptions, so none is lost either.
* **Evicted for a launch.** When a launch does not fit (``Launcher`` asks :meth:`make_room`),
  idle replicas of such models beyond their minimum are stopped, least recently used first,
  until it does (``decisions.choose_evictions``); the launch is placed again on the heartbeats
  that follow.

Each start and stop is a model event with a ``reason``: ``on_demand``, ``idle_timeout``,
``evicted_for <uid>``, ``scaled_to_zero``, ``start_failed`` (a ``backoff`` event). Several
registries may serve one prefix: each holds what NATS hands it, the replica rows' unique index
decides which one starts a model, and the others hand their requests over once a worker
reports the model's replicas ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from broker_client import (
    BadRequest,
    ChatRequest,
    Conflict,
    EmbedRequest,
    GenerateRequest,
    NatserveError,
    NotFound,
    ServerTimeout,
    Subjects,
    Unavailable,
)
from broker_client.runtime import NATSConnection, Responder

from ..directory import WorkerDirectory
from ..events import RegistryEvents
from ..launcher import Launcher
from ..models import ModelRow
from ..placement import Placement, place_replicas
from ..plan import LaunchPlan
from ..repository import RegistryRepository
from . import decisions
from .backoff import FIRST_BACKOFF, MAX_BACKOFF, StartBackoff
from .hold import DEFAULT_HOLD_MAX_AGE, DEFAULT_HOLD_MAX_REQUESTS, HoldQueue

__all__ = ["OnDemand"]

logger = logging.getLogger(__name__)

_OPERATIONS: dict[str, type[BaseModel]] = {
    "generate": GenerateRequest,
    "chat": ChatRequest,
    "embed": EmbedRequest,
}
# Seconds between two reads of the models table by a registry that has seen no model that
# scales (another registry may launch one): the pass costs one SELECT of every model.
_IDLE_POOL_READ = 5.0
# How long a launch waits for the heartbeats that show the memory its evictions gave back:
# workers beat at once when a replica goes; their interval (2 s by default) bounds it anyway.
_FRESH_BEAT_WAIT = 5.0


@dataclass
class _Hold:
    """The registry answering one uid's subjects: its subscriptions, held requests and state."""

    uid: str
    abilities: tuple[str, ...]
    # (operation, message, request_id): the id a cancel names.
    queue: HoldQueue[tuple[str, Msg, str | None]]
    # The failed starts in a row: none is tried within their window. A start that succeeds
    # hands over and closes the hold, so the next one begins with none.
    backoff: StartBackoff
    # "stopping" (its last replica is being stopped), "zero" (no replica, none starting),
    # "starting", "handing_over" (replicas are up: what arrives goes to them).
    state: str = "zero"
    subs: list[Subscription] = field(default_factory=list)
    start: asyncio.Task[None] | None = None
    expiry: asyncio.Task[None] | None = None


class OnDemand:
    """Starts on demand, idle stops and evictions for the models that scale."""

    def __init__(
        self,
        nc: NATSConnection,
        repository: RegistryRepository,
        directory: WorkerDirectory,
        launcher: Launcher,
        events: RegistryEvents,
        subjects: Subjects,
        *,
        max_requests: int = DEFAULT_HOLD_MAX_REQUESTS,
        max_age: float = DEFAULT_HOLD_MAX_AGE,
        interval: float = 0.5,
        backoff_first: float = FIRST_BACKOFF,
        backoff_max: float = MAX_BACKOFF,
    ) -> None:
        self.nc = nc
        self.repo = repository
        self.directory = directory
        self.launcher = launcher
        self.events = events
        self.subjects = subjects
        self.max_requests = max_requests
        self.max_age = max_age
        self.interval = interval
        # Checked here, not at a model's first failure: StartBackoff refuses bad windows.
        StartBackoff("", first=backoff_first, longest=backoff_max)
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self._holds: dict[str, _Hold] = {}
        # Uids whose replicas are being stopped now (an idle stop, an eviction).
        self._stopping: set[str] = set()
        # Whether the last pass saw a model that scales, and when the last pass read them: a
        # pool without one is read every _IDLE_POOL_READ seconds only, not every interval.
        self._any_scaling = True
        self._last_read = -_IDLE_POOL_READ
        self._task: asyncio.Task[None] | None = None
        launcher.scaling = self

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Answer the subjects of the models left with no replica, and start the idle passes."""
        for row in await self.repo.list_models():
            if row.idle_timeout is not None and row.status == "ready" and not row.replicas:
                await self._open(row.model_uid, self._abilities(row))
        self._task = asyncio.create_task(self._run(), name="natserve-registry on-demand")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for uid in list(self._holds):
            await self._close(uid, Unavailable(f"the registry holding requests for model {uid!r} stopped"))

    # ------------------------------------------------------------------ what views show

    def state_of(self, uid: str) -> tuple[str, int] | None:
        """``(state, held requests)`` of a uid the registry answers now, else None."""
        hold = self._holds.get(uid)
        if hold is None:
            return None
        state = hold.state
        if state == "zero":
            waiting = hold.backoff.waiting(time.monotonic())
            state = "backing_off" if waiting else "scaled_to_zero"
        return state, len(hold.queue)

    # ------------------------------------------------------------------ Launcher's hooks

    async def scaled_to_zero(self, uid: str) -> None:
        self._any_scaling = True
        row = await self.repo.get_model(uid)
        await self._open(uid, self._abilities(row) if row is not None else ())

    async def terminated(self, uid: str) -> None:
        await self._close(uid, NotFound(f"model_uid {uid!r} was terminated while its requests waited"))

    async def make_room(
        self, plan: LaunchPlan, replica: int, *, worker_id: str | None, n_gpu: int | str | None
    ) -> bool:
        rows = await self.repo.list_models()
        idle = self._idle()
        busy = {plan.model_uid, *self._stopping}
        busy.update(r.model_uid for r in rows if self.launcher.launching(r.model_uid))
        candidates = decisions.eviction_candidates(rows, idle, exclude=busy)
        if not candidates:
            return False

        def place(credit: decisions.Credit) -> list[Placement]:
            reserved = self.launcher.memory.snapshot()
            for key, value in credit.items():
                reserved[key] = reserved.get(key, 0) + value
            return place_replicas(
                self.directory.alive(),
                replica,
                worker_id=worker_id,
                n_gpu=n_gpu,
                known=self.directory.ids(),
                need=plan.need,
                reserved=reserved,
                what=plan.label,
            )

        chosen = decisions.choose_evictions(place, candidates)
        if chosen is None:
            return False
        _, victims = chosen
        by_uid = {r.model_uid: r for r in rows}
        since = time.monotonic()
        stopped: set[str] = set()
        for victim in victims:
            row = by_uid[victim.model_uid]
            logger.info(
                "evicting replica %d of %r from %s (idle %.1f s) to make room for %r",
                victim.replica_index,
                victim.model_uid,
                victim.worker_id,
                victim.idle_for,
                plan.model_uid,
            )
            if await self._stop_idle(row, victim, reason=f"evicted_for {plan.model_uid}", if_idle_for=0.0):
                stopped.add(victim.worker_id)
        for w in stopped:
            await self.directory.heard_since(w, since, _FRESH_BEAT_WAIT)
        return bool(stopped)

    # ------------------------------------------------------------------ holding

    @staticmethod
    def _abilities(row: ModelRow | None) -> tuple[str, ...]:
        if row is None:
            return ()
        return tuple(row.definition.get("model_ability") or ())

    async def _open(self, uid: str, abilities: Iterable[str], state: str = "zero") -> _Hold:
        """Answer ``uid``'s request subjects (once; a second call finds them open)."""
        hold = self._holds.get(uid)
        if hold is not None:
            return hold
        hold = _Hold(
            uid,
            tuple(abilities),
            HoldQueue(uid, max_requests=self.max_requests, max_age=self.max_age),
            StartBackoff(uid, first=self.backoff_first, longest=self.backoff_max),
            state=state,
        )
        self._holds[uid] = hold
        group = self.subjects.model_queue_group(uid)
        try:
            for op in _OPERATIONS:
                cb = functools.partial(self._on_request, uid, op)
                hold.subs.append(await self.nc.subscribe(self.subjects.model(uid, op), queue=group, cb=cb))
            # No queue group: every holder of the uid's requests (workers, registries) sees a cancel.
            cancel = functools.partial(self._on_cancel, uid)
            hold.subs.append(await self.nc.subscribe(self.subjects.model(uid, "cancel"), cb=cancel))
            # The subscriptions reach the server before anyone is told the model is there.
            await self.nc.flush()
        except BaseException:
            await self._close(uid, Unavailable(f"the registry cannot answer model {uid!r}'s subjects"))
            raise
        logger.info("answering the subjects of %r while it has no replica", uid)
        return hold

    async def _on_request(self, uid: str, op: str, msg: Msg) -> None:
        hold = self._holds.get(uid)
        if hold is None or hold.state == "handing_over":
            await self._forward(uid, op, msg)
            return
        if not msg.reply:
            return  # nobody waits for an answer: nothing to start the model for
        resp = Responder(msg, self.nc)
        try:
            req = resp.parse(_OPERATIONS[op])
            if hold.abilities and op not in hold.abilities:
                raise BadRequest(f"model {uid!r} cannot {op}: its abilities are {', '.join(hold.abilities)}")
            now = time.monotonic()
            if hold.state == "zero" and hold.backoff.waiting(now):
                # Its last start failed: no launch within the window, a 503 at once.
                raise hold.backoff.refusal(now)
            hold.queue.add((op, msg, getattr(req, "request_id", None)), now)
        except NatserveError as exc:
            with contextlib.suppress(Exception):
                await resp.respond_error(exc)
            return
        if hold.state == "zero":
            self._start(hold)
        if hold.expiry is None or hold.expiry.done():
            hold.expiry = asyncio.create_task(self._expire(hold), name=f"natserve-registry hold {uid}")

    async def _on_cancel(self, uid: str, msg: Msg) -> None:
        """A cancel on the uid's subject: end the held request it names, as a worker would
        (``workers.endpoints.ModelEndpoints._cancel``); silent when it holds none, so the
        holder's answer is the one seen."""
        hold = self._holds.get(uid)
        resp = Responder(msg, self.nc)
        try:
            body = resp.body()
            rid = body.get("request_id") if isinstance(body, dict) else None
            if not isinstance(rid, str) or not rid:
                raise BadRequest(f'cancel needs {{"request_id": "..."}}, got {str(body)[:200]}')
        except NatserveError as exc:
            # A 400, as a worker answers it (to a cancel sent as a request: a publish gets none).
            if msg.reply:
                with contextlib.suppress(Exception):
                    await resp.respond_error(exc)
            return
        if hold is None:
            return
        cancelled = hold.queue.take(lambda item: item[2] == rid)
        if not cancelled:
            return
        error = Unavailable(f"request {rid!r} on model {uid!r} was cancelled")
        for held in cancelled:
            with contextlib.suppress(Exception):
                await Responder(held.item[1], self.nc).respond_error(error)
        logger.debug("cancelled held request %r of %r", rid, uid)
        if msg.reply:
            with contextlib.suppress(Exception):
                await resp.respond({"request_id": rid, "cancelled": True})

    async def _forward(self, uid: str, op: str, msg: Msg) -> None:
        """Hand a request to the uid's replicas, with its reply subject (balancing.py's subject)."""
        with contextlib.suppress(Exception):
            await self.nc.publish(
                self.subjects.model_overflow(uid, op), msg.data, reply=msg.reply, headers=msg.headers
            )

    async def _expire(self, hold: _Hold) -> None:
        while True:
            deadline = hold.queue.next_deadline()
            if deadline is None:
                return
            # A service timer, not a test barrier: the oldest held request's deadline.
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            for held in hold.queue.expired(time.monotonic()):
                msg = held.item[1]
                error = ServerTimeout(
                    f"model {hold.uid!r} did not start within {self.max_age:g} s, the longest a request "
                    f"waits for it (hold max_age; it is {hold.state}); retry later"
                )
                with contextlib.suppress(Exception):
                    await Responder(msg, self.nc).respond_error(error)

    async def _fail_held(self, hold: _Hold, error: NatserveError) -> None:
        for held in hold.queue.take_all():
            msg = held.item[1]
            with contextlib.suppress(Exception):
                await Responder(msg, self.nc).respond_error(error)

    async def _close(self, uid: str, error: NatserveError | None) -> None:
        """Stop answering ``uid``'s subjects; held requests get ``error`` (or are handed over)."""
        hold = self._holds.pop(uid, None)
        if hold is None:
            return
        if hold.start is not None and hold.start is not asyncio.current_task():
            hold.start.cancel()
        if hold.expiry is not None:
            hold.expiry.cancel()
        if error is not None:
            await self._fail_held(hold, error)
        for sub in hold.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _hand_over(self, hold: _Hold) -> None:
        """The uid's replicas are up: what is held and what still arrives goes to them."""
        hold.state = "handing_over"
        for held in hold.queue.take_all():
            op, msg, _ = held.item
            await self._forward(hold.uid, op, msg)
        for sub in hold.subs:
            try:
                # Drained: what NATS routed here meanwhile is forwarded too (_on_request).
                await sub.drain()  # type: ignore[no-untyped-call]
            except Exception:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        hold.subs.clear()
        if hold.expiry is not None:
            hold.expiry.cancel()
        if self._holds.get(hold.uid) is hold:
            del self._holds[hold.uid]
        logger.info("model %r has replicas again: its subjects are theirs", hold.uid)

    # ------------------------------------------------------------------ starting

    def _start(self, hold: _Hold) -> None:
        hold.state = "starting"
        hold.start = asyncio.create_task(self._starting(hold), name=f"natserve-registry on-demand {hold.uid}")

    async def _starting(self, hold: _Hold) -> None:
        uid = hold.uid
        row = await self.repo.get_model(uid)
        if row is None:
            await self._close(uid, NotFound(f"model_uid {uid!r} is not running"))
            return
        if row.replicas:
            # Started meanwhile (by another registry): hand over once a worker reports it ready.
            if await self._until_reported(uid, self.max_age):
                await self._hand_over(hold)
            else:
                hold.state = "zero"
            return
        await self.events.model(
            uid,
            "starting",
            model_name=row.model_name,
            status="starting",
            reason="on_demand",
            message=f"{len(hold.queue)} request(s) waiting: starting {row.replica} replica(s)",
        )
        try:
            await self.launcher.start_replicas(row, reason="on_demand")
        except Conflict as exc:
            now = await self.repo.get_model(uid)
            if now is None or not now.replicas:
                # Not another registry's start (that one recorded replicas): this one was
                # cancelled, the model terminated meanwhile.
                hold.state = "zero"
                await self._fail_held(hold, exc)
                return
            # Another registry is starting it: hand over once a worker reports it ready.
            if not await self._until_reported(uid, self.max_age):
                hold.state = "zero"
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, NatserveError) else Unavailable(f"starting {uid!r} failed: {exc}")
            logger.warning("starting %r on demand failed: %s", uid, error)
            # The window first: a request that comes while the held ones are answered gets the
            # 503 at once, rather than being held with no start to wait for.
            hold.state = "zero"
            window = hold.backoff.failed(error.message, time.monotonic())
            await self._fail_held(hold, error)
            await self._backoff_event(hold, row, error, window)
            return
        await self._hand_over(hold)

    async def _backoff_event(self, hold: _Hold, row: ModelRow, error: NatserveError, window: float) -> None:
        await self.events.model(
            hold.uid,
            "backoff",
            model_name=row.model_name,
            status="ready",
            reason="start_failed",
            message=(
                f"start failed ({error.message}): no start for {window:g} s, requests meanwhile get "
                f"a 503 ({hold.backoff.failures} failed start(s) in a row)"
            ),
        )

    async def _until_reported(self, uid: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(
                r.model_uid == uid and r.status == "ready"
                for info in self.directory.alive()
                for r in info.replicas
            ):
                return True
            await self.directory.next_beat(max(0.0, deadline - time.monotonic()))
        return False

    # ------------------------------------------------------------------ stopping

    def _idle(self) -> dict[tuple[str, int], decisions.IdleReplica]:
        now = time.monotonic()
        alive = [(e.info, e.received) for e in self.directory.entries() if self.directory.is_alive(e, now)]
        return decisions.idle_replicas(alive, now)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("on-demand pass failed")
            # A service timer: the pass looks at the heartbeats, which come at their interval.
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        """One pass: stop the replicas idle past their timeout; answer the subjects of scaling
        models left with no replica (a registry that joined, a start that failed)."""
        if not self.nc.is_connected:
            return
        now = time.monotonic()
        if not self._any_scaling and not self._holds and now - self._last_read < _IDLE_POOL_READ:
            return
        self._last_read = now
        rows = [r for r in await self.repo.list_models() if r.idle_timeout is not None]
        self._any_scaling = bool(rows)
        reported = {
            r.model_uid for info in self.directory.alive() for r in info.replicas if r.status == "ready"
        }
        for row in rows:
            uid = row.model_uid
            if self.launcher.launching(uid) or uid in self._stopping:
                continue
            hold = self._holds.get(uid)
            if hold is None and row.replicas and row.min_replicas == 0 and _all_failed(row):
                # Lost with nowhere to go (liveness marked them failed): a model that may have
                # no replica is scaled to zero instead, and its next request starts it where
                # there is room then, or gets the reason there is none. Its subjects are
                # answered first: the model shows no replica only once they are.
                await self._open(uid, self._abilities(row))
                for r in row.replicas:
                    await self.repo.delete_replica(uid, r.replica_index, worker_id=r.worker_id)
                await self.repo.set_model_status(uid, "ready")
                reasons = "; ".join(f"replica {r.replica_index}: {r.error}" for r in row.replicas)
                logger.warning("%r: every replica failed (%s); scaled to zero", uid, reasons)
                await self.events.model(
                    uid,
                    "scaled_to_zero",
                    model_name=row.model_name,
                    status="ready",
                    reason="failed",
                    message=f"every replica failed ({reasons}): the next request starts it again",
                )
            elif hold is None and row.status == "ready" and not row.replicas:
                await self._open(uid, self._abilities(row))
            elif (
                hold is not None
                and hold.state == "zero"
                and not hold.queue
                and row.replicas
                and uid in reported
            ):
                # Another registry started it: its replicas get the traffic, not this hold.
                await self._hand_over(hold)
        busy = set(self._stopping)
        busy.update(r.model_uid for r in rows if self.launcher.launching(r.model_uid))
        by_uid = {r.model_uid: r for r in rows}
        for victim in decisions.idle_stops([r for r in rows if r.model_uid not in busy], self._idle()):
            row = by_uid[victim.model_uid]
            assert row.idle_timeout is not None
            await self._stop_idle(row, victim, reason="idle_timeout", if_idle_for=row.idle_timeout)
            # The row's replicas changed: read it again before stopping another of them.
            fresh = await self.repo.get_model(row.model_uid)
            if fresh is None:
                continue
            by_uid[row.model_uid] = fresh

    async def _stop_idle(
        self, row: ModelRow, victim: decisions.IdleReplica, *, reason: str, if_idle_for: float
    ) -> bool:
        """Stop one idle replica; False when its worker refused (a request came)."""
        uid, index = row.model_uid, victim.replica_index
        if uid in self._stopping:
            return False
        current = await self.repo.get_model(uid)
        if current is None:
            return False
        running = [r for r in current.replicas if r.status != "failed"]
        if not any(r.replica_index == index and r.worker_id == victim.worker_id for r in running):
            return False
        if len(running) <= (current.min_replicas or 0):
            return False
        last = len(running) == 1
        self._stopping.add(uid)
        try:
            hold = await self._open(uid, self._abilities(current), state="stopping") if last else None
            try:
                await self.launcher.terminate_idle(victim.worker_id, uid, index, if_idle_for)
            except Conflict as exc:
                logger.info("replica %d of %r keeps running: %s", index, uid, exc.message)
                if hold is not None:
                    await self._hand_over(hold)
                return False
            except NatserveError as exc:
                logger.warning("stopping idle replica %d of %r failed: %s", index, uid, exc.message)
                if hold is not None:
                    await self._hand_over(hold)
                return False
            await self.repo.delete_replica(uid, index, worker_id=victim.worker_id)
            logger.info("stopped replica %d of %r on %s (%s)", index, uid, victim.worker_id, reason)
            await self.events.model(
                uid,
                "terminated",
                model_name=row.model_name,
                replica_index=index,
                worker_id=victim.worker_id,
                status="ready",
                reason=reason,
                message=f"replica {index} stopped on {victim.worker_id}: {_why(reason, victim.idle_for)}",
            )
            if hold is not None:
                await self.events.model(
                    uid,
                    "scaled_to_zero",
                    model_name=row.model_name,
                    status="ready",
                    reason=reason,
                    message="no replica left: the next request starts it",
                )
                hold.state = "zero"
                if len(hold.queue):
                    self._start(hold)
            return True
        finally:
            self._stopping.discard(uid)


def _all_failed(row: ModelRow) -> bool:
    return all(r.status == "failed" for r in row.replicas)


def _why(reason: str, idle_for: float) -> str:
    if reason == "idle_timeout":
        return f"idle for {idle_for:.1f} s"
    if reason.startswith("evicted_for "):
        return f"evicted (idle for {idle_for:.1f} s) to make room for {reason.split(' ', 1)[1]!r}"
    return reason
