"""Loaded replicas and the model subjects they answer on.

A :class:`Replica` is one loaded copy of a model on one device: its engine, its admission limit
(``request_limits``), the requests it has in flight and its counters. :class:`ServedModel` holds
the replicas of one model uid on this worker and owns the uid's endpoints on the worker's
service:

* ``<prefix>.model.<uid>.generate`` / ``.chat`` / ``.embed`` in the queue group
  ``<prefix>.model.<uid>``, so NATS spreads requests over every worker serving the uid; inside a
  worker the least busy local replica takes it;
* ``<prefix>.model.<uid>.cancel`` in a queue group of this worker's own, so every worker sees every
  cancel and the one holding the request stops it. Only that one answers, so a cancel is best
  sent as a plain publish; a request gets ``{"request_id", "cancelled": true}`` from the holder.

Endpoints are per uid rather than per replica because ``ServiceHost.remove_endpoints`` removes
by subject: two replicas of one uid on one worker, each with its own endpoints, could not be
removed one at a time.

Requests run in their own task (``ServiceHost``); each registers itself with its replica so that
a cancel, a terminate or a shutdown can end it. A request ended that way is answered with a 503
naming why; a streamed one gets that error and then the empty end message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from broker_client import (
    BadRequest,
    ChatRequest,
    Conflict,
    EmbeddingDefinition,
    EmbedRequest,
    GenerateConfig,
    GenerateRequest,
    LLMDefinition,
    Overloaded,
    ReplicaInfo,
    Subjects,
    Unavailable,
    logcontext,
)
from broker_client.runtime import RequestTask, Responder, ServiceHost, current_request

from . import balancing
from .chat import build_chat_prompt
from .engines.api import Delta, EngineClosedError, RequestCancelledError, SamplingParams
from .limits import ReplicaLimits, WorkerLimits

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_REQUEST_LIMITS",
    "MAX_EMBED_INPUTS",
    "EmbeddingReplica",
    "LLMReplica",
    "Replica",
    "ServedModel",
]

DEFAULT_REQUEST_LIMITS = 256
DEFAULT_MAX_TOKENS = 256
MAX_EMBED_INPUTS = 2048
# Prompts longer than this are tokenised on a thread so one big prompt does not stall the loop.
_INLINE_TOKENIZE_CHARS = 16_384
_REQUEST_ID_MAX = 128
# The config of a request that gives none (never changed: read only).
_NO_CONFIG = GenerateConfig()


class _Flight:
    """One admitted request; as a context manager (what ``Replica.track`` returns), its
    lifetime on the replica. A class rather than a generator-based context manager, which costs
    several times more, on every request."""

    __slots__ = ("_runner", "cancel_reason", "replica", "request_id", "started")

    def __init__(self, replica: Replica, request_id: str, runner: RequestTask) -> None:
        self.replica = replica
        self.request_id = request_id
        self._runner = runner
        # Set when someone else ends the request; becomes the 503's message.
        self.cancel_reason: str | None = None
        self.started = time.perf_counter()

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task running the request (requests start eagerly: see ServiceHost)."""
        return self._runner.task

    def __enter__(self) -> _Flight:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        replica = self.replica
        del replica._flights[self.request_id]
        if exc_type is None:
            return
        if issubclass(exc_type, asyncio.CancelledError):
            if self.cancel_reason is None:
                return  # the worker's own shutdown: stays a cancellation
            if self.task is not None:
                self.task.uncancel()
            replica.errors += 1
            raise Unavailable(self.cancel_reason) from None
        replica.errors += 1
        if issubclass(exc_type, RequestCancelledError):
            raise Unavailable(self.cancel_reason or f"request {self.request_id!r} was cancelled") from None


# Completion ids: a random prefix per process and a counter (a uuid4 per request reads
# os.urandom every time).
_CID_PREFIX = uuid.uuid4().hex[:20]
_CID_COUNTER = itertools.count(1)


def _completion_id(kind: str) -> str:
    return f"{kind}-{_CID_PREFIX}{next(_CID_COUNTER)}"


