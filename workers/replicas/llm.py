"""A causal LM replica: requests to token ids and sampling parameters, the engine's deltas to
typed completions.

The engine (:class:`~workers.engines.StaticBatchingEngine`,
:class:`~workers.engines.BatchingEngine`, or the model-less :class:`~workers.engines.EchoEngine`)
does the batching and sampling; this replica checks a request against the context (and the
replica's limits), opens the engine's stream and turns its :class:`~workers.engines.Delta` s into
OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from broker_client import (
    BadRequest,
    ChatRequest,
    GenerateConfig,
    GenerateRequest,
    LLMDefinition,
    Unavailable,
)

from ..chat import ChatPrompt, build_chat_prompt
from ..engines import Delta, Engine, EngineClosedError, SamplingParams
from ..replies import (
    ChatCompletionBody,
    ChatCompletionChunkBody,
    CompletionBody,
    CompletionChunkBody,
    UsageBody,
)
from .base import Flight, Replica

__all__ = ["DEFAULT_MAX_TOKENS", "LLMReplica"]

DEFAULT_MAX_TOKENS = 256
# Prompts longer than this are tokenised on a thread so one big prompt does not stall the loop.
_INLINE_TOKENIZE_CHARS = 16_384
# The config of a request that gives none (never changed: read only).
_NO_CONFIG = GenerateConfig()
C = TypeVar("C", CompletionChunkBody, ChatCompletionChunkBody)

# Completion ids: a random prefix per process and a counter (a uuid4 per request reads
# os.urandom every time).
_CID_PREFIX = uuid.uuid4().hex[:20]
_CID_COUNTER = itertools.count(1)


def _completion_id(kind: str) -> str:
    return f"{kind}-{_CID_PREFIX}{next(_CID_COUNTER)}"


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
        engine: Engine,
        tokenizer: Any | None,
        context_length: int,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        assert isinstance(self.definition, LLMDefinition)
        self.engine: Engine | None = engine
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
        running = min(stats.running, len(self.flights))
        return running, len(self.flights) - running

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

    def _engine(self) -> Engine:
        engine = self.engine
        if engine is None:
            raise Unavailable(f"{self.label} is shutting down")
        return engine

    def _encode_inline(self, text: str, add_special_tokens: bool) -> Sequence[Any]:
        if self.tokenizer is None:
            return self._engine().encode(text, add_special_tokens=add_special_tokens)
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
            encoded: Sequence[Any] = self._engine().encode(text, add_special_tokens=add_special_tokens)
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
                # Most requests stop on nothing but eos: no call for them.
                stop=_stop_union(config.stop, stop) if config.stop or stop else (),
                stop_token_ids=(
                    _stop_union(config.stop_token_ids, stop_token_ids)
                    if config.stop_token_ids or stop_token_ids
                    else ()
                ),
            )
        except ValueError as exc:
            raise BadRequest(f"generate_config: {exc}") from exc

    def _open(
        self, tokens: Sequence[Any], params: SamplingParams, flight: Flight, *, stream: bool = True
    ) -> Any:
        """The engine's stream of Deltas for this request (an async iterator with ``aclose``)."""
        try:
            return self._engine().generate(tokens, params, request_id=flight.request_id, stream=stream)
        except ValueError as exc:
            raise BadRequest(f"request to model {self.model_uid!r} rejected: {exc}") from exc
        except EngineClosedError as exc:
            raise Unavailable(f"{self.label} is shutting down") from exc

    async def _complete(
        self, tokens: Sequence[Any], params: SamplingParams, flight: Flight
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

    def _tokens_now(self, text: str, add_special_tokens: bool) -> Sequence[Any] | None:
        """The token ids of a short text, at once; None for a long one (await :meth:`_tokenize`).
        Most prompts are short: no coroutine for them."""
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self._encode_inline(text, add_special_tokens)
        return None

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> UsageBody:
        self.completion_tokens += completion_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _prompt(self, text: str, add_special_tokens: bool) -> Sequence[Any]:
        """The prompt's token ids: at once for a short text (no coroutine), on a thread for a
        long one."""
        tokens = self._tokens_now(text, add_special_tokens)
        if tokens is None:
            tokens = await self._tokenize(text, add_special_tokens=add_special_tokens)
        return tokens

    async def _chunks(
        self,
        tokens: Sequence[Any],
        params: SamplingParams,
        flight: Flight,
        piece: Callable[[str, str | None, UsageBody | None], C],
        first: C | None = None,
    ) -> AsyncGenerator[C, None]:
        """A streamed reply: ``first`` (if any), one ``piece`` per delta with text, then the last
        piece with the finish reason, the text that came with it and the usage."""
        if first is not None:
            yield first
        stream = self._open(tokens, params, flight)
        first_token = self.on_first_token
        last: Delta | None = None
        async with contextlib.aclosing(stream):
            try:
                async for delta in stream:
                    if first_token is not None:
                        first_token(time.perf_counter() - flight.started)
                        first_token = None
                    last = delta
                    # The delta with the finish reason goes out below, with the usage.
                    if delta.finish_reason is None and delta.text:
                        yield piece(delta.text, None, None)
            except EngineClosedError as exc:
                raise Unavailable(f"{self.label} is shutting down") from exc
        tail = last.text if last is not None and last.finish_reason else ""
        yield piece(tail, _finish(last), self._usage(len(tokens), last.completion_tokens if last else 0))

    # -- generate

    async def generate(self, req: GenerateRequest, flight: Flight) -> CompletionBody:
        config = req.generate_config or _NO_CONFIG
        tokens = self._tokens_now(req.prompt, True)
        if tokens is None:
            tokens = await self._tokenize(req.prompt, add_special_tokens=True)
        params = self._sampling(config, len(tokens))
        cid = _completion_id("cmpl")
        created = int(time.time())
        text, last = await self._complete(tokens, params, flight)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": self.model_uid,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(last)}],
            "usage": self._usage(len(tokens), last.completion_tokens if last else 0),
        }

    async def generate_stream(
        self, req: GenerateRequest, flight: Flight
    ) -> AsyncGenerator[CompletionChunkBody, None]:
        tokens = await self._prompt(req.prompt, True)
        params = self._sampling(req.generate_config or _NO_CONFIG, len(tokens))
        cid = _completion_id("cmpl")
        created = int(time.time())
        uid = self.model_uid

        def piece(text: str, finish: str | None, used: UsageBody | None) -> CompletionChunkBody:
            chunk: CompletionChunkBody = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": uid,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
            if used is not None:
                chunk["usage"] = used
            return chunk

        return self._chunks(tokens, params, flight, piece)

    # -- chat

    def _chat_prompt(self, req: ChatRequest) -> tuple[ChatPrompt, tuple[str, ...], tuple[int, ...]]:
        """The prompt of a chat, and its stop strings and token ids."""
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
        return (
            prompt,
            _stop_union(prompt.stop, definition.stop),
            _stop_union(prompt.stop_token_ids, definition.stop_token_ids),
        )

    async def chat(self, req: ChatRequest, flight: Flight) -> ChatCompletionBody:
        prompt, stop, stop_ids = self._chat_prompt(req)
        tokens = self._tokens_now(prompt.text, prompt.add_special_tokens)
        if tokens is None:
            tokens = await self._tokenize(prompt.text, add_special_tokens=prompt.add_special_tokens)
        config = req.generate_config or _NO_CONFIG
        params = self._sampling(config, len(tokens), stop=stop, stop_token_ids=stop_ids)
        cid = _completion_id("chatcmpl")
        created = int(time.time())
        text, last = await self._complete(tokens, params, flight)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_uid,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish(last),
                }
            ],
            "usage": self._usage(len(tokens), last.completion_tokens if last else 0),
        }

    async def chat_stream(
        self, req: ChatRequest, flight: Flight
    ) -> AsyncGenerator[ChatCompletionChunkBody, None]:
        prompt, stop, stop_ids = self._chat_prompt(req)
        tokens = await self._prompt(prompt.text, prompt.add_special_tokens)
        config = req.generate_config or _NO_CONFIG
        params = self._sampling(config, len(tokens), stop=stop, stop_token_ids=stop_ids)
        cid = _completion_id("chatcmpl")
        created = int(time.time())
        uid = self.model_uid

        def chunk(delta: dict[str, Any], finish: str | None) -> ChatCompletionChunkBody:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": uid,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        def piece(text: str, finish: str | None, used: UsageBody | None) -> ChatCompletionChunkBody:
            body = chunk({"content": text} if text else {}, finish)
            if used is not None:
                body["usage"] = used
            return body

        return self._chunks(tokens, params, flight, piece, chunk({"role": "assistant"}, None))


def _finish(last: Delta | None) -> str:
    # An engine that ends without a reason ran out of prompt (echo) or was cut short: "stop".
    if last is None or last.finish_reason is None:
        return "stop"
    return last.finish_reason
