"""The typed replies without a server: each body type mirrors its broker_client model, and what
the replicas build is, key for key and in order, the model's own dump of it.

The LLM replica runs the echo engine (no model); the embedding replica gets a stand-in engine,
the one layer faked here, since only the reply around its vectors is under test."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, get_type_hints

import pytest
from pydantic import BaseModel

from broker_client import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    EmbeddingDefinition,
    EmbeddingList,
    EmbedRequest,
    GenerateRequest,
    LLMDefinition,
)
from workers import EmbeddingReplica, LLMReplica
from workers.engines import EchoEngine
from workers.replies import MODELS

SPEC = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"]}
LLM = LLMDefinition.model_validate(
    {
        "version": 1,
        "model_name": "echo",
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "context_length": 64,
        "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}",
        "model_specs": [{**SPEC, "model_uri": "echo:"}],
    }
)
EMBEDDER = EmbeddingDefinition.model_validate(
    {
        "version": 1,
        "model_name": "vectors",
        "model_lang": ["en"],
        "model_ability": ["embed"],
        "dimensions": 2,
        "max_tokens": 16,
        "model_specs": [{**SPEC, "model_uri": "/m"}],
    }
)


@pytest.mark.parametrize("body", list(MODELS), ids=lambda body: body.__name__)
def test_each_body_has_its_models_fields_in_order(body: type) -> None:
    model = MODELS[body]
    assert list(get_type_hints(body)) == list(model.model_fields)
    # What a reply may leave out, the model has a default for.
    for key in body.__optional_keys__:  # type: ignore[attr-defined]
        assert not model.model_fields[key].is_required(), f"{body.__name__}.{key}"


def _as_sent(model: type[BaseModel], body: Any) -> None:
    """``body`` is valid for ``model`` and is what the model dumps of what it set, in order."""
    parsed = model.model_validate(body)
    assert json.dumps(parsed.model_dump(exclude_unset=True)) == json.dumps(body)


def _llm() -> LLMReplica:
    return LLMReplica(
        engine=EchoEngine(context_length=64),
        tokenizer=None,
        context_length=64,
        model_uid="echo-1",
        replica_index=0,
        model_name="echo",
        definition=LLM,
        device="cpu",
    )


async def test_completions_and_their_chunks() -> None:
    replica = _llm()
    with replica.track("r1") as flight:
        reply = await replica.generate(GenerateRequest(prompt="one two three"), flight)
    _as_sent(Completion, reply)
    assert list(reply) == ["id", "object", "created", "model", "choices", "usage"]
    assert reply["choices"] == [
        {"text": "one two three", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}

    request = GenerateRequest.model_validate({"prompt": "one two", "generate_config": {"stream": True}})
    with replica.track("r2") as flight:
        chunks = [chunk async for chunk in await replica.generate_stream(request, flight)]
    for chunk in chunks:
        _as_sent(CompletionChunk, chunk)
    assert ["usage" in chunk for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "one two"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    await replica.close("done")


async def test_chat_completions_and_their_chunks() -> None:
    replica = _llm()
    messages = [{"role": "user", "content": "hi there"}]
    with replica.track("c1") as flight:
        reply = await replica.chat(ChatRequest.model_validate({"messages": messages}), flight)
    _as_sent(ChatCompletion, reply)
    [choice] = reply["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")

    request = ChatRequest.model_validate({"messages": messages, "generate_config": {"stream": True}})
    with replica.track("c2") as flight:
        chunks = [chunk async for chunk in await replica.chat_stream(request, flight)]
    for chunk in chunks:
        _as_sent(ChatCompletionChunk, chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "usage" in chunks[-1] and all("usage" not in chunk for chunk in chunks[:-1])
    streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert streamed == choice["message"]["content"]
    await replica.close("done")


class _Vectors:
    """The engine's part: two numbers per text, and a token per text."""

    async def aembed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return [[float(len(text)), -1.0] for text in texts], len(texts)


async def test_embedding_lists() -> None:
    replica = EmbeddingReplica(
        engine=_Vectors(),
        dimensions=2,
        max_length=16,
        model_uid="vectors-1",
        replica_index=0,
        model_name="vectors",
        definition=EMBEDDER,
        device="cpu",
    )
    with replica.track("e1") as flight:
        reply = await replica.embed(EmbedRequest(input=["ab", "abc"]), flight)
    _as_sent(EmbeddingList, reply)
    assert reply == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [2.0, -1.0]},
            {"object": "embedding", "index": 1, "embedding": [3.0, -1.0]},
        ],
        "model": "vectors-1",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    await replica.close("done")