class Replica:
    """One loaded replica: admission, in-flight tracking, counters and shutdown."""

    model_type = ""

    def __init__(
        self,
        *,
        model_uid: str,
        replica_index: int,
        model_name: str,
        definition: LLMDefinition | EmbeddingDefinition,
        device: str,
        memory_bytes: int = 0,
        request_limits: int | None = None,
        loaded: Any = None,
        limits: ReplicaLimits | None = None,
        on_first_token: Callable[[float], None] | None = None,
    ) -> None:
        self.model_uid = model_uid
        self.replica_index = replica_index
        self.model_name = model_name
        self.definition = definition
        self.abilities: tuple[str, ...] = tuple(definition.model_ability)
        self.device = device
        self.memory_bytes = memory_bytes
        self.request_limits = request_limits or DEFAULT_REQUEST_LIMITS
        # max_tokens cap and rate limit (workers/limits.py); the time-to-first-token metric.
        self.limits = limits or ReplicaLimits()
        self.on_first_token = on_first_token
        self.status = "ready"
        # Requests it runs at once; beyond that they queue, and the worker passes new ones on to
        # other replicas (``workers/balancing.py``). ``request_limits`` is the hard cap.
        self.capacity = self.request_limits
        self._loaded = loaded
        self._flights: dict[str, _Flight] = {}
        self.requests = 0
        self.errors = 0
        self.cancelled = 0

    # -- admission ------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self._flights)

    @property
    def accepting(self) -> bool:
        return self.status == "ready"

    @property
    def label(self) -> str:
        return f"model {self.model_uid!r} replica {self.replica_index}"

    def check_capacity(self) -> None:
        if len(self._flights) >= self.request_limits:
            raise self._overloaded()

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self.label} is at its request limit of {self.request_limits} concurrent "
            f"requests ({len(self._flights)} in flight); retry later"
        )

    def track(self, request_id: str) -> _Flight:
        """Admit one request (429 at the limit, 409 for a request_id in flight) for its lifetime.

        A cancellation that came from :meth:`cancel` turns into a 503 carrying its reason; any
        other cancellation (the worker's own shutdown) stays a cancellation.
        """
        flights = self._flights
        if self.status != "ready":
            raise Unavailable(f"{self.label} is {self.status} and takes no new requests")
        if len(flights) >= self.request_limits:
            raise self._overloaded()
        if request_id in flights:
            raise Conflict(f"request_id {request_id!r} is already in flight on {self.label}")
        if self.limits.rate_limit is not None:
            self.limits.admit(self.label)  # the rate limit: 429 past it
        # This request's own context: its logs carry the id it runs under from here on.
        logcontext.set_request_id(request_id)
        flight = flights[request_id] = _Flight(self, request_id, current_request())
        self.requests += 1
        return flight

    def cancel(self, request_id: str, reason: str) -> bool:
        """End one in-flight request; False when it is not here."""
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        self._end(flight, reason)
        return True

    def _end(self, flight: _Flight, reason: str) -> None:
        if flight.cancel_reason is None:
            flight.cancel_reason = reason
            self.cancelled += 1
        if not self._engine_cancel(flight.request_id) and flight.task is not None:
            # Not in the engine (still parsing, tokenising or embedding): stop the task itself.
            flight.task.cancel()

    def _engine_cancel(self, request_id: str) -> bool:
        return False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when some still were after ``timeout``."""
        tasks = {f.task for f in self._flights.values() if f.task is not None}
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self, reason: str, *, grace: float = 5.0) -> None:
        """Stop: end every request with ``reason`` (503), close the engine, free the model."""
        if self.status == "closed":
            return
        self.status = "stopping"
        for flight in list(self._flights.values()):
            self._end(flight, reason)
        if not await self.wait_idle(grace):
            logger.warning("%s: requests still running %.1f s after being cancelled", self.label, grace)
        try:
            await self._close_engine()
        finally:
            self._release()
            self.status = "closed"

    async def _close_engine(self) -> None:
        return None

    def _release(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and hasattr(loaded, "unload"):
            # unload() drops the model, runs gc and empties the CUDA cache.
            loaded.unload()

    # -- operations -----------------------------------------------------------------------

    async def generate(self, resp: Responder, req: GenerateRequest, flight: _Flight) -> None:
        raise self.wrong_ability("generate")

    async def chat(self, resp: Responder, req: ChatRequest, flight: _Flight) -> None:
        raise self.wrong_ability("chat")

    async def embed(self, resp: Responder, req: EmbedRequest, flight: _Flight) -> None:
        raise self.wrong_ability("embed")

    def wrong_ability(self, ability: str) -> BadRequest:
        return BadRequest(
            f"model {self.model_uid!r} cannot {ability}: its abilities are {', '.join(self.abilities)}"
        )

    # -- reporting ------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(active, waiting) for the heartbeat."""
        active = min(len(self._flights), 1)
        return active, len(self._flights) - active

    def extra_info(self) -> dict[str, Any]:
        return {}

    def info(self) -> ReplicaInfo:
        active, waiting = self.counts()
        # ReplicaInfo keeps extra keys: the per-replica counters ride along in the heartbeat.
        return ReplicaInfo.model_validate(
            {
                "model_uid": self.model_uid,
                "replica_index": self.replica_index,
                "model_name": self.model_name,
                "model_type": self.model_type,
                "device": self.device,
                "status": self.status,
                "memory_bytes": self.memory_bytes,
                "active": active,
                "waiting": waiting,
                "request_limits": self.request_limits,
                "requests": self.requests,
                "errors": self.errors,
                "cancelled": self.cancelled,
                **self.extra_info(),
            }
        )


