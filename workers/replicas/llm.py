"""A causal LM replica: requests to token ids and sampling parameters, the engine's deltas to
typed completions.

The engine (:class:`~workers.engines.BatchingEngine`, its static-slot variant on CUDA, or the
model-less :class:`~workers.engines.EchoEngine`) does the batching and sampling; this replica
checks a request against the context (and the replica's limits), opens the engine's stream and
turns its :class:`~workers.engines.Delta` s into OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

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
from ..engines.api import Constraint, InvalidRequestError, TokenLogprob
from ..replies import (
    ChatChoiceBody,
    ChatChunkChoiceBody,
    ChatCompletionBody,
    ChatCompletionChunkBody,
    CompletionBody,
    CompletionChoiceBody,
    CompletionChunkBody,
    CompletionLogprobsBody,
    UsageBody,
)
from ..tools import (
    ParsedCalls,
    ToolParser,
    ToolStreamSplitter,
    choose_parser,
    forced_call_schema,
    parse_forced_call,
    parse_tool_calls,
    tool_call_body,
)
from .base import Flight, Replica
from .choices import ChoiceState, TokenTexts, chat_logprobs, completion_logprobs

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


# The keys that ask the engine for more than plain sampling, and those that change the reply's
# shape (n choices, logprobs, the echo, tool calls, the usage chunk): a request with none of the
# latter takes the plain path, one Delta stream read as it always was.
_ENGINE_KEYS = frozenset(
    {
        "n",
        "logprobs",
        "top_logprobs",
        "echo",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_p",
        "logit_bias",
        "response_format",
        "regex",
        "choice",
    }
)
_SHAPE_KEYS = frozenset(
    {"n", "logprobs", "top_logprobs", "echo", "stream_options", "tools", "tool_choice", "parallel_tool_calls"}
)


def _shaped(config: GenerateConfig) -> bool:
    # The fields set, read without model_fields_set's property: 90 ns against 250 ns a request
    # (timeit, on this loaded machine), on the path every plain request takes.
    return not _SHAPE_KEYS.isdisjoint(config.__pydantic_fields_set__)


def _output_constraint(config: GenerateConfig) -> Constraint | None:
    """The constraint a response_format, regex or choice asks for (the wire allows one)."""
    response_format = config.response_format
    if response_format is not None:
        if response_format.type == "json_object":
            return Constraint("json_object")
        if response_format.type == "json_schema":
            schema = response_format.json_schema.schema_
            return Constraint("json_object") if schema is None else Constraint("json_schema", schema)
    if config.regex is not None:
        return Constraint("regex", config.regex)
    if config.choice is not None:
        return Constraint("choice", tuple(config.choice))
    return None


@dataclass(frozen=True, slots=True)
class _ToolMode:
    """A chat's tools, as this request uses them."""

    tools: list[dict[str, Any]]
    parser: ToolParser
    names: tuple[str, ...]
    forced: bool  # tool_choice "required" or a named function: decoded under a schema
    parallel: bool

    def parse(self, text: str) -> ParsedCalls:
        if self.forced:
            return parse_forced_call(text, self.parser)
        return parse_tool_calls(text, self.parser, self.names)


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
        kind: Literal["completion", "chat"] = "completion",
        constraint: Constraint | None = None,
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
        extra: dict[str, Any] = {}
        if constraint is not None or not _ENGINE_KEYS.isdisjoint(config.__pydantic_fields_set__):
            extra = self._engine_features(config, kind, constraint)
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
                **extra,
            )
        except ValueError as exc:
            raise BadRequest(f"generate_config: {exc}") from exc

    def _engine_features(
        self, config: GenerateConfig, kind: str, constraint: Constraint | None
    ) -> dict[str, Any]:
        """The SamplingParams fields beyond plain sampling that ``config`` asks for."""
        out: dict[str, Any] = {}
        if config.n is not None:
            out["n"] = config.n
        logprobs = config.logprobs
        if kind == "completion":
            if logprobs is not None and logprobs is not True and logprobs is not False:
                out["logprobs"] = logprobs
                if config.echo:
                    out["prompt_logprobs"] = logprobs
        elif logprobs is True:
            out["logprobs"] = config.top_logprobs or 0
        for key in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(config, key)
            if value is not None:
                out[key] = float(value)
        if config.logit_bias:
            out["logit_bias"] = self._logit_bias(config.logit_bias)
        constraint = constraint or _output_constraint(config)
        if constraint is not None:
            out["constraint"] = constraint
        return out

    def _logit_bias(self, bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
        size = len(self.tokenizer) if self.tokenizer is not None else None
        pairs = []
        for key, value in bias.items():
            token = int(key)
            if size is not None and token >= size:
                raise BadRequest(
                    f"generate_config.logit_bias: token id {token} is not in the vocabulary of "
                    f"model {self.model_uid!r} ({size} tokens)"
                )
            pairs.append((token, float(value)))
        return tuple(pairs)

    def _open(
        self, tokens: Sequence[Any], params: SamplingParams, flight: Flight, *, stream: bool = True
    ) -> Any:
        """The engine's stream of Deltas for this request (an async iterator with ``aclose``)."""
        try:
            return self._engine().generate(tokens, params, request_id=flight.request_id, stream=stream)
        except (ValueError, InvalidRequestError) as exc:
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

    # -- n choices, logprobs, echo, tools, the usage chunk

    def _token_texts(self) -> TokenTexts:
        texts: TokenTexts | None = getattr(self, "_texts", None)
        if texts is None or texts._tokenizer is not self.tokenizer:
            texts = self._texts = TokenTexts(self.tokenizer)
        return texts

    async def _collect(
        self, tokens: Sequence[Any], params: SamplingParams, flight: Flight
    ) -> tuple[list[ChoiceState], list[TokenLogprob | None] | None]:
        """Every choice of a whole reply, and the prompt's logprobs when asked."""
        keep = params.logprobs is not None
        states = [ChoiceState(i) for i in range(params.n)]
        prompt_logprobs: list[TokenLogprob | None] | None = None
        remaining = params.n
        first_token = self.on_first_token
        stream = self._open(tokens, params, flight, stream=False)
        try:
            async for delta in stream:
                if first_token is not None:
                    first_token(time.perf_counter() - flight.started)
                    first_token = None
                states[delta.index].add(delta, keep=keep)
                if delta.prompt_logprobs is not None:
                    prompt_logprobs = delta.prompt_logprobs
                if delta.finish_reason is not None:
                    remaining -= 1
                    if not remaining:
                        break
        except EngineClosedError as exc:
            raise Unavailable(f"{self.label} is shutting down") from exc
        except InvalidRequestError as exc:
            raise BadRequest(f"request to model {self.model_uid!r} rejected: {exc}") from exc
        finally:
            if remaining:
                await stream.aclose()
        return states, prompt_logprobs

    def _shaped_usage(self, prompt_tokens: int, states: Sequence[ChoiceState]) -> UsageBody:
        # OpenAI counts the prompt once and the completion tokens of every choice.
        return self._usage(prompt_tokens, sum(state.completion_tokens for state in states))

    def _completion_logprobs(
        self,
        tokens: Sequence[Any],
        prompt_logprobs: Sequence[TokenLogprob | None] | None,
        prompt_text: str | None,
        ids: Sequence[Any],
        entries: Sequence[TokenLogprob] | None,
        offset: int,
    ) -> tuple[CompletionLogprobsBody, int]:
        """A completion's logprobs for ``ids``, after the prompt's when ``prompt_text`` (the echo)."""
        texts = self._token_texts()
        body, end = completion_logprobs(ids, entries or None, texts, offset)
        if prompt_text is None:
            return body, end
        echoed, _ = completion_logprobs(tokens, prompt_logprobs, texts, 0)
        if offset == 0:  # the completion's offsets start after the echoed prompt
            body, end = completion_logprobs(ids, entries or None, texts, len(prompt_text))
        merged: CompletionLogprobsBody = {
            "tokens": echoed["tokens"] + body["tokens"],
            "token_logprobs": echoed["token_logprobs"] + body["token_logprobs"],
            "top_logprobs": echoed["top_logprobs"] + body["top_logprobs"],
            "text_offset": echoed["text_offset"] + body["text_offset"],
        }
        return merged, end

    async def _shaped_completion(
        self, req: GenerateRequest, config: GenerateConfig, tokens: Sequence[Any], flight: Flight
    ) -> CompletionBody:
        params = self._sampling(config, len(tokens))
        cid = _completion_id("cmpl")
        created = int(time.time())
        states, prompt_logprobs = await self._collect(tokens, params, flight)
        echo = req.prompt if config.echo else None
        choices: list[CompletionChoiceBody] = []
        for state in states:
            logprobs = None
            if params.logprobs is not None:
                logprobs, _ = self._completion_logprobs(
                    tokens, prompt_logprobs, echo, state.token_ids, state.entries, 0
                )
            text = state.text if echo is None else echo + state.text
            choices.append(
                {"text": text, "index": state.index, "logprobs": logprobs, "finish_reason": _reason(state)}
            )
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": self.model_uid,
            "choices": choices,
            "usage": self._shaped_usage(len(tokens), states),
        }

    async def _shaped_completion_stream(
        self, req: GenerateRequest, config: GenerateConfig, tokens: Sequence[Any], flight: Flight
    ) -> AsyncGenerator[CompletionChunkBody, None]:
        params = self._sampling(config, len(tokens))
        cid = _completion_id("cmpl")
        created = int(time.time())
        uid = self.model_uid
        echo = req.prompt if config.echo else None
        include_usage = bool(config.stream_options and config.stream_options.include_usage)

        def chunk(choices: list[CompletionChoiceBody]) -> CompletionChunkBody:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": uid,
                "choices": choices,
            }

        async def chunks() -> AsyncGenerator[CompletionChunkBody, None]:
            states = [ChoiceState(i) for i in range(params.n)]
            prompt_logprobs: list[TokenLogprob | None] | None = None
            remaining = params.n
            usage: UsageBody | None = None
            first_token = self.on_first_token
            stream = self._open(tokens, params, flight)
            async with contextlib.aclosing(stream):
                try:
                    async for delta in stream:
                        if first_token is not None:
                            first_token(time.perf_counter() - flight.started)
                            first_token = None
                        if delta.prompt_logprobs is not None:
                            prompt_logprobs = delta.prompt_logprobs
                        state = states[delta.index]
                        state.add(delta, keep=False)
                        text = delta.text
                        prompt = None
                        if not state.started:
                            state.started = True
                            if echo is not None:
                                prompt, text = echo, echo + text
                        logprobs = None
                        if params.logprobs is not None:
                            logprobs, state.offset = self._completion_logprobs(
                                tokens, prompt_logprobs, prompt, delta.token_ids, delta.logprobs, state.offset
                            )
                        elif prompt is not None:
                            state.offset = len(prompt)
                        if params.logprobs is None:
                            state.offset += len(delta.text)
                        finish = None if delta.finish_reason is None else _reason(state)
                        if finish is None and not text and not (logprobs and logprobs["tokens"]):
                            continue
                        body = chunk(
                            [
                                {
                                    "text": text,
                                    "index": state.index,
                                    "logprobs": logprobs,
                                    "finish_reason": finish,
                                }
                            ]
                        )
                        if finish is not None:
                            remaining -= 1
                            if not remaining:
                                usage = self._shaped_usage(len(tokens), states)
                                if not include_usage:
                                    body["usage"] = usage
                        yield body
                        if not remaining:
                            break
                except EngineClosedError as exc:
                    raise Unavailable(f"{self.label} is shutting down") from exc
                except InvalidRequestError as exc:
                    raise BadRequest(f"request to model {uid!r} rejected: {exc}") from exc
            if usage is None:  # the engine ended some choices without a reason
                usage = self._shaped_usage(len(tokens), states)
                for state in states:
                    if state.finish_reason is None:
                        body = chunk(
                            [{"text": "", "index": state.index, "logprobs": None, "finish_reason": "stop"}]
                        )
                        yield body
                if not include_usage:
                    yield {**chunk([]), "usage": usage}
            if include_usage:
                yield {**chunk([]), "usage": usage}

        return chunks()

    def _tool_mode(self, config: GenerateConfig) -> _ToolMode | None:
        if not config.tools or config.tool_choice == "none":
            return None
        definition = self.definition
        assert isinstance(definition, LLMDefinition)
        template = definition.chat_template or getattr(self.tokenizer, "chat_template", None)
        parser = choose_parser(
            definition.tool_parser,
            chat_template=template if isinstance(template, str) else None,
            model_family=definition.model_family or definition.model_name,
        )
        tools = [tool.model_dump(exclude_none=True) for tool in config.tools]
        choice = config.tool_choice
        forced = choice not in (None, "auto")
        return _ToolMode(
            tools=tools,
            parser=parser,
            names=tuple(tool["function"]["name"] for tool in tools),
            forced=forced,
            parallel=config.parallel_tool_calls is not False,
        )

    def _tool_constraint(self, config: GenerateConfig, mode: _ToolMode | None) -> Constraint | None:
        if mode is None or not mode.forced:
            return None
        name = config.tool_choice.function.name if not isinstance(config.tool_choice, str) else None  # type: ignore[union-attr]
        return Constraint("json_schema", forced_call_schema(mode.tools, mode.parser, name))

    def _chat_message(self, state: ChoiceState, mode: _ToolMode | None) -> tuple[dict[str, Any], str]:
        """A whole reply's message and finish reason."""
        text = state.text
        finish = _reason(state)
        if mode is not None:
            parsed = mode.parse(text)
            if parsed.calls:
                calls = parsed.calls if mode.parallel else parsed.calls[:1]
                message = {
                    "role": "assistant",
                    "content": parsed.content,
                    "tool_calls": [tool_call_body(name, arguments) for name, arguments in calls],
                }
                return message, "tool_calls"
        return {"role": "assistant", "content": text}, finish

    async def _shaped_chat(
        self, req: ChatRequest, config: GenerateConfig, flight: Flight
    ) -> ChatCompletionBody:
        mode = self._tool_mode(config)
        prompt, stop, stop_ids = self._chat_prompt(req, mode)
        tokens = await self._prompt(prompt.text, prompt.add_special_tokens)
        params = self._sampling(
            config,
            len(tokens),
            stop=stop,
            stop_token_ids=stop_ids,
            kind="chat",
            constraint=self._tool_constraint(config, mode),
        )
        cid = _completion_id("chatcmpl")
        created = int(time.time())
        states, _ = await self._collect(tokens, params, flight)
        texts = self._token_texts()
        choices: list[ChatChoiceBody] = []
        for state in states:
            message, finish = self._chat_message(state, mode)
            choice: ChatChoiceBody = {"index": state.index, "message": message}  # type: ignore[typeddict-item]
            if params.logprobs is not None:
                choice["logprobs"] = chat_logprobs(state.entries, texts)
            choice["finish_reason"] = finish
            choices.append(choice)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": self.model_uid,
            "choices": choices,
            "usage": self._shaped_usage(len(tokens), states),
        }

    async def _shaped_chat_stream(
        self, req: ChatRequest, config: GenerateConfig, flight: Flight
    ) -> AsyncGenerator[ChatCompletionChunkBody, None]:
        mode = self._tool_mode(config)
        prompt, stop, stop_ids = self._chat_prompt(req, mode)
        tokens = await self._prompt(prompt.text, prompt.add_special_tokens)
        params = self._sampling(
            config,
            len(tokens),
            stop=stop,
            stop_token_ids=stop_ids,
            kind="chat",
            constraint=self._tool_constraint(config, mode),
        )
        cid = _completion_id("chatcmpl")
        created = int(time.time())
        uid = self.model_uid
        include_usage = bool(config.stream_options and config.stream_options.include_usage)
        asked = params.logprobs is not None
        texts = self._token_texts()

        def chunk(choices: list[ChatChunkChoiceBody]) -> ChatCompletionChunkBody:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": uid,
                "choices": choices,
            }

        def choice(
            index: int, delta: dict[str, Any], entries: list[TokenLogprob] | None, finish: str | None
        ) -> ChatChunkChoiceBody:
            body: ChatChunkChoiceBody = {"index": index, "delta": delta}  # type: ignore[typeddict-item]
            if asked:
                body["logprobs"] = chat_logprobs(entries, texts) if entries else None
            body["finish_reason"] = finish
            return body

        async def chunks() -> AsyncGenerator[ChatCompletionChunkBody, None]:
            yield chunk([choice(i, {"role": "assistant"}, None, None) for i in range(params.n)])
            states = [ChoiceState(i) for i in range(params.n)]
            splitters = (
                [ToolStreamSplitter(mode.parser, mode.names) for _ in range(params.n)]
                if mode is not None and not mode.forced
                else None
            )
            pending: list[list[TokenLogprob]] = [[] for _ in range(params.n)]
            remaining = params.n
            usage: UsageBody | None = None
            first_token = self.on_first_token
            stream = self._open(tokens, params, flight)
            async with contextlib.aclosing(stream):
                try:
                    async for delta in stream:
                        if first_token is not None:
                            first_token(time.perf_counter() - flight.started)
                            first_token = None
                        index = delta.index
                        state = states[index]
                        state.add(delta, keep=mode is not None and mode.forced)
                        if delta.logprobs:
                            pending[index].extend(delta.logprobs)
                        text = delta.text
                        if mode is not None:
                            # A forced call is one JSON object: all of it at the end.
                            text = "" if splitters is None else splitters[index].feed(text)
                        if text:
                            yield chunk([choice(index, {"content": text}, pending[index], None)])
                            pending[index] = []
                        if delta.finish_reason is None:
                            continue
                        finish = _reason(state)
                        if mode is not None:
                            parsed = (
                                mode.parse(state.text) if splitters is None else splitters[index].finish()
                            )
                            if parsed.content:
                                yield chunk(
                                    [choice(index, {"content": parsed.content}, pending[index], None)]
                                )
                                pending[index] = []
                            if parsed.calls:
                                calls = parsed.calls if mode.parallel else parsed.calls[:1]
                                delta_calls = [tool_call_body(n, a, j) for j, (n, a) in enumerate(calls)]
                                yield chunk(
                                    [choice(index, {"tool_calls": delta_calls}, pending[index], None)]
                                )
                                pending[index] = []
                                finish = "tool_calls"
                        remaining -= 1
                        body = chunk([choice(index, {}, pending[index], finish)])
                        pending[index] = []
                        if not remaining:
                            usage = self._shaped_usage(len(tokens), states)
                            if not include_usage:
                                body["usage"] = usage
                        yield body
                        if not remaining:
                            break
                except EngineClosedError as exc:
                    raise Unavailable(f"{self.label} is shutting down") from exc
                except InvalidRequestError as exc:
                    raise BadRequest(f"request to model {uid!r} rejected: {exc}") from exc
            if usage is None:  # the engine ended some choices without a reason
                usage = self._shaped_usage(len(tokens), states)
                for state in states:
                    if state.finish_reason is None:
                        yield chunk([choice(state.index, {}, None, "stop")])
                if not include_usage:
                    yield {**chunk([]), "usage": usage}
            if include_usage:
                yield {**chunk([]), "usage": usage}

        return chunks()

    # -- generate

    async def generate(self, req: GenerateRequest, flight: Flight) -> CompletionBody:
        config = req.generate_config or _NO_CONFIG
        tokens = self._tokens_now(req.prompt, True)
        if tokens is None:
            tokens = await self._tokenize(req.prompt, add_special_tokens=True)
        if _shaped(config):
            return await self._shaped_completion(req, config, tokens, flight)
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
        config = req.generate_config or _NO_CONFIG
        if _shaped(config):
            return await self._shaped_completion_stream(req, config, tokens, flight)
        params = self._sampling(config, len(tokens))
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

    def _chat_prompt(
        self, req: ChatRequest, tools: _ToolMode | None = None
    ) -> tuple[ChatPrompt, tuple[str, ...], tuple[int, ...]]:
        """The prompt of a chat, and its stop strings and token ids."""
        definition = self.definition
        assert isinstance(definition, LLMDefinition)
        prompt = build_chat_prompt(
            req.messages,
            model=self.model_uid,
            chat_template=definition.chat_template,
            prompt_style=definition.prompt_style,
            tokenizer=self.tokenizer,
            tools=tools.tools if tools is not None else None,
            tool_parser=tools.parser if tools is not None else "hermes",
        )
        # The definition's own stop lists (Xinference v2 keeps them outside prompt_style).
        return (
            prompt,
            _stop_union(prompt.stop, definition.stop),
            _stop_union(prompt.stop_token_ids, definition.stop_token_ids),
        )

    async def chat(self, req: ChatRequest, flight: Flight) -> ChatCompletionBody:
        config = req.generate_config or _NO_CONFIG
        if _shaped(config):
            return await self._shaped_chat(req, config, flight)
        prompt, stop, stop_ids = self._chat_prompt(req)
        tokens = self._tokens_now(prompt.text, prompt.add_special_tokens)
        if tokens is None:
            tokens = await self._tokenize(prompt.text, add_special_tokens=prompt.add_special_tokens)
        params = self._sampling(config, len(tokens), stop=stop, stop_token_ids=stop_ids, kind="chat")
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
        config = req.generate_config or _NO_CONFIG
        if _shaped(config):
            return await self._shaped_chat_stream(req, config, flight)
        prompt, stop, stop_ids = self._chat_prompt(req)
        tokens = await self._prompt(prompt.text, prompt.add_special_tokens)
        params = self._sampling(config, len(tokens), stop=stop, stop_token_ids=stop_ids, kind="chat")
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


def _reason(state: ChoiceState) -> str:
    return state.finish_reason or "stop"


def _finish(last: Delta | None) -> str:
    # An engine that ends without a reason ran out of prompt (echo) or was cut short: "stop".
    if last is None or last.finish_reason is None:
        return "stop"
    return last.finish_reason
