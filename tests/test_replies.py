"""workers.replies without a server: the typed replies are pydantic's own, and their wire form is
the bodies the worker always sent, byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker_client import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    EmbeddingList,
    codec,
)
from workers import replies

CID, CREATED, UID = "cmpl-x1", 1_700_000_000, "m-1"


def _cases() -> list[tuple[replies.Reply, dict[str, Any]]]:
    """Each builder's reply and the body the worker sent for it before the replies were typed."""
    return [
        (
            replies.completion(CID, CREATED, UID, "hello", "length", replies.usage(3, 5)),
            {
                "id": CID,
                "object": "text_completion",
                "created": CREATED,
                "model": UID,
                "choices": [{"text": "hello", "index": 0, "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            },
        ),
        (
            replies.completion_chunk(CID, CREATED, UID, "he", None),
            {
                "id": CID,
                "object": "text_completion",
                "created": CREATED,
                "model": UID,
                "choices": [{"text": "he", "index": 0, "logprobs": None, "finish_reason": None}],
            },
        ),
        (
            replies.completion_chunk(CID, CREATED, UID, "", "stop", replies.usage(3, 1)),
            {
                "id": CID,
                "object": "text_completion",
                "created": CREATED,
                "model": UID,
                "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            },
        ),
        (
            replies.chat_completion(CID, CREATED, UID, "hi there", "stop", replies.usage(7, 2)),
            {
                "id": CID,
                "object": "chat.completion",
                "created": CREATED,
                "model": UID,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi there"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
            },
        ),
        (
            replies.chat_chunk(CID, CREATED, UID, {"role": "assistant"}, None),
            {
                "id": CID,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": UID,
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
            },
        ),
        (
            replies.chat_chunk(CID, CREATED, UID, {}, "length", replies.usage(7, 4)),
            {
                "id": CID,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": UID,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
            },
        ),
        (
            replies.embedding_list(UID, [[0.25, -1.5], [3.0, 0.0]], 6),
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.25, -1.5]},
                    {"object": "embedding", "index": 1, "embedding": [3.0, 0.0]},
                ],
                "model": UID,
                "usage": {"prompt_tokens": 6, "total_tokens": 6},
            },
        ),
    ]


CASES = _cases()
IDS = [f"{type(reply).__name__}-{i}" for i, (reply, _) in enumerate(CASES)]


@pytest.mark.parametrize(("reply", "sent"), CASES, ids=IDS)
def test_the_wire_form_is_what_the_worker_sent(reply: replies.Reply, sent: dict[str, Any]) -> None:
    body = replies.wire(reply)
    # Same keys in the same order, in both encodings.
    assert json.dumps(body) == json.dumps(sent)
    for content_type in (codec.JSON, codec.MSGPACK):
        assert codec.encode(body, content_type) == codec.encode(sent, content_type)


@pytest.mark.parametrize(("reply", "sent"), CASES, ids=IDS)
def test_the_wire_form_is_pydantics_dump_of_the_set_fields(reply: replies.Reply, sent: object) -> None:
    assert json.dumps(replies.wire(reply)) == json.dumps(reply.model_dump(exclude_unset=True))


@pytest.mark.parametrize(("reply", "sent"), CASES, ids=IDS)
def test_the_replies_are_what_pydantic_makes(reply: replies.Reply, sent: dict[str, Any]) -> None:
    """As model_construct makes them (field values, fields set, extras), and valid: validating
    the sent body gives an equal model."""
    cls = type(reply)
    assert cls in (Completion, CompletionChunk, ChatCompletion, ChatCompletionChunk, EmbeddingList)
    validated = cls.model_validate(sent)
    assert reply == validated
    assert reply.model_fields_set == validated.model_fields_set
    assert reply.model_extra == validated.model_extra == {}
    # Fields left unset still read as their defaults, as model_construct gives them.
    assert reply.model_dump() == validated.model_dump()


def test_nested_models_are_typed() -> None:
    reply = replies.completion(CID, CREATED, UID, "x", "stop", replies.usage(1, 1))
    assert reply.choices[0].text == "x" and reply.usage.total_tokens == 2
    chunk = replies.chat_chunk(CID, CREATED, UID, {"content": "y"}, None)
    assert chunk.usage is None and chunk.choices[0].delta == {"content": "y"}
    embeddings = replies.embedding_list(UID, [[1.0]], 2)
    assert embeddings.data[0].embedding == [1.0] and embeddings.usage.completion_tokens == 0


def test_a_reply_changed_after_it_was_made_is_sent_as_changed() -> None:
    chunk = replies.completion_chunk(CID, CREATED, UID, "a", None)
    chunk.usage = replies.usage(1, 1)
    assert replies.wire(chunk)["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert replies.wire(chunk) == chunk.model_dump(exclude_unset=True)
