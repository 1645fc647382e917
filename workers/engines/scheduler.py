"""The scheduler of the LLM engines: which requests wait, which run, which join at the next step.

Submitters (any thread, usually asyncio loops) hand requests in through :meth:`Scheduler.submit`
and cancellations through :meth:`Scheduler.cancel`; the generation thread takes them over at the
start of each step:

* :meth:`take_cancels` ends the requests cancelled since the last step (waiting or running);
* :meth:`schedule` admits waiting requests while the batch has room (``max_batch_size`` running),
  shortest prompts together, in prefill chunks whose padded size stays within the prefill token
  budget, so that a burst of long prompts cannot allocate unbounded activations.

``running`` is in row order: row ``i`` of the KV layout is ``running[i]``. The layout decides that
order when rows leave (see the engine core), the scheduler only appends newcomers. Nothing here
imports torch.
"""

from __future__ import annotations

import threading
from collections import deque

from .api import EngineClosedError
from .request import Request

__all__ = ["DEFAULT_PREFILL_TOKEN_BUDGET", "Scheduler"]

# Upper bound on padded tokens in one prefill forward; newcomers beyond it are prefilled in several
# forwards of the same step, so a burst of long prompts cannot allocate unbounded activations.
DEFAULT_PREFILL_TOKEN_BUDGET = 16384


class Scheduler:
    """Waiting and running requests of one engine (see the module doc)."""

    def __init__(self, max_batch_size: int, prefill_token_budget: int, *, engine_name: str) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.prefill_budget = max(1, prefill_token_budget)
        self._engine_name = engine_name

        # Shared with submitters; guarded by ``_cond``.
        self._cond = threading.Condition()
        self._incoming: list[Request] = []
        self._closing = False
        self._started = False
        # Lock-free hand-over of cancellations: deque.append is atomic, and a stream's __del__
        # may call it on any thread, including the generation thread while it holds ``_cond``.
        self._cancel_q: deque[tuple[Request, bool]] = deque()
        # Pending requests by id (submission side inserts, whoever ends a request removes).
        self._active: dict[str, Request] = {}

        # Owned by the generation thread.
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cancelled = 0

    # ------------------------------------------------------------------ any thread

    def open(self) -> bool:
        """Accepts requests from now on; False when it already did. Raises once closed."""
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed and cannot be restarted")
            if self._started:
                return False
            self._started = True
            return True

    @property
    def fresh(self) -> bool:
        """Neither opened nor closed yet."""
        with self._cond:
            return not self._started and not self._closing

    def close(self) -> None:
        """Refuses new requests and wakes the generation thread so that it stops."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def submit(self, req: Request) -> None:
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            if not self._started:
                raise EngineClosedError(f"the engine is not started; call {self._engine_name}.start()")
            if self._active.setdefault(req.id, req) is not req:
                raise ValueError(f"request_id {req.id!r} is already in use")
            self._incoming.append(req)
            self._cond.notify()

    def find(self, request_id: str) -> Request | None:
        """The pending request of that id, if any."""
        return self._active.get(request_id)

    def cancel(self, req: Request, *, notify: bool) -> bool:
        """Asks the generation thread to end ``req`` (every choice of it) at its next step;
        ``notify`` tells its reader (an outside cancel), unlike a reader that walked away on its
        own. Lock-free."""
        if req.finished_group():
            return False
        self._cancel_q.append((req, notify))
        return True

    def counts(self) -> tuple[int, int]:
        """``(running, waiting)`` now."""
        with self._cond:
            waiting = len(self._incoming)
        return len(self.running), waiting + len(self.waiting)

    # ------------------------------------------------------------------ generation thread

    def wait_for_work(self) -> bool:
        """Blocks until there is something to do; moves submissions into ``waiting``. False once
        the engine is closing."""
        with self._cond:
            while not self._incoming and not self.running and not self.waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return False
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            return True

    def take_cancels(self) -> list[tuple[Request, bool]]:
        """Ends the requests cancelled since the last call: ``(request, tell its reader)`` for
        each one that was still pending, every choice of it (their reader is told once). They
        leave ``waiting`` at once; rows of ``running`` are only marked ``done`` (the KV layout
        has to drop them)."""
        if not self._cancel_q:
            return []
        tell: set[int] = set()
        drop: dict[int, Request] = {}
        while self._cancel_q:
            req, notify = self._cancel_q.popleft()
            lead = req.group[0]
            drop[id(lead)] = lead
            if notify:
                tell.add(id(lead))
        ended = [(r, id(r) in tell) for r in drop.values() if not r.finished_group()]
        if not ended:
            return []
        for lead, _ in ended:
            for req in lead.group:
                req.done = True
            self.release(lead)
            self.cancelled += 1
        self.waiting = deque(r for r in self.waiting if not r.done)
        return ended

    def schedule(self) -> list[list[Request]]:
        """The waiting requests that join the batch now, in prefill chunks (shortest first).
        A request of ``n`` choices is prefilled once and takes ``n`` rows, all at once."""
        free = self.max_batch_size - len(self.running)
        newcomers: list[Request] = []
        while self.waiting:
            req = self.waiting[0]
            if req.done:
                self.waiting.popleft()
                continue
            if len(req.group) > free:
                break
            self.waiting.popleft()
            newcomers.append(req)
            free -= len(req.group)
        if not newcomers:
            return []
        # Similar lengths together waste less padding; chunks keep each forward within budget.
        newcomers.sort(key=lambda r: len(r.prompt))
        chunks: list[list[Request]] = []
        chunk: list[Request] = []
        for req in newcomers:
            if req.params.prompt_logprobs is not None:
                # Its prefill keeps the logits of every position ([width, vocab] floats): alone,
                # so that its batch mates' prompts do not keep theirs too.
                chunks.append([req])
                continue
            if chunk and (len(chunk) + 1) * len(req.prompt) > self.prefill_budget:
                chunks.append(chunk)
                chunk = []
            chunk.append(req)
        if chunk:
            chunks.append(chunk)
        return chunks

    def release(self, req: Request) -> None:
        """Forgets an ended request's id (once every choice of it has ended)."""
        lead = req.group[0]
        if self._active.get(lead.id) is lead and lead.finished_group():
            del self._active[lead.id]

    def drain(self) -> list[Request]:
        """Closes, and hands back every pending request (running, waiting, submitted)."""
        with self._cond:
            # Also after a crash: later submissions must fail at once, not wait forever.
            self._closing = True
            pending = [*self.running, *(c for r in (*self.waiting, *self._incoming) for c in r.group)]
            self._incoming.clear()
        self.waiting.clear()
        self.running = []
        return pending
