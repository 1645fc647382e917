"""The typed replies of the model endpoints, made without validation, and their wire form.

A replica answers with broker_client's reply models: :class:`~broker_client.Completion`,
:class:`~broker_client.CompletionChunk`, :class:`~broker_client.ChatCompletion`,
:class:`~broker_client.ChatCompletionChunk` and :class:`~broker_client.EmbeddingList`. One is
made per request (per chunk, streaming), from values the replica computed itself, so nothing
here validates: each model is made as ``model_construct`` makes it, without its loop over every
field and alias (that loop, for a completion and its choice and usage, cost about 9 us against
the ~40 us of worker CPU a small request takes; this costs under 2 us, validation more than 3).

:func:`wire` gives the body the endpoints encode: the fields that were set, in the models' field
order, nested models included, which is ``model_dump(exclude_unset=True)`` without pydantic's
serializer (another 2-3 us). So a chunk that carries no usage has no ``usage`` key, and an
embedding list's usage has no ``completion_tokens``, as the replies always had.
``tests/test_replies.py`` holds both to pydantic's own ``model_construct`` and
``model_dump``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from broker_client import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionChunk,
    Embedding,
    EmbeddingList,
    Usage,
)

__all__ = [
    "Reply",
    "chat_chunk",
    "chat_completion",
    "completion",
    "completion_chunk",
    "embedding_list",
    "usage",
    "wire",
]

Reply = Completion | CompletionChunk | ChatCompletion | ChatCompletionChunk | EmbeddingList
M = TypeVar("M", bound=BaseModel)

_new = object.__new__
# The setters of BaseModel's four slots, which model_construct sets through object.__setattr__
# (the descriptors themselves: a fifth less per model).
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _every_field(cls: type[BaseModel]) -> set[str]:
    return set(cls.model_fields)


# The fields set of a model made with every field given: one set per class, shared by all of
# them. pydantic only ever adds to a model's fields set (an assignment adds the field's name),
# which changes nothing in a set that holds every name already; a model made with some fields
# unset gets a set of its own.
_USAGE = _every_field(Usage)
_COMPLETION_CHOICE = _every_field(CompletionChoice)
_COMPLETION = _every_field(Completion)
_CHAT_CHOICE = _every_field(ChatChoice)
_CHAT_CHUNK_CHOICE = _every_field(ChatChunkChoice)
_CHAT_COMPLETION = _every_field(ChatCompletion)
_EMBEDDING = _every_field(Embedding)
_EMBEDDING_LIST = _every_field(EmbeddingList)
_CHUNK = _every_field(CompletionChunk)
assert _CHUNK == _every_field(ChatCompletionChunk)
# What a chunk without usage and an embedding list's usage have set.
_CHUNK_WITHOUT_USAGE = frozenset(_CHUNK - {"usage"})
_EMBEDDING_USAGE = frozenset(_USAGE - {"completion_tokens"})


def _made(cls: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """``cls.model_construct(**values)`` for ``values`` that hold every field of ``cls`` in its
    order; ``fields_set``: the ones that count as given."""
    model = _new(cls)
    _set_dict(model, values)
    _set_fields_set(model, fields_set)
    # The reply models keep extra keys (extra="allow"): model_construct gives them a dict.
    _set_extra(model, {})
    _set_private(model, None)
    return model


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return _made(
        Usage,
        {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        _USAGE,
    )


def completion(cid: str, created: int, model: str, text: str, finish_reason: str, used: Usage) -> Completion:
    choice = _made(
        CompletionChoice,
        {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason},
        _COMPLETION_CHOICE,
    )
    return _made(
        Completion,
        {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": used,
        },
        _COMPLETION,
    )


def completion_chunk(
    cid: str, created: int, model: str, text: str, finish_reason: str | None, used: Usage | None = None
) -> CompletionChunk:
    """One streamed piece of a completion; only the last one carries ``used``."""
    choice = _made(
        CompletionChoice,
        {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason},
        _COMPLETION_CHOICE,
    )
    values: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": used,
    }
    return _made(CompletionChunk, values, _CHUNK if used is not None else set(_CHUNK_WITHOUT_USAGE))


def chat_completion(
    cid: str, created: int, model: str, content: str, finish_reason: str, used: Usage
) -> ChatCompletion:
    choice = _made(
        ChatChoice,
        {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        },
        _CHAT_CHOICE,
    )
    return _made(
        ChatCompletion,
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": used,
        },
        _CHAT_COMPLETION,
    )


def chat_chunk(
    cid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    used: Usage | None = None,
) -> ChatCompletionChunk:
    """One streamed piece of a chat completion; only the last one carries ``used``."""
    choice = _made(
        ChatChunkChoice, {"index": 0, "delta": delta, "finish_reason": finish_reason}, _CHAT_CHUNK_CHOICE
    )
    values: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": used,
    }
    return _made(ChatCompletionChunk, values, _CHUNK if used is not None else set(_CHUNK_WITHOUT_USAGE))


def embedding_list(model: str, vectors: Sequence[list[float]], prompt_tokens: int) -> EmbeddingList:
    data = [
        _made(Embedding, {"object": "embedding", "index": i, "embedding": vector}, _EMBEDDING)
        for i, vector in enumerate(vectors)
    ]
    used = _made(
        Usage,
        {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens},
        set(_EMBEDDING_USAGE),
    )
    return _made(
        EmbeddingList, {"object": "list", "data": data, "model": model, "usage": used}, _EMBEDDING_LIST
    )


# ----------------------------------------------------------------------------- wire form


def _given(model: BaseModel) -> dict[str, Any]:
    """The model's set fields in field order, then its extra keys: its own ``__dict__`` (not a
    copy) when that is all of it; the encoder only reads it."""
    values = model.__dict__
    given = model.__pydantic_fields_set__
    if len(given) != len(values):
        values = {k: v for k, v in values.items() if k in given}
    extra = model.__pydantic_extra__
    return {**values, **extra} if extra else values


def _with_choices(
    reply: Completion | CompletionChunk | ChatCompletion | ChatCompletionChunk,
) -> dict[str, Any]:
    body = _given(reply).copy()
    body["choices"] = list(map(_given, body["choices"]))
    used = body.get("usage")
    if used is not None:
        body["usage"] = _given(used)
    return body


def _embeddings(reply: EmbeddingList) -> dict[str, Any]:
    body = _given(reply).copy()
    body["data"] = list(map(_given, body["data"]))
    body["usage"] = _given(body["usage"])
    return body


_WIRE: dict[type[BaseModel], Callable[[Any], dict[str, Any]]] = {
    Completion: _with_choices,
    CompletionChunk: _with_choices,
    ChatCompletion: _with_choices,
    ChatCompletionChunk: _with_choices,
    EmbeddingList: _embeddings,
}


def wire(reply: Reply) -> dict[str, Any]:
    """The body of ``reply`` as the endpoints send it (``model_dump(exclude_unset=True)``)."""
    return _WIRE[type(reply)](reply)
