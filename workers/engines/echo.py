"""A diagnostic engine that needs no model: it answers with the prompt itself.

A model spec whose ``model_uri`` starts with ``echo:`` is served by :class:`EchoEngine` instead of
being loaded (the worker dispatches on it; the loader never sees the URI)::

    {"model_name": "echo", "model_ability": ["generate", "chat"], "context_length": 4096,
     "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1,
                      "model_uri": "echo:"}]}

Words stand in for tokens: the prompt's whitespace-separated words are its tokens and the
completion is the first ``max_tokens`` of them, streamed one word per ``Delta`` (a request that is
not streamed gets them at once when unpaced); the ``n`` choices of a request are the same echo, one
after the other. Logprobs and constraints need a model: they are refused. It satisfies the same
:class:`~workers.engines.api.Engine` contract as the model engines (checks, stops, cancellation,
closing, statistics), and everything else (admission, streaming, the wire) runs the same code as a
real model, so the echo model measures natserve's own overhead; that is why the hot path below
stays minimal.

Options in the URI's query make it behave like a model with a cost, for tests and drills of the
pool (load balancing, faults, launch cancel) without a real model:

    echo:?delay=0.05     sleep this many seconds before each word (a slow decode step)
    echo:?slots=4        at most 4 requests generate at once, the others wait (a batch size);
                         the replica's max_batch_size, so its balancing capacity, too
    echo:?load=3         the launch takes 3 seconds (cancellable, with loading progress)
    echo:?memory=4e8     the replica says it takes 400 MB (its memory_bytes, and what the
                         registry's placement estimates for it): memory pressure without memory

They combine: ``echo:?delay=0.02&slots=4&load=1``. An unknown option is a 400.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .api import (
    Delta,
    Engine,
    EngineClosedError,
    EngineStats,
    InvalidRequestError,
    RequestCancelledError,
    SamplingParams,
    check_length,
    check_sampling,
)

__all__ = ["ECHO_SCHEME", "EchoEngine", "EchoOptions", "echo_options", "is_echo_uri"]

ECHO_SCHEME = "echo:"
# Words an unpaced echo hands over per Delta.
_BLOCK = 256


def is_echo_uri(model_uri: str | None) -> bool:
    return bool(model_uri) and model_uri.strip().lower().startswith(ECHO_SCHEME)  # type: ignore[union-attr]


@dataclass(frozen=True)
class EchoOptions:
    delay: float = 0.0
    slots: int | None = None
    load: float = 0.0
    memory: int = 0


def echo_options(model_uri: str) -> EchoOptions:
    """The options of an ``echo:`` URI; ValueError naming a bad or unknown one."""
    rest = model_uri.strip()[len(ECHO_SCHEME) :]
    query = rest.split("?", 1)[1] if "?" in rest else ""
    values: dict[str, float] = {}
    for key, raw in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in ("delay", "slots", "load", "memory"):
            raise ValueError(f"unknown echo option {key!r} in {model_uri!r} (delay, slots, load, memory)")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"echo option {key}={raw!r} in {model_uri!r} is not a number") from None
        if not value >= 0 or (key == "slots" and (value < 1 or value != int(value))):
            raise ValueError(f"echo option {key}={raw!r} in {model_uri!r} is out of range")
        values[key] = value
    slots = values.get("slots")
    return EchoOptions(
        delay=values.get("delay", 0.0),
        slots=int(slots) if slots else None,
        load=values.get("load", 0.0),
        memory=int(values.get("memory", 0.0)),
    )


class _EchoStream:
    """Yields one word per step; checks its cancel flag between words (a ``DeltaStream``)."""

    __slots__ = (
        "_block",
        "_choices",
        "_engine",
        "_i",
        "_index",
        "_n",
        "_prompt_tokens",
        "_slot",
        "_stop_at",
        "_t0",
        "_wait",
        "_words",
        "request_id",
    )

    def __init__(
        self, engine: EchoEngine, words: Sequence[str], params: SamplingParams, request_id: str, *, block: int
    ):
        self._engine = engine
        # Words per Delta when unpaced (a paced echo makes one word per step).
        self._block = 1 if engine._paced else block
        self.request_id = request_id
        self._t0 = time.perf_counter()
        self._prompt_tokens = len(words)
        self._n = min(len(words), params.max_tokens)
        # An echo that ran out of prompt stopped on its own; one cut by max_tokens hit the length.
        self._stop_at = "length" if len(words) > params.max_tokens else "stop"
        self._words = words[: self._n]  # a copy already, for a list or a tuple
        if params.stop:
            self._apply_stop(params.stop)
        self._i = 0
        # Choices: every one echoes the same words, one after the other on this stream.
        self._index = 0
        self._choices = params.n
        self._slot = False
        # While it queues for a slot: the future that hands it one (True) or wakes it (False).
        self._wait: asyncio.Future[bool] | None = None

    def _apply_stop(self, stops: tuple[str, ...]) -> None:
        text = " ".join(self._words)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._words = text[:cut].split()
            self._n = len(self._words)
            self._stop_at = "stop"

    def __aiter__(self) -> _EchoStream:
        return self

    async def __anext__(self) -> Delta:
        engine = self._engine
        i = self._i
        n = self._n
        if i > n:
            raise StopAsyncIteration
        try:
            if engine._paced and n:
                await self._pace()
                if self._i > n:  # closed by aclose() while it queued
                    raise StopAsyncIteration
            elif i and (self._block > 1 or not i % _BLOCK):
                # A very long echo lets other requests (and cancels) run now and then; yielding on
                # every word would cost more loop turns than the rest of the request.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            # The reading task was cancelled: the request ends, its slot goes to the next one.
            self._finish(cancelled=True)
            raise
        if self.request_id in engine._cancelled:
            if engine._closed:
                self._finish(cancelled=False)
                raise EngineClosedError(f"the echo engine was closed; request {self.request_id!r} ended")
            self._finish(cancelled=True)
            raise RequestCancelledError(f"request {self.request_id!r} was cancelled")
        if i == 0 and self._index == 0:
            engine._ttft(time.perf_counter() - self._t0)
        # A reader of the whole text gets what is there as one Delta (a block at a time), as
        # the batching engine hands a reader that fell behind its queued pieces merged.
        end = i + self._block
        if end >= n:
            end = n
        text = " ".join(self._words[i:end])
        if i and text:
            text = " " + text
        engine._generated += end - i
        index = self._index
        if end < n:
            self._i = end
            return Delta(text, [], None, self._prompt_tokens, end, index=index)
        # The last block (or nothing, for an empty echo) carries the finish reason.
        if index + 1 < self._choices:
            self._index += 1
            self._i = 0
        else:
            self._finish(cancelled=False)
        return Delta(text, [], self._stop_at, self._prompt_tokens, n, index=index)

    async def _pace(self) -> None:
        engine = self._engine
        if not self._slot and engine.slots is not None:
            if engine._free and not engine._queue:
                engine._free -= 1
            elif not await self._queue_for_slot():
                return  # woken without a slot: cancelled or closed, which the caller checks
            self._slot = True
            engine._running += 1
        if engine.delay:
            await asyncio.sleep(engine.delay)

    async def _queue_for_slot(self) -> bool:
        """Waits for a slot, first come first served; False when woken without one."""
        engine = self._engine
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._wait = fut
        engine._queue.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                engine._hand_on_slot()  # handed over just before the cancel: pass it on
            raise
        finally:
            self._wait = None

    def _wake(self) -> None:
        """Ends its wait for a slot (cancel, close): it looks at why when it runs."""
        wait = self._wait
        if wait is not None and not wait.done():
            wait.set_result(False)

    def _finish(self, *, cancelled: bool) -> None:
        engine = self._engine
        self._i = self._n + 1
        if self._slot:
            self._slot = False
            engine._running -= 1
            engine._hand_on_slot()
        elif self._wait is not None:
            self._wake()
        # A cancel that raced with the end must not hit a later request reusing the id.
        engine._cancelled.discard(self.request_id)
        if engine._active.pop(self.request_id, None) is not None:
            if cancelled:
                engine._cancelled_count += 1
            else:
                engine._finished += 1

    async def aclose(self) -> None:
        if self._i <= self._n:
            self._finish(cancelled=True)


class EchoEngine:
    """An :class:`~workers.engines.api.Engine` with words as tokens (see the module doc).

    It serves without ``start()``; ``close()`` ends the pending requests with
    ``EngineClosedError`` at their next word.
    """

    tokenizer = None

    def __init__(self, *, context_length: int = 4096, delay: float = 0.0, slots: int | None = None) -> None:
        if context_length <= 0:
            raise ValueError(f"context_length must be positive, got {context_length}")
        self.context_length = context_length
        self.delay = delay
        self.slots = slots
        # Free slots, and the requests queued for one (their futures, oldest first).
        self._free = slots or 0
        self._queue: deque[asyncio.Future[bool]] = deque()
        self._paced = bool(delay or slots)
        self._running = 0
        self._active: dict[str, _EchoStream] = {}
        self._cancelled: set[str] = set()
        self._finished = 0
        self._cancelled_count = 0
        self._generated = 0
        self._ttft_last: float | None = None
        self._ttft_sum = 0.0
        self._ttft_n = 0
        self._closed = False
        self._limit_text = f"the context length {context_length}"

    @property
    def max_batch_size(self) -> int | None:
        """The ``slots`` option: how many requests generate at once (None: no bound)."""
        return self.slots

    def start(self) -> None:
        return None

    def close(self) -> None:
        self._closed = True
        self._cancelled.update(self._active)
        for stream in self._active.values():
            stream._wake()

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[str]:
        """The 'tokens' of ``text``: its words."""
        return text.split()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(
        self,
        prompt_ids: Sequence[str],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        stream: bool = True,
    ) -> _EchoStream:
        """``stream=False``: an unpaced echo hands its words over in one Delta (blocks of 256)."""
        check_sampling(params)
        check_length(len(prompt_ids), params.max_tokens, self.context_length, self._limit_text)
        # Without a model there are no logits: penalties, biases and min_p change nothing, but
        # what needs a distribution or a vocabulary is refused rather than made up.
        for name in ("logprobs", "prompt_logprobs", "constraint"):
            if getattr(params, name) is not None:
                raise InvalidRequestError(f"the echo engine has no model, so it cannot serve {name}")
        if self._closed:
            raise EngineClosedError("the echo engine is closed")
        rid = request_id or f"echo-{time.monotonic_ns()}"
        if rid in self._active:
            raise ValueError(f"request_id {rid!r} is already in use")
        stream_ = _EchoStream(self, prompt_ids, params, rid, block=1 if stream else _BLOCK)
        self._active[rid] = stream_
        return stream_

    def cancel(self, request_id: str) -> bool:
        stream = self._active.get(request_id)
        if stream is None:
            return False
        self._cancelled.add(request_id)
        # One queued for a slot ends now, not once it gets one.
        stream._wake()
        return True

    def _hand_on_slot(self) -> None:
        """A slot came free: to the oldest request still queued for one, or back to the pool."""
        queue = self._queue
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        self._free += 1

    def _ttft(self, value: float) -> None:
        self._ttft_last = value
        self._ttft_sum += value
        self._ttft_n += 1

    @property
    def stats(self) -> EngineStats:
        running = self._running if self.slots is not None else len(self._active)
        return EngineStats(
            forward_passes=0,
            running=running,
            waiting=len(self._active) - running,
            finished=self._finished,
            cancelled=self._cancelled_count,
            ttft_last_s=self._ttft_last,
            ttft_avg_s=self._ttft_sum / self._ttft_n if self._ttft_n else None,
            generated_tokens=self._generated,
        )


if TYPE_CHECKING:  # mypy holds the engine to the protocol the replica uses

    def _is_an_engine(engine: EchoEngine) -> Engine:
        return engine
