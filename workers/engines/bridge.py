"""The bridge between an engine's generation thread and the asyncio loops that read its output.

Threads: torch releases the GIL inside kernels, so the generation thread and the asyncio loops
overlap. Output crosses over with at most one pending ``loop.call_soon_threadsafe`` per event loop
into each request's ``asyncio.Queue``:

* the thread collects a step's pieces in an :class:`Outbox` (one list per loop) and hands each
  loop its list at the end of the step, through that loop's :class:`Mailbox`;
* a mailbox schedules one drain callback while its loop is busy, so pieces that pile up go over in
  one callback instead of one self-pipe write per step;
* :class:`GenerationStream` is the reader's side: it submits the request when first iterated,
  merges what a reader that fell behind finds queued into one ``Delta`` per choice, and cancels
  its request the moment it is closed, its task is cancelled, or it is garbage-collected. The
  ``n`` choices of a request share its queue; the stream ends when every one has finished.

Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from typing import Any, Protocol

from .api import Delta, SamplingParams, TokenLogprob

__all__ = ["GenerationStream", "Mailbox", "Outbox", "Piece", "copy_exc"]

# One queued piece of output: (new token ids, new text, finish reason, completion tokens so far,
# choice index, logprobs of the ids or None, the prompt's logprobs or None).
Piece = tuple[
    list[int], str, "str | None", int, int, "list[TokenLogprob] | None", "list[TokenLogprob | None] | None"
]


class _Pending(Protocol):
    """What the bridge needs of a request: its consumer's queue and loop's mailbox."""

    queue: asyncio.Queue[Any]
    mailbox: Mailbox


class _Intake(Protocol):
    """The engine side a stream talks to (the engine core): submit on first read, abandon."""

    def _submit(self, prompt: list[int], params: SamplingParams, request_id: str, *, whole: bool) -> Any: ...

    def _cancel_request(self, req: Any, *, notify: bool) -> bool: ...


class Mailbox:
    """Hands pieces of output from the generation thread to one event loop.

    At most one drain callback is pending per loop: while the loop is busy, pieces pile up here and
    go over in one callback instead of one self-pipe write per step.
    """

    __slots__ = ("__weakref__", "items", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # deque.extend and popleft are atomic under the GIL: the only shared state besides the flag.
        self.items: deque[tuple[_Pending, Any]] = deque()
        self.scheduled = False

    def post(self, batch: list[tuple[Any, Any]]) -> bool:
        """Generation thread side; False when the loop is closed."""
        self.items.extend(batch)
        if self.scheduled:
            return True
        self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:
            self.scheduled = False
            return False
        return True

    def drain(self) -> None:
        """Loop side. The flag drops first: a piece posted after it is either popped by this
        drain or schedules the next one."""
        self.scheduled = False
        items = self.items
        while items:
            req, item = items.popleft()
            req.queue.put_nowait(item)


class Outbox:
    """The generation thread's pieces of one step, by mailbox, until :meth:`flush` sends them."""

    __slots__ = ("_boxes",)

    def __init__(self) -> None:
        self._boxes: dict[Mailbox, list[tuple[Any, Any]]] = {}

    def post(self, req: _Pending, item: Piece | BaseException) -> None:
        box = self._boxes.get(req.mailbox)
        if box is None:
            self._boxes[req.mailbox] = [(req, item)]
        else:
            box.append((req, item))

    def flush(self) -> list[Any]:
        """Sends every mailbox its pieces; returns the requests whose loop is closed (nobody will
        read them, so the engine should stop generating for them)."""
        if not self._boxes:
            return []
        boxes, self._boxes = self._boxes, {}
        lost: list[Any] = []
        for mailbox, items in boxes.items():
            if not mailbox.post(items):
                lost.extend(req for req, _ in items)
        return lost


class GenerationStream:
    """The :class:`~workers.engines.api.DeltaStream` of the batching engines (``request_id``,
    ``aclose()``).

    Not an async generator on purpose: an abandoned async generator is only closed when the loop's
    finaliser gets to it, while this object cancels its request as soon as it is closed, its
    awaiting task is cancelled, or it is garbage-collected.
    """

    def __init__(
        self,
        engine: _Intake,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        whole: bool = False,
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self.request_id = request_id
        self._whole = whole
        self._req: Any = None
        self._finished = False
        self._pending_exc: BaseException | None = None
        # Choices still running, and pieces taken off the queue but not handed over yet.
        self._open = params.n
        self._buffer: deque[Piece] = deque()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Delta:
        if self._finished or (self._pending_exc is not None and not self._buffer):
            if self._pending_exc is not None:
                exc, self._pending_exc = self._pending_exc, None
                self._finished = True
                raise exc
            raise StopAsyncIteration
        if self._req is None:
            # Submit lazily, like an async generator: the loop is the one iterating.
            try:
                self._req = self._engine._submit(
                    self._prompt, self._params, self.request_id, whole=self._whole
                )
            except BaseException:
                self._finished = True
                raise
        buffer = self._buffer
        if not buffer:
            queue = self._req.queue
            try:
                item = queue.get_nowait() if not queue.empty() else await queue.get()
            except asyncio.CancelledError:
                self._abandon()
                raise
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            buffer.append(item)
            self._take_queued()
        ids, text, finish, completion, index, lps, prompt_lps = buffer.popleft()
        if finish is None and buffer:
            # The consumer fell behind: hand over everything queued for this choice as one Delta.
            ids = list(ids)
            parts = [text]
            rest: deque[Piece] = deque()
            while buffer:
                nxt = buffer.popleft()
                if nxt[4] != index or finish is not None:
                    rest.append(nxt)
                    continue
                ids.extend(nxt[0])
                parts.append(nxt[1])
                finish, completion = nxt[2], nxt[3]
                if lps is not None and nxt[5] is not None:
                    lps = [*lps, *nxt[5]]
            self._buffer = rest
            text = "".join(parts)
        if finish is not None:
            self._open -= 1
            if self._open <= 0:
                self._finished = True
        return Delta(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(self._prompt),
            completion_tokens=completion,
            index=index,
            logprobs=lps,
            prompt_logprobs=prompt_lps,
        )

    def _take_queued(self) -> None:
        """Moves what is queued into the buffer; an error ends the stream after it."""
        queue = self._req.queue
        while not queue.empty():
            nxt = queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._pending_exc = nxt
                break
            self._buffer.append(nxt)

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._finished:
            self._finished = True
            if self._req is not None:
                self._engine._cancel_request(self._req, notify=False)

    def __del__(self) -> None:
        # Lock-free and thread-safe, so it is fine wherever the garbage collector runs it.
        if not self._finished and self._req is not None:
            self._engine._cancel_request(self._req, notify=False)


def copy_exc(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one consumer: one object raised in many tasks would have its
    traceback rewritten by all of them."""
    try:
        dup = copy.copy(exc)
    except Exception:
        return exc
    dup.__cause__ = exc.__cause__
    return dup