# ----------------------------------------------------------------------------- LLM


def _stop_union(*groups: Sequence[Any] | None) -> tuple[Any, ...]:
    if not any(groups):
        return ()
    seen: dict[Any, None] = {}
    for group in groups:
        if group:
            seen.update(dict.fromkeys(group))
    return tuple(seen)


class LLMReplica(Replica):
    """A causal LM behind a :class:`BatchingEngine` (or the :class:`EchoEngine`).

    The engine does the batching and sampling; this class turns requests into token ids and
    ``SamplingParams`` (checking them against the context), and deltas into OpenAI shapes.
    """

    model_type = "LLM"

    def __init__(
        self,
        *,
        engine: Any,
        tokenizer: Any | None,
        context_length: int,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        assert isinstance(self.definition, LLMDefinition)
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        if max_batch_size:
            # The engine's batch: requests beyond it wait for a slot, so that is saturation.
            self.capacity = min(max_batch_size, self.request_limits)
        self.completion_tokens = 0
        self._max_token_chars: int | None = None
        engine.start()

    # -- engine plumbing

    def _engine_cancel(self, request_id: str) -> bool:
        return self.engine is not None and bool(self.engine.cancel(request_id))

    async def _close_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            # BatchingEngine.close joins its thread after the current step: not on the loop.
            await asyncio.to_thread(engine.close)
        self.tokenizer = None

    def counts(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        stats = self.engine.stats
        running = min(stats.running, len(self._flights))
        return running, len(self._flights) - running

    def extra_info(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "context_length": self.context_length,
            "completion_tokens": self.completion_tokens,
        }
        if self.max_batch_size:
            extra["max_batch_size"] = self.max_batch_size
        if self.engine is not None:
            stats = self.engine.stats
            extra.update(
                generated_tokens=stats.generated_tokens,
                ttft_last_s=stats.ttft_last_s,
                ttft_avg_s=stats.ttft_avg_s,
                forward_passes=stats.forward_passes,
            )
        return extra

    # -- prompt handling

    def _longest_token_chars(self) -> int:
        """An upper bound on the characters one token stands for (computed once, lazily)."""
        if self._max_token_chars is None:
            longest = 1
            tokenizer = self.tokenizer
            if tokenizer is not None:
                try:
                    # Byte-level vocabularies spell every byte as one character, so a token's
                    # string is never shorter than the text it decodes to.
                    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
                except Exception:
                    longest = 64
            else:
                longest = 1 << 20  # words: no useful bound
            self._max_token_chars = max(longest, 1)
        return self._max_token_chars

    def _encode_inline(self, text: str, add_special_tokens: bool) -> Sequence[Any]:
        if self.tokenizer is None:
            return self.engine.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]

    async def _tokenize(self, text: str, *, add_special_tokens: bool) -> Sequence[Any]:
        context = self.context_length
        # Only huge texts skip tokenising (and the exact count): they cost real time to encode.
        if len(text) > _INLINE_TOKENIZE_CHARS and len(text) > context * self._longest_token_chars():
            raise BadRequest(
                f"prompt has {len(text)} characters, more than the context of model "
                f"{self.model_uid!r} ({context} tokens) can hold"
            )
        if self.tokenizer is None:
            encoded: Sequence[Any] = self.engine.encode(text, add_special_tokens=add_special_tokens)
        elif len(text) <= _INLINE_TOKENIZE_CHARS:
            encoded = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        else:
            encoded = await asyncio.to_thread(
                self.tokenizer.encode, text, add_special_tokens=add_special_tokens
            )
        return encoded

    def _sampling(
        self,
        config: GenerateConfig,
        prompt_tokens: int,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
    ) -> SamplingParams:
        context = self.context_length
        uid = self.model_uid
        max_tokens = config.max_tokens
        if self.limits.max_tokens is not None:
            self.limits.check_max_tokens(max_tokens, self.label)
        if max_tokens is not None and max_tokens > context:
            raise BadRequest(
                f"max_tokens {max_tokens} is above the context length of model {uid!r} ({context} tokens)"
            )
        if prompt_tokens >= context:
            raise BadRequest(
                f"prompt has {prompt_tokens} tokens; the context of model {uid!r} is {context} "
                "tokens, which leaves no room for a completion"
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.limits.max_tokens or context, context - prompt_tokens)
        elif prompt_tokens + max_tokens > context:
            raise BadRequest(
                f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                f"{prompt_tokens + max_tokens} tokens are above the context of model {uid!r} "
                f"({context} tokens)"
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if config.temperature is None else config.temperature,
                top_p=1.0 if config.top_p is None else config.top_p,
                top_k=config.top_k or 0,
                seed=config.seed,
                stop=_stop_union(config.stop, stop),
                stop_token_ids=_stop_union(config.stop_token_ids, stop_token_ids),
            )
        except ValueError as exc:
            raise BadRequest(f"generate_config: {exc}") from exc

    def _open(
        self, tokens: Sequence[Any], params: SamplingParams, flight: _Flight, *, stream: bool = True
    ) -> Any:
        """The engine's stream of Deltas for this request (an async iterator with ``aclose``)."""
        try:
            return self.engine.generate(tokens, params, request_id=flight.request_id, stream=stream)
        except ValueError as exc:
            raise BadRequest(f"request to model {self.model_uid!r} rejected: {exc}") from exc
        except EngineClosedError as exc:
            raise Unavailable(f"{self.label} is shutting down") from exc

    async def _complete(
        self, tokens: Sequence[Any], params: SamplingParams, flight: _Flight
    ) -> tuple[str, Delta | None]:
        """A whole completion: its text and last Delta (the streaming path is ``_deltas``)."""
        stream = self._open(tokens, params, flight, stream=False)
        step = stream.__anext__
        finished = False
        try:
            try:
                first: Delta = await step()
            except StopAsyncIteration:
                return "", None
            if self.on_first_token is not None:
                self.on_first_token(time.perf_counter() - flight.started)
            if first.finish_reason is not None:  # the whole text in one Delta, as a rule
                finished = True  # the last Delta: the engine is done with the request
                return first.text, first
            parts = [first.text]
            last = first
            while True:
                try:
                    last = await step()
                except StopAsyncIteration:
                    break
                parts.append(last.text)
                if last.finish_reason is not None:
                    finished = True
                    break
        except EngineClosedError as exc:
            raise Unavailable(f"{self.label} is shutting down") from exc
        finally:
            if not finished:
                await stream.aclose()
        return "".join(parts), last

    async def _deltas(
        self, tokens: Sequence[Any], params: SamplingParams, flight: _Flight
    ) -> AsyncIterator[Delta]:
        stream = self._open(tokens, params, flight)
        first_token = self.on_first_token
        async with contextlib.aclosing(stream):
            try:
                async for delta in stream:
                    if first_token is not None:
                        first_token(time.perf_counter() - flight.started)
                        first_token = None
                    yield delta
            except EngineClosedError as exc:
                raise Unavailable(f"{self.label} is shutting down") from exc

    def _tokens_now(self, text: str, add_special_tokens: bool) -> Sequence[Any] | None:
        """The token ids of a short text, at once; None for a long one (await :meth:`_tokenize`).
        Most prompts are short: no coroutine for them."""
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._encode_inline(text, add_special_tokens)
        return None

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        self.completion_tokens += completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # -- generate

    async def generate(self, resp: Responder, req: GenerateRequest, flight: _Flight) -> None:
        config = req.generate_config or _NO_CONFIG
        tokens = self._tokens_now(req.prompt, True)
        if tokens is None:
            tokens = await self._tokenize(req.prompt, add_special_tokens=True)
        params = self._sampling(config, len(tokens))
        cid = _completion_id("cmpl")
        created = int(time.time())
        uid = self.model_uid
        n_prompt = len(tokens)

        if not config.stream:
            text, last = await self._complete(tokens, params, flight)
            await resp.respond(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": uid,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(last)}],
                    "usage": self._usage(n_prompt, last.completion_tokens if last else 0),
                }
            )
            return

        def body(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": uid,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        last = None
        async for delta in self._deltas(tokens, params, flight):
            last = delta
            # The delta with the finish reason goes out below, with the usage.
            if delta.finish_reason is None and delta.text:
                await resp.chunk(body(delta.text, None))
        final = body(last.text if last and last.finish_reason else "", _finish(last))
        final["usage"] = self._usage(n_prompt, last.completion_tokens if last else 0)
        await resp.chunk(final)
        await resp.end_stream()

    # -- chat

    async def chat(self, resp: Responder, req: ChatRequest, flight: _Flight) -> None:
        definition = self.definition
        assert isinstance(definition, LLMDefinition)
        prompt = build_chat_prompt(
            req.messages,
            model=self.model_uid,
            chat_template=definition.chat_template,
            prompt_style=definition.prompt_style,
            tokenizer=self.tokenizer,
        )
        # The definition's own stop lists (Xinference v2 keeps them outside prompt_style).
        stop = _stop_union(prompt.stop, definition.stop)
        stop_ids = _stop_union(prompt.stop_token_ids, definition.stop_token_ids)
        config = req.generate_config or _NO_CONFIG
        tokens = self._tokens_now(prompt.text, prompt.add_special_tokens)
        if tokens is None:
            tokens = await self._tokenize(prompt.text, add_special_tokens=prompt.add_special_tokens)
        params = self._sampling(config, len(tokens), stop=stop, stop_token_ids=stop_ids)
        cid = _completion_id("chatcmpl")
        created = int(time.time())
        uid = self.model_uid
        n_prompt = len(tokens)

        if not config.stream:
            text, last = await self._complete(tokens, params, flight)
            await resp.respond(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": uid,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": _finish(last),
                        }
                    ],
                    "usage": self._usage(n_prompt, last.completion_tokens if last else 0),
                }
            )
            return

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": uid,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        await resp.chunk(chunk({"role": "assistant"}, None))
        last = None
        async for delta in self._deltas(tokens, params, flight):
            last = delta
            if delta.finish_reason is None and delta.text:
                await resp.chunk(chunk({"content": delta.text}, None))
        tail = last.text if last and last.finish_reason else ""
        final = chunk({"content": tail} if tail else {}, _finish(last))
        final["usage"] = self._usage(n_prompt, last.completion_tokens if last else 0)
        await resp.chunk(final)
        await resp.end_stream()


