"""The typed replies of the model endpoints: the wire bodies of broker_client's reply models.

A replica answers with the body of a :class:`~broker_client.Completion`,
:class:`~broker_client.CompletionChunk`, :class:`~broker_client.ChatCompletion`,
:class:`~broker_client.ChatCompletionChunk` or :class:`~broker_client.EmbeddingList`, as the
``TypedDict`` of this module that mirrors the model: the keys of the model's fields in its field
order, the ones the reply leaves out (a chunk's ``usage`` before the last chunk, an embedding
list's ``completion_tokens``) not required. mypy checks every reply a replica builds against
them; ``tests/unit/test_replies.py`` holds each one to its pydantic model (the same fields in the
same order) and the replies the replicas build to ``model_validate`` of the model, dumped back
unchanged.

Dump-ready structures rather than the models themselves: a reply is made per request (per chunk
when streaming) from values the replica computed itself, and building it as pydantic models
cost about 5 us of the ~30 us of worker CPU a small request takes at concurrency 256, even made
without validation (the completion, its choice and its usage, as ``model_construct`` makes them,
then dumped): 10-15 % of the throughput of small requests (``bench/overhead.py``). A typed dict
costs what the hand-built dict it replaces did.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel

from broker_client import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Embedding,
    EmbeddingList,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)

__all__ = [
    "MODELS",
    "ChatChoiceBody",
    "ChatChunkChoiceBody",
    "ChatCompletionBody",
    "ChatCompletionChunkBody",
    "ChatLogprobsBody",
    "CompletionBody",
    "CompletionChoiceBody",
    "CompletionChunkBody",
    "CompletionLogprobsBody",
    "EmbeddingBody",
    "EmbeddingListBody",
    "TokenLogprobEntryBody",
    "TopLogprobBody",
    "UsageBody",
]


class UsageBody(TypedDict):
    prompt_tokens: int
    completion_tokens: NotRequired[int]  # not in an embedding list's usage
    total_tokens: int


class CompletionLogprobsBody(TypedDict):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoiceBody(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobsBody | None
    finish_reason: str | None  # "stop" or "length" on the last piece


class CompletionBody(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoiceBody]
    usage: UsageBody


class CompletionChunkBody(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoiceBody]
    usage: NotRequired[UsageBody]  # on the last chunk only


class TopLogprobBody(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntryBody(TypedDict):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobBody]


class ChatLogprobsBody(TypedDict):
    content: list[TokenLogprobEntryBody] | None


class ChatChoiceBody(TypedDict):
    index: int
    message: dict[str, Any]
    logprobs: NotRequired[ChatLogprobsBody | None]  # when asked
    finish_reason: str | None  # "stop", "length" or "tool_calls"


class ChatCompletionBody(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoiceBody]
    usage: UsageBody


class ChatChunkChoiceBody(TypedDict):
    index: int
    delta: dict[str, Any]
    logprobs: NotRequired[ChatLogprobsBody | None]  # when asked
    finish_reason: str | None


class ChatCompletionChunkBody(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoiceBody]
    usage: NotRequired[UsageBody]  # on the last chunk only


class EmbeddingBody(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float]


class EmbeddingListBody(TypedDict):
    object: Literal["list"]
    data: list[EmbeddingBody]
    model: str
    usage: UsageBody


# Each body and the broker_client model it is the wire form of.
MODELS: dict[type, type[BaseModel]] = {
    UsageBody: Usage,
    CompletionLogprobsBody: CompletionLogprobs,
    CompletionChoiceBody: CompletionChoice,
    CompletionBody: Completion,
    CompletionChunkBody: CompletionChunk,
    TopLogprobBody: TopLogprob,
    TokenLogprobEntryBody: TokenLogprobEntry,
    ChatLogprobsBody: ChatLogprobs,
    ChatChoiceBody: ChatChoice,
    ChatCompletionBody: ChatCompletion,
    ChatChunkChoiceBody: ChatChunkChoice,
    ChatCompletionChunkBody: ChatCompletionChunk,
    EmbeddingBody: Embedding,
    EmbeddingListBody: EmbeddingList,
}
