"""What the LLM replica makes of the engine's deltas when a request asks for more than one text:
n choices, logprobs in the completion and the chat shapes, the echo, tool calls (whole and
streamed), the usage chunk of ``stream_options.include_usage``, and the SamplingParams it asks
the engine for. The engine is scripted (tests/support/scripted.py): the one layer faked here."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel

from broker_client import (
    BadRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    GenerateRequest,
    LLMDefinition,
)
from tests.support.scripted import ScriptedEngine, WordTokenizer, deltas_of
from workers import LLMReplica
from workers.engines import EchoEngine
from workers.engines.api import Constraint, Delta, InvalidRequestError, SamplingParams, TokenLogprob

VOCAB = [
    "<s>",
    "one",
    " two",
    " three",
    "<tool_call>",
    '{"name": "add", "arguments": {"a": 1}}',
    "</tool_call>",
]
TOKENIZER = WordTokenizer(VOCAB)
SPEC = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"], "model_uri": "/m"}
DEFINITION = LLMDefinition.model_validate(
    {
        "model_name": "scripted",
        "model_ability": ["generate", "chat"],
        "context_length": 64,
        "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}",
        "model_specs": [SPEC],
    }
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "adds numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        },
    }
]


def _logprob(token: int) -> TokenLogprob:
    # Made-up but well-formed: the sampled token and two alternatives, most likely first.
    return TokenLogprob(token, -0.5, [(token, -0.5), ((token + 1) % len(VOCAB), -1.5)])


def _replica(script: Any) -> tuple[LLMReplica, ScriptedEngine]:
    engine = ScriptedEngine(script, tokenizer=TOKENIZER)
    replica = LLMReplica(
        engine=engine,
        tokenizer=TOKENIZER,
        context_length=64,
        model_uid="scripted-1",
        replica_index=0,
        model_name="scripted",
        definition=DEFINITION,
        device="cpu",
    )
    return replica, engine


def _as_sent(model: type[BaseModel], body: Any) -> None:
    parsed = model.model_validate(body)
    assert json.dumps(parsed.model_dump(exclude_unset=True)) == json.dumps(body)


def _choices(words: Sequence[Sequence[str]], *, logprobs: bool = False):  # type: ignore[no-untyped-def]
    def script(prompt: Sequence[Any], params: SamplingParams) -> list[Delta]:
        out: list[Delta] = []
        per = [
            deltas_of(
                TOKENIZER,
                words[i % len(words)],
                prompt_tokens=len(prompt),
                index=i,
                logprob=_logprob if params.logprobs is not None else None,
            )
            for i in range(params.n)
        ]
        # Interleaved, as a batched engine hands them over.
        for step in range(max(len(p) for p in per)):
            out.extend(p[step] for p in per if step < len(p))
        if params.prompt_logprobs is not None and out:
            out[0].prompt_logprobs = [None, *(_logprob(t) for t in list(prompt)[1:])]
        return out

    return script


async def _generate(replica: LLMReplica, prompt: str, config: dict[str, Any]) -> Any:
    request = GenerateRequest.model_validate({"prompt": prompt, "generate_config": config})
    with replica.track("g") as flight:
        if config.get("stream"):
            return [chunk async for chunk in await replica.generate_stream(request, flight)]
        return await replica.generate(request, flight)


async def _chat(
    replica: LLMReplica, config: dict[str, Any], messages: list[dict[str, Any]] | None = None
) -> Any:
    request = ChatRequest.model_validate(
        {"messages": messages or [{"role": "user", "content": "one"}], "generate_config": config}
    )
    with replica.track("c") as flight:
        if config.get("stream"):
            return [chunk async for chunk in await replica.chat_stream(request, flight)]
        return await replica.chat(request, flight)


async def test_n_choices_each_with_its_index_and_usage_counting_all() -> None:
    replica, engine = _replica(_choices([["one", " two"], ["one", " two", " three"]]))
    reply = await _generate(replica, "one two", {"n": 2, "seed": 7})
    _as_sent(Completion, reply)
    assert [(c["index"], c["text"]) for c in reply["choices"]] == [(0, "one two"), (1, "one two three")]
    assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert engine.calls[-1][1].n == 2 and engine.calls[-1][1].seed == 7

    chunks = await _generate(replica, "one two", {"n": 2, "stream": True})
    for chunk in chunks:
        _as_sent(CompletionChunk, chunk)
    texts = [
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)
    ]
    assert texts == ["one two", "one two three"]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
    assert "usage" in chunks[-1] and all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    await replica.close("done")


async def test_completion_logprobs_and_the_echo() -> None:
    replica, engine = _replica(_choices([["one", " two"]]))
    reply = await _generate(replica, "one two", {"logprobs": 2})
    _as_sent(Completion, reply)
    logprobs = reply["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["one", " two"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["text_offset"] == [0, 3]
    assert logprobs["top_logprobs"][0] == {"one": -0.5, " two": -1.5}
    assert engine.calls[-1][1].logprobs == 2 and engine.calls[-1][1].prompt_logprobs is None

    echoed = await _generate(replica, "one two", {"logprobs": 1, "echo": True, "max_tokens": 2})
    _as_sent(Completion, echoed)
    choice = echoed["choices"][0]
    assert choice["text"] == "one two" + "one two"
    assert engine.calls[-1][1].prompt_logprobs == 1
    lp = choice["logprobs"]
    # The prompt's tokens first (its first token has no logprob), then the completion's.
    assert lp["tokens"] == ["one", " two", "one", " two"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [0, 3, 7, 10]

    chunks = await _generate(replica, "one two", {"logprobs": 0, "echo": True, "stream": True})
    for chunk in chunks:
        _as_sent(CompletionChunk, chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "one two" + "one two"
    offsets = [
        o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == [0, 3, 7, 10]
    await replica.close("done")


async def test_chat_logprobs_whole_and_streamed() -> None:
    replica, engine = _replica(_choices([["one", " two"]]))
    reply = await _chat(replica, {"logprobs": True, "top_logprobs": 1})
    _as_sent(ChatCompletion, reply)
    content = reply["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["one", " two"]
    assert content[1]["bytes"] == list(b" two") and math.isclose(content[1]["logprob"], -0.5)
    assert content[0]["top_logprobs"][1] == {"token": " two", "logprob": -1.5, "bytes": list(b" two")}
    assert engine.calls[-1][1].logprobs == 1

    plain = await _chat(replica, {"max_tokens": 4})
    assert "logprobs" not in plain["choices"][0]  # not asked: the reply is as before

    chunks = await _chat(replica, {"logprobs": True, "stream": True})
    for chunk in chunks:
        _as_sent(ChatCompletionChunk, chunk)
    streamed = [
        e["token"] for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    assert streamed == ["one", " two"]
    await replica.close("done")


async def test_include_usage_ends_a_stream_with_the_usage_chunk() -> None:
    replica, _ = _replica(_choices([["one", " two"]]))
    config = {"stream": True, "stream_options": {"include_usage": True}}
    for chunks, model in (
        (await _generate(replica, "one", config), CompletionChunk),
        (await _chat(replica, config), ChatCompletionChunk),
    ):
        for chunk in chunks:
            _as_sent(model, chunk)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
        assert all("usage" not in chunk for chunk in chunks[:-1])
    await replica.close("done")


async def test_the_sampling_keys_reach_the_engine() -> None:
    replica, engine = _replica(_choices([["one"]]))
    await _generate(
        replica,
        "one",
        {
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.3,
            "min_p": 0.05,
            "logit_bias": {"2": 5, "3": -100},
            "regex": "[a-z]+",
        },
    )
    params = engine.calls[-1][1]
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_p) == (
        0.5,
        -0.5,
        1.3,
        0.05,
    )
    assert params.logit_bias == ((2, 5.0), (3, -100.0)) and params.constraint == Constraint("regex", "[a-z]+")
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    for config, expected in (
        ({"choice": ["yes", "no"]}, Constraint("choice", ("yes", "no"))),
        ({"response_format": {"type": "json_object"}}, Constraint("json_object")),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            Constraint("json_schema", schema),
        ),
    ):
        await _chat(replica, config)
        assert engine.calls[-1][1].constraint == expected
    with pytest.raises(BadRequest, match=r"logit_bias: token id 99 is not in the vocabulary .* \(7 tokens\)"):
        await _generate(replica, "one", {"logit_bias": {"99": 1}})
    await replica.close("done")


async def test_an_uncompilable_constraint_is_a_400_saying_why() -> None:
    def refuse(prompt: Sequence[Any], params: SamplingParams) -> list[Delta]:
        raise InvalidRequestError("the schema's 'type' 'integr' is not a JSON type")

    replica, _ = _replica(refuse)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}
    with pytest.raises(BadRequest, match="'integr' is not a JSON type"):
        await _chat(replica, {"response_format": bad})
    await replica.close("done")


async def test_tool_calls_parsed_from_the_reply_whole_and_streamed() -> None:
    words = ["<tool_call>", '{"name": "add", "arguments": {"a": 1}}', "</tool_call>"]
    replica, engine = _replica(_choices([words]))
    reply = await _chat(replica, {"tools": TOOLS})
    _as_sent(ChatCompletion, reply)
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert choice["message"]["content"] is None
    # The template knows no tools: they are listed in a system message, in the Hermes format.
    prompt = TOKENIZER.texts[-1]
    assert engine.calls[-1][1].constraint is None
    assert "<tools>" in prompt and '"name": "add"' in prompt and "<tool_call>" in prompt

    chunks = await _chat(replica, {"tools": TOOLS, "stream": True})
    for chunk in chunks:
        _as_sent(ChatCompletionChunk, chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas)  # the call text is not sent as content
    [calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # tool_choice none: the tools are left out and the text is content.
    none = await _chat(replica, {"tools": TOOLS, "tool_choice": "none"})
    assert (
        none["choices"][0]["finish_reason"] == "stop"
        and "<tool_call>" in none["choices"][0]["message"]["content"]
    )
    await replica.close("done")


async def test_a_forced_call_is_decoded_under_the_tools_schema() -> None:
    words = ['{"name": "add", "arguments": {"a": 1}}']
    replica, engine = _replica(_choices([words]))
    named = {"type": "function", "function": {"name": "add"}}
    reply = await _chat(replica, {"tools": TOOLS, "tool_choice": named})
    constraint = engine.calls[-1][1].constraint
    assert constraint is not None and constraint.kind == "json_schema"
    schema = constraint.value
    assert schema["properties"]["name"] == {"const": "add"}
    # The declared arguments only (as OpenAI's strict mode): the parameters say nothing else.
    assert schema["properties"]["arguments"] == {
        **TOOLS[0]["function"]["parameters"],
        "additionalProperties": False,
    }
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"a": 1}
    assert reply["choices"][0]["finish_reason"] == "tool_calls"

    chunks = await _chat(replica, {"tools": TOOLS, "tool_choice": "required", "stream": True})
    [calls] = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0]["function"]["name"] == "add"
    await replica.close("done")


async def test_history_with_tool_calls_and_tool_results_reaches_the_prompt() -> None:
    replica = LLMReplica(
        engine=EchoEngine(context_length=512),
        tokenizer=None,
        context_length=512,
        model_uid="echo-1",
        replica_index=0,
        model_name="echo",
        definition=DEFINITION.model_copy(update={"context_length": 512}),
        device="cpu",
    )
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "add one"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
        {"role": "user", "content": "thanks"},
    ]
    # The echo engine answers with the prompt: the template's view of the history.
    reply = await _chat(replica, {"tools": TOOLS, "max_tokens": 400}, messages)
    text = reply["choices"][0]["message"]["content"]
    assert '"name": "add"' in text and "<tool_response>" in text and "<tools>" in text
    await replica.close("done")