def _finish(last: Delta | None) -> str:
    # An engine that ends without a reason ran out of prompt (echo) or was cut short: "stop".
    if last is None or last.finish_reason is None:
        return "stop"
    return last.finish_reason


# ----------------------------------------------------------------------------- embeddings


class EmbeddingReplica(Replica):
    """A sentence-embedding model behind an :class:`EmbeddingEngine` (one batch at a time)."""

    model_type = "embedding"

    def __init__(self, *, engine: Any, dimensions: int, max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self.dimensions = dimensions
        self.max_length = max_length
        self.prompt_tokens = 0

    def extra_info(self) -> dict[str, Any]:
        return {
            "dimensions": self.dimensions,
            "max_length": self.max_length,
            "prompt_tokens": self.prompt_tokens,
        }

    async def _close_engine(self) -> None:
        self.engine = None

    async def embed(self, resp: Responder, req: EmbedRequest, flight: _Flight) -> None:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if len(texts) > MAX_EMBED_INPUTS:
            raise BadRequest(
                f"input holds {len(texts)} texts; model {self.model_uid!r} embeds at most "
                f"{MAX_EMBED_INPUTS} per request"
            )
        vectors, prompt_tokens = await self.engine.aembed(texts)
        self.prompt_tokens += prompt_tokens
        await resp.respond(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": vector}
                    for i, vector in enumerate(vectors)
                ],
                "model": self.model_uid,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )


