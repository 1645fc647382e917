"""The task a service request runs in, and the eager start that gives it one only when it waits.

nats-py runs one subscription's callbacks one at a time, so a handler that waits needs a task of
its own. Creating and scheduling a Task per request cost more than everything else natserve does
for a small request, and added a loop turn to its latency, so a request starts at once in the
subscription's task, in a context of its own, and is handed to a Task at its first wait
(:func:`start_eagerly`: what Python 3.12's eager task factory does, for 3.11). A request that
never waits (the echo engine's) costs no task at all; :func:`current_request` says which task
runs the current one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine, Generator
from contextvars import ContextVar
from typing import Any, Protocol

__all__ = ["DeferredAck", "RequestTask", "current_request", "start_eagerly"]

logger = logging.getLogger(__name__)


class DeferredAck(Protocol):
    """A reply's ack held back while its request ran eagerly (the ``Responder``)."""

    def ack_outlives_start(self) -> None:
        """The request waits after all: send its ack once it falls due."""


class RequestTask:
    """The task that runs a request, once there is one (see :func:`current_request`)."""

    __slots__ = ("pending_ack", "task")

    def __init__(self, task: asyncio.Task[Any] | None = None) -> None:
        self.task = task
        # An ack that waits for the request's first wait (Responder.accept).
        self.pending_ack: DeferredAck | None = None


# The package's own: the service host sets it and the responder reads it inline, per request
# (a function around either would be a frame more per request).
_CURRENT_REQUEST: ContextVar[RequestTask | None] = ContextVar("natserve_request_task", default=None)


def current_request() -> RequestTask:
    """Where the current request's task is: for a request started eagerly, ``task`` is only
    set once the request first waits (before that nothing else can run, so nothing can need
    it); otherwise it is the current task."""
    box = _CURRENT_REQUEST.get()
    return box if box is not None else RequestTask(asyncio.current_task())


class _Resume:
    """Drives a coroutine that already ran up to its first wait (on ``first``) from inside a
    Task: ``first`` goes up to the Task as if the coroutine had yielded it there, and whatever
    the Task sends or throws (a result, a cancellation) goes down to the coroutine."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, None]:
        coro, pending = self.coro, self.first
        self.first = None
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration:
                    return


async def _resumed(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)


def start_eagerly(coro: Coroutine[Any, Any, None], box: RequestTask) -> asyncio.Task[None] | None:
    """Run ``coro`` now, in a context of its own, up to its first wait; None if it ended
    without one, else the Task that carries it on from there, recorded in ``box`` (which the
    coroutine makes its :func:`current_request` first thing).
    """
    context = contextvars.copy_context()
    try:
        first = context.run(coro.send, None)
    except StopIteration:
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        logger.exception("request handler failed before its first wait")
        return None
    task = asyncio.get_running_loop().create_task(_resumed(coro, first), context=context)
    box.task = task
    ack, box.pending_ack = box.pending_ack, None
    if ack is not None:
        ack.ack_outlives_start()  # it outlives this instant: its ack may fall due
    return task
