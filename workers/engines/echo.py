"""A diagnostic engine that needs no model: it answers with the prompt itself.

A model spec whose ``model_uri`` starts with ``echo:`` is served by :class:`EchoEngine` instead of
being loaded (the worker dispatches on it; the loader never sees the URI)::

    {"model_name": "echo", "model_ability": ["generate", "chat"], "context_length": 4096,
     "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1,
                      "model_uri": "echo:"}]}

Words stand in for tokens: the prompt's whitespace-separated words are its tokens and the
completion is the first ``max_tokens`` of them, streamed one word per ``Delta``. Everything else
(admission, streaming, cancellation, the wire) runs the same code as a real model, so the echo
model measures natserve's own overhead; that is why the hot path below stays minimal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from .batching import Delta, EngineClosedError, EngineStats, RequestCancelledError, SamplingParams

__all__ = ["ECHO_SCHEME", "EchoEngine", "is_echo_uri"]

ECHO_SCHEME = "echo:"
_YIELD_EVERY = 256


def is_echo_uri(model_uri: str | None) -> bool:
    return bool(model_uri) and model_uri.strip().lower().startswith(ECHO_SCHEME)  # type: ignore[union-attr]


class _EchoStream:
    """Yields one word per step; checks its cancel flag between words."""

    __slots__ = ("_engine", "_i", "_n", "_prompt_tokens", "_stop_at", "_t0", "_words", "request_id")

    def __init__(self, engine: EchoEngine, words: Sequence[str], params: SamplingParams, request_id: str):
        self._engine = engine
        self.request_id = request_id
        self._t0 = time.perf_counter()
        self._prompt_tokens = len(words)
        self._n = min(len(words), params.max_tokens)
        # An echo that ran out of prompt stopped on its own; one cut by max_tokens hit the length.
        self._stop_at = "length" if len(words) > params.max_tokens else "stop"
        self._words = list(words[: self._n])
        if params.stop:
            self._apply_stop(params.stop)
        self._i = 0

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
        if self._i > self._n:
            raise StopAsyncIteration
        if self.request_id in engine._cancelled:
            self._finish(cancelled=True)
            raise RequestCancelledError(f"request {self.request_id!r} was cancelled")
        i = self._i
        self._i += 1
        if i == 0:
            engine._ttft(time.perf_counter() - self._t0)
        if i < self._n - 1:
            word = self._words[i]
            engine._generated += 1
            if i and not i % _YIELD_EVERY:
                # A very long echo lets other requests (and cancels) run now and then; yielding
                # on every word would cost more loop turns than the rest of the request.
                await asyncio.sleep(0)
            return Delta(word if i == 0 else " " + word, [], None, self._prompt_tokens, i + 1)
        # The last word (or nothing, for an empty echo) carries the finish reason.
        self._i = self._n + 1
        text = ""
        if self._n:
            engine._generated += 1
            text = self._words[-1] if self._n == 1 else " " + self._words[-1]
        self._finish(cancelled=False)
        return Delta(text, [], self._stop_at, self._prompt_tokens, self._n)

    def _finish(self, *, cancelled: bool) -> None:
        engine = self._engine
        self._i = self._n + 1
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
    """Same interface as :class:`~workers.engines.batching.BatchingEngine`, with words as tokens."""

    tokenizer = None

    def __init__(self, *, context_length: int = 4096) -> None:
        if context_length <= 0:
            raise ValueError(f"context_length must be positive, got {context_length}")
        self.context_length = context_length
        self._active: dict[str, _EchoStream] = {}
        self._cancelled: set[str] = set()
        self._finished = 0
        self._cancelled_count = 0
        self._generated = 0
        self._ttft_last: float | None = None
        self._ttft_sum = 0.0
        self._ttft_n = 0
        self._closed = False

    def start(self) -> None:
        return None

    def close(self) -> None:
        self._closed = True
        self._cancelled.update(self._active)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[str]:
        """The 'tokens' of ``text``: its words."""
        return text.split()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(
        self, prompt_ids: Sequence[str], params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        if params.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {params.max_tokens}")
        if self._closed:
            raise EngineClosedError("the echo engine is closed")
        rid = request_id or f"echo-{time.monotonic_ns()}"
        if rid in self._active:
            raise ValueError(f"request_id {rid!r} is already in use")
        stream = _EchoStream(self, prompt_ids, params, rid)
        self._active[rid] = stream
        return stream

    def cancel(self, request_id: str) -> bool:
        if request_id not in self._active:
            return False
        self._cancelled.add(request_id)
        return True

    def _ttft(self, value: float) -> None:
        self._ttft_last = value
        self._ttft_sum += value
        self._ttft_n += 1

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            forward_passes=0,
            running=len(self._active),
            waiting=0,
            finished=self._finished,
            cancelled=self._cancelled_count,
            ttft_last_s=self._ttft_last,
            ttft_avg_s=self._ttft_sum / self._ttft_n if self._ttft_n else None,
            generated_tokens=self._generated,
        )
