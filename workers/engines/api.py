"""What engines and their callers share, without torch: the ``Engine`` protocol every LLM engine
satisfies (and the ``Embedder`` one of the embedding engine), sampling parameters, the pieces of
output (``Delta``), statistics, errors and the checks of a request's values. The worker imports
these at start; the engines themselves (and torch, and transformers) only when a model is loaded
or the warm-up gets to them.

An engine is anything that turns a prompt's tokens into a stream of ``Delta``s: the batching and
static engines over a transformers model, the model-less echo, and later engines over other
runtimes (llama.cpp). The replica only ever talks to an engine through :class:`Engine`; the
contract tests (tests/engines/test_contract.py) hold every engine to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "CONSTRAINT_KINDS",
    "MAX_LOGPROBS",
    "MAX_N",
    "Constraint",
    "Delta",
    "DeltaStream",
    "Embedder",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineStats",
    "InvalidRequestError",
    "RequestCancelledError",
    "SamplingParams",
    "TokenLogprob",
    "check_length",
    "check_sampling",
]


CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "choice")
MAX_LOGPROBS = 20  # the most top alternatives a token's logprobs carry (OpenAI's bound)
MAX_N = 16  # the most choices one request asks for


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match, enforced by constrained decoding (``workers.engines.grammar``).

    ``json_object``: any JSON object (``value`` unused); ``json_schema``: ``value`` is the schema
    dict; ``regex``: ``value`` is the pattern (the whole output matches it); ``choice``: ``value``
    is a tuple of strings, the output is exactly one of them.
    """

    kind: Literal["json_object", "json_schema", "regex", "choice"]
    value: Any = None


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax after temperature (temperature 0: of the raw logits)
    top: list[tuple[int, float]]  # the top-k (token id, logprob), most likely first


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    # Same seed + same prompt + same params => same output, whatever else is batched alongside.
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on decoded text; the stop string is not returned
    stop_token_ids: tuple[int, ...] = ()  # in addition to the eos ids
    n: int = 1  # choices; the prompt is prefilled once and forked to n rows
    logprobs: int | None = None  # None: no logprobs; k in 0..20: the sampled token's + top k
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (a completion's echo)
    presence_penalty: float = 0.0  # OpenAI semantics over the tokens generated so far
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # Hugging Face semantics (prompt and generated tokens)
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias -100..100)
    constraint: Constraint | None = None


@dataclass(slots=True)
class Delta:
    text: str  # newly decoded text since the previous Delta (may be "")
    token_ids: list[int]  # tokens generated since the previous Delta (empty for an engine without ids)
    finish_reason: str | None  # None while running; "stop" or "length" on the last Delta
    prompt_tokens: int
    completion_tokens: int  # total so far (of this index)
    index: int = 0  # which of the n choices this delta belongs to
    logprobs: list[TokenLogprob] | None = None  # one per id in token_ids when asked
    # Once, on the first delta of index 0, when asked: the first prompt token has none.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    forward_passes: int  # every model forward (prefill and decode) since start
    running: int  # requests in the batch now
    waiting: int  # submitted, not yet in the batch
    finished: int  # ended with "stop"/"length" or with an error
    cancelled: int
    ttft_last_s: float | None  # time to first token of the last request that got one
    ttft_avg_s: float | None
    generated_tokens: int


class EngineError(RuntimeError):
    """Root of the errors the engine itself raises from a ``generate`` iterator."""


class EngineClosedError(EngineError):
    """The engine was closed (or never started) while the request was pending."""


class InvalidRequestError(EngineError):
    """A request the engine cannot serve, found when it is checked (e.g. a constraint the grammar
    engine cannot compile); raised by ``generate()`` itself, before anything is queued. The
    message says why (a 400 on the wire)."""


class RequestCancelledError(EngineError):
    """``Engine.cancel`` ended this request."""


@runtime_checkable
class DeltaStream(Protocol):
    """What ``Engine.generate`` returns: an async iterator of ``Delta``s whose last one carries a
    ``finish_reason``. ``aclose()`` (or the iterating task being cancelled) ends the request."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    async def __anext__(self) -> Delta: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """An LLM engine, as the replica uses it.

    * ``start()`` before the first request (an engine may serve without it); ``close()`` ends
      every pending request with :class:`EngineClosedError` and refuses new ones. ``close`` may
      block until a running step ends: call it off the event loop.
    * ``generate`` checks the request at once (``ValueError``/``TypeError`` naming the value) and
      returns a :class:`DeltaStream`, iterated inside a running event loop. ``stream=False`` says
      the reader wants the whole text only, so the engine may hand it over in fewer Deltas; the
      Deltas still add up to the same text and counts.
    * ``cancel(request_id)`` ends a waiting or running request (its stream raises
      :class:`RequestCancelledError`); False when no such request is pending.
    * ``encode`` gives the prompt tokens ``generate`` takes; ``count_tokens`` counts a text's
      tokens without special tokens.
    * ``max_batch_size``: how many requests generate at once (None: no bound of its own).
    * ``params.n > 1``: one stream carries the deltas of every choice (``Delta.index``), each
      index ends with its own ``finish_reason``, and the stream ends when all have finished.
    * A request the engine cannot serve for a reason found while checking it (a constraint that
      does not compile) raises :class:`InvalidRequestError` from ``generate`` itself.
    """

    @property
    def context_length(self) -> int: ...

    @property
    def max_batch_size(self) -> int | None: ...

    @property
    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def generate(
        self,
        prompt_ids: Sequence[Any],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        stream: bool = True,
    ) -> DeltaStream: ...

    def cancel(self, request_id: str) -> bool: ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> Sequence[Any]: ...

    def count_tokens(self, text: str) -> int: ...


@runtime_checkable
class Embedder(Protocol):
    """A sentence-embedding engine: the vectors of some texts, in order, and the tokens read."""

    @property
    def dimensions(self) -> int: ...

    @property
    def max_batch_size(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]: ...

    async def aembed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]: ...


def check_sampling(params: SamplingParams) -> None:
    """``TypeError``/``ValueError`` naming the first value of ``params`` no engine can serve."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if params.max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {params.max_tokens}")
    # ``not >=`` is also true for NaN.
    if not params.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {params.top_k}")
    if not 1 <= params.n <= MAX_N:
        raise ValueError(f"n must be in 1..{MAX_N}, got {params.n}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS} or None, got {k}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not -2 <= value <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {value}")
    if not 0 < params.repetition_penalty <= 100:
        raise ValueError(f"repetition_penalty must be in (0, 100], got {params.repetition_penalty}")
    if not 0 <= params.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}")
    for entry in params.logit_bias:
        if len(entry) != 2:
            raise ValueError(f"logit_bias entries must be (token id, bias) pairs, got {entry!r}")
        token, bias = entry
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias token id must be a non-negative int, got {token!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias[{token}] must be in [-100, 100], got {bias}")
    constraint = params.constraint
    if constraint is not None:
        if not isinstance(constraint, Constraint):
            raise TypeError(f"constraint must be a Constraint, got {type(constraint).__name__}")
        if constraint.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind must be one of {CONSTRAINT_KINDS}, got {constraint.kind!r}")


def check_length(prompt_tokens: int, max_tokens: int, limit: int, limit_text: str) -> None:
    """``ValueError`` when the prompt and the completion do not fit in ``limit`` positions;
    ``limit_text`` says what the limit is ("the context length 4096")."""
    total = prompt_tokens + max_tokens
    if total > limit:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = {total} exceeds {limit_text}"
        )
