"""The generate_config keys beyond plain sampling, checked without a server: every one takes its
right values, and a wrong type or range is a 400 naming the key and the value (in the client's
check, and in the request models the workers decode with); the keys only one kind of request
takes are refused on the other; chat history with tool calls and tool results is taken."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker_client import (
    BadRequest,
    ChatRequest,
    GenerateRequest,
    check_generate_config,
    format_validation_error,
)

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "now", "parameters": {"type": "object"}},
    }
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
}

GOOD: list[tuple[dict[str, Any], str | None]] = [
    ({"n": 16}, None),
    ({"best_of": 1}, None),
    ({"logprobs": 0}, "completion"),
    ({"logprobs": 20}, "completion"),
    ({"logprobs": True, "top_logprobs": 20}, "chat"),
    ({"logprobs": False}, "chat"),
    ({"echo": True}, "completion"),
    ({"presence_penalty": -2, "frequency_penalty": 2.0}, None),
    ({"repetition_penalty": 1.1, "min_p": 0}, None),
    ({"logit_bias": {"50256": -100, "7": 100}}, None),
    ({"logit_bias": {7: 1.5}}, None),  # a Python caller's int key
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, None),
    ({"response_format": SCHEMA}, None),
    ({"regex": r"\d{3}-\d{4}"}, None),
    ({"choice": ["positive", "negative"]}, None),
    ({"stream": True, "stream_options": {"include_usage": True}}, None),
    ({"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}, "chat"),
    ({"tools": TOOLS, "tool_choice": "required"}, "chat"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "chat"),
    ({"tool_choice": "none"}, "chat"),
]


@pytest.mark.parametrize(("config", "kind"), GOOD)
def test_the_new_keys_take_their_values(config: dict[str, Any], kind: Any) -> None:
    checked = check_generate_config(config, kind)
    assert checked is not None
    if "logit_bias" in config:
        assert all(type(key) is str for key in checked["logit_bias"])
    if config.get("response_format") == SCHEMA:
        assert checked["response_format"] == SCHEMA  # "schema" on the wire, not the attribute name


BAD: list[tuple[dict[str, Any], str | None, str, str]] = [
    # (config, kind, key named, value shown)
    ({"n": 0}, None, "n", "0"),
    ({"n": 17}, None, "n", "17"),
    ({"n": "2"}, None, "n", "'2'"),
    ({"best_of": 2}, None, "best_of", "2"),
    ({"logprobs": 21}, "completion", "logprobs", "21"),
    ({"logprobs": -1}, "completion", "logprobs", "-1"),
    ({"logprobs": "5"}, "completion", "logprobs", "'5'"),
    ({"logprobs": True}, "completion", "logprobs", "True"),
    ({"logprobs": 5}, "chat", "logprobs", "5"),
    ({"logprobs": True, "top_logprobs": 21}, "chat", "top_logprobs", "21"),
    ({"top_logprobs": 3}, "chat", "top_logprobs", "3"),
    ({"top_logprobs": 3}, "completion", "top_logprobs", "completion"),
    ({"echo": "yes"}, None, "echo", "'yes'"),
    ({"echo": True}, "chat", "echo", "chat"),
    ({"presence_penalty": 2.5}, None, "presence_penalty", "2.5"),
    ({"frequency_penalty": -3}, None, "frequency_penalty", "-3"),
    ({"frequency_penalty": "0"}, None, "frequency_penalty", "'0'"),
    ({"repetition_penalty": 0}, None, "repetition_penalty", "0"),
    ({"repetition_penalty": float("nan")}, None, "repetition_penalty", "nan"),
    ({"min_p": 1.5}, None, "min_p", "1.5"),
    ({"min_p": -0.1}, None, "min_p", "-0.1"),
    ({"logit_bias": {"abc": 1}}, None, "logit_bias", "'abc'"),
    ({"logit_bias": {"5": 101}}, None, "logit_bias", "101"),
    ({"logit_bias": {"5": "1"}}, None, "logit_bias", "'1'"),
    ({"logit_bias": [1, 2]}, None, "logit_bias", "dictionary"),
    ({"response_format": {"type": "yaml"}}, None, "response_format", "'yaml'"),
    ({"response_format": {"type": "json_schema"}}, None, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, None, "name", "'a b'"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
        None,
        "schema",
        "5",
    ),
    ({"regex": ""}, None, "regex", "regex"),
    ({"regex": 5}, None, "regex", "5"),
    ({"choice": []}, None, "choice", "choice"),
    ({"choice": ["a", 1]}, None, "choice", "1"),
    ({"choice": ["a"], "regex": "a"}, None, "regex", "choice"),
    ({"response_format": {"type": "json_object"}, "choice": ["a"]}, None, "response_format", "choice"),
    ({"stream_options": {"include_usage": True}}, None, "stream_options", "stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, None, "include_usage", "'yes'"),
    ({"stream": True, "stream_options": {"usage": True}}, None, "stream_options.usage", "unknown"),
    ({"tools": [{"type": "function"}]}, "chat", "tools[0].function", "required"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "chat", "tools[0].type", "'retrieval'"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "chat", "name", "'f g'"),
    ({"tools": TOOLS + TOOLS}, "chat", "tools", "'get_weather'"),
    ({"tools": TOOLS}, "completion", "tools", "completion"),
    ({"tool_choice": "required"}, "chat", "tool_choice", "'required'"),
    ({"tools": TOOLS, "tool_choice": "maybe"}, "chat", "tool_choice", "'maybe'"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        "chat",
        "tool_choice",
        "'x'",
    ),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, "chat", "regex", "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": 1}, "chat", "parallel_tool_calls", "1"),
]


@pytest.mark.parametrize(("config", "kind", "key", "value"), BAD)
def test_a_wrong_value_is_a_400_naming_key_and_value(
    config: dict[str, Any], kind: Any, key: str, value: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        check_generate_config(config, kind)
    message = caught.value.message
    assert f"generate_config.{key.split('.')[0]}" in message or f".{key}" in message, message
    assert value in message, message

    # The worker decodes the same request and says the same.
    body: dict[str, Any] = {"generate_config": config}
    if kind == "chat":
        model: Any = ChatRequest
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        model = GenerateRequest
        body["prompt"] = "hi"
    if kind is None:
        return
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert value in format_validation_error(refused.value)


def test_chat_history_with_tool_calls_and_tool_results() -> None:
    request = ChatRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ]
        }
    )
    assert request.messages[1].tool_calls is not None and request.messages[2].tool_call_id == "call_1"
    for message, needle in (
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": []}, "tool_calls"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
            "arguments",
        ),
    ):
        with pytest.raises(ValidationError) as refused:
            ChatRequest.model_validate({"messages": [message]})
        assert needle in format_validation_error(refused.value)