# ----------------------------------------------------------------------------- endpoints


_OPERATIONS = ("generate", "chat", "embed")


class ServedModel:
    """The replicas of one model uid on this worker, and the uid's endpoints."""

    def __init__(
        self,
        host: ServiceHost,
        subjects: Subjects,
        model_uid: str,
        worker_id: str,
        *,
        limits: WorkerLimits | None = None,
    ) -> None:
        self.host = host
        self.subjects = subjects
        self.model_uid = model_uid
        self.worker_id = worker_id
        # The worker's policy; here for its request body limit.
        self.limits = limits or WorkerLimits()
        self.replicas: dict[int, Replica] = {}
        self._endpoints: set[str] = set()
        # Requests passed on to other replicas because these were saturated.
        self.passed_on = 0

    @property
    def subjects_served(self) -> set[str]:
        return set(self._endpoints)

    async def add(self, replica: Replica) -> None:
        """Serve ``replica``: the uid's endpoints first, then (without an await in between the
        replica's registration and the caller's bookkeeping) the replica itself."""
        if not self._endpoints:
            await self._add_endpoints()
        self.replicas[replica.replica_index] = replica

    async def _add_endpoints(self) -> None:
        uid = self.model_uid
        group = self.subjects.model_queue_group(uid)
        meta = {"model_uid": uid}
        # partials rather than the _generate/_chat/_embed methods: a coroutine less per request.
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
                self._endpoints.add(subject)
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
                self._endpoints.add(subject)
            subject = self.subjects.model(uid, "cancel")
            # Each worker its own group: every worker must see a cancel to find the request.
            await self.host.add_endpoint(
                f"{uid}-cancel",
                subject,
                self._cancel,
                queue_group=f"{group}.cancel.{self.worker_id}",
                metadata=meta,
            )
            self._endpoints.add(subject)
        except BaseException:
            await self.close_endpoints()
            raise
        # Subscriptions must reach the server before the launch reply says "ready".
        await self.host.until_subscribed()

    async def stop_accepting(self) -> None:
        """Take no new requests (they go to other workers, or get no responders); cancels still
        reach the requests that are draining."""
        cancel = self.subjects.model(self.model_uid, "cancel")
        await self._remove_subjects({s for s in self._endpoints if s != cancel})

    async def close_endpoints(self) -> None:
        await self._remove_subjects(set(self._endpoints))

    async def _remove_subjects(self, subjects: set[str]) -> None:
        if subjects:
            self._endpoints -= subjects
            await self.host.remove_endpoints(subjects)

    async def remove(self, replica_index: int, reason: str, *, grace: float = 5.0) -> Replica | None:
        """Stop one replica; the uid's endpoints go with the last one."""
        replica = self.replicas.pop(replica_index, None)
        if not self.replicas:
            await self.close_endpoints()
        if replica is not None:
            await replica.close(reason, grace=grace)
        return replica

    # -- dispatch

    def _pick(self, ability: str) -> Replica:
        if len(self.replicas) == 1:
            (only,) = self.replicas.values()
            if only.accepting and ability in only.abilities:
                only.check_capacity()
                return only
        replicas = list(self.replicas.values())
        if not replicas:
            raise Unavailable(f"model {self.model_uid!r} has no replica on worker {self.worker_id!r}")
        if ability not in replicas[0].abilities:
            raise replicas[0].wrong_ability(ability)
        ready = [r for r in replicas if r.accepting]
        if not ready:
            raise Unavailable(f"model {self.model_uid!r} has no ready replica on worker {self.worker_id!r}")
        best = min(ready, key=lambda r: r.load / r.request_limits)
        best.check_capacity()
        return best

    @staticmethod
    def _request_id(resp: Responder, body_id: str | None) -> str:
        rid = body_id or resp.request_id
        if not rid:
            return uuid.uuid4().hex
        if len(rid) > _REQUEST_ID_MAX:
            raise BadRequest(f"request_id is {len(rid)} characters long; at most {_REQUEST_ID_MAX}")
        return rid

    async def _generate(self, resp: Responder) -> None:
        await self._serve(resp, "generate", GenerateRequest)

    async def _chat(self, resp: Responder) -> None:
        await self._serve(resp, "chat", ChatRequest)

    async def _embed(self, resp: Responder) -> None:
        await self._serve(resp, "embed", EmbedRequest)

    async def _serve(
        self, resp: Responder, operation: str, model: type[GenerateRequest | ChatRequest | EmbedRequest]
    ) -> None:
        msg = resp.msg
        if not msg.reply:
            return  # nobody to answer: do not spend a replica on it
        if self.limits.max_request_bytes is not None:
            self.limits.check_body(len(msg.data), resp.subject)
        replicas = self.replicas
        if len(replicas) == 1:
            # One replica here, the common case: the rules of _pick and balancing.saturated
            # without their lists (its capacity is checked again when it admits the request).
            (only,) = replicas.values()
            ready = only.status == "ready"
            if ready and len(only._flights) >= only.capacity and await self._pass_on(resp, operation):
                return
            req = resp.parse(model)
            replica = only if ready and operation in only.abilities else self._pick(operation)
        else:
            if balancing.saturated(replicas.values()) and await self._pass_on(resp, operation):
                return
            req = resp.parse(model)
            replica = self._pick(operation)
        with replica.track(self._request_id(resp, req.request_id)) as flight:
            resp.accept(self.worker_id, req.ack)
            await getattr(replica, operation)(resp, req, flight)

    async def _pass_on(self, resp: Responder, operation: str) -> bool:
        """Saturated here: hand the request to another replica of the uid (balancing.py)."""
        subject = self.subjects.model_overflow(self.model_uid, operation)
        if await balancing.pass_on(resp.msg, subject, self.replicas.values()):
            self.passed_on += 1
            return True
        return False

    async def _cancel(self, resp: Responder) -> None:
        self.limits.check_body(len(resp.msg.data), resp.subject)
        body = resp.body()
        rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str) or not rid:
            raise BadRequest('cancel needs {"request_id": "..."}')
        for replica in list(self.replicas.values()):
            if replica.cancel(rid, f"request {rid!r} on model {self.model_uid!r} was cancelled"):
                logger.debug("cancelled request %r on %s", rid, replica.label)
                await resp.respond({"request_id": rid, "cancelled": True})
                return
        # Other workers may hold it; staying silent lets the holder's answer be the one seen.
