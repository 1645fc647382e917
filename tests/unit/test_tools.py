"""The tool-call formats (workers/tools.py) without a model: parsing Hermes/Qwen, Llama 3 and
Mistral replies, the streamed split between content and call text, the schema a forced call is
decoded under, and which format a model gets."""

from __future__ import annotations

import json

import pytest

from workers.tools import (
    ToolStreamSplitter,
    choose_parser,
    forced_call_schema,
    history_call_text,
    parse_forced_call,
    parse_tool_calls,
    tools_system_prompt,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add"}},
]
NAMES = ("get_weather", "add")


def test_hermes_blocks_with_text_around_them() -> None:
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    )
    parsed = parse_tool_calls(text, "hermes", NAMES)
    assert parsed.content == "Let me look."
    assert parsed.calls == [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1}')]
    # An unclosed last block (the model stopped at the closing tag) still parses.
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": {}}', "hermes").calls == [("add", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
    ],
)
def test_what_is_not_a_well_formed_call_of_a_known_tool_is_content(text: str) -> None:
    parsed = parse_tool_calls(text, "hermes", NAMES)
    assert parsed.calls == [] and parsed.content == text


def test_llama3_and_mistral_formats() -> None:
    llama = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 2}}', "llama3", NAMES)
    assert llama.calls == [("add", '{"a": 2}')] and llama.content is None
    two = parse_tool_calls(
        '{"name": "add", "parameters": {}}; {"name": "get_weather", "parameters": {}}', "llama3"
    )
    assert [name for name, _ in two.calls] == ["add", "get_weather"]
    assert parse_tool_calls("The answer is {x}", "llama3").calls == []
    mistral = parse_tool_calls('ok [TOOL_CALLS][{"name": "add", "arguments": {"a": 3}}]', "mistral", NAMES)
    assert mistral.calls == [("add", '{"a": 3}')] and mistral.content == "ok"
    assert parse_tool_calls("[TOOL_CALLS] nope", "mistral").calls == []


def test_the_stream_splitter_holds_back_only_what_may_be_a_call() -> None:
    splitter = ToolStreamSplitter("hermes", NAMES)
    sent = [
        splitter.feed(piece)
        for piece in ["Hel", "lo <tool", "_call>", '{"name": "add", ', '"arguments": {}}', "</tool_call>"]
    ]
    assert "".join(sent) == "Hello "
    assert sent[1] == "lo "  # "<tool" may begin the marker: held
    parsed = splitter.finish()
    assert parsed.calls == [("add", "{}")] and parsed.content is None

    plain = ToolStreamSplitter("hermes", NAMES)
    assert plain.feed("a <b") == "a <b"  # "<b" cannot begin "<tool_call>"
    assert plain.feed(" and <to") == " and "
    assert plain.finish().content == "<to"  # held text that never became a call is content

    llama = ToolStreamSplitter("llama3", NAMES)
    assert llama.feed(' {"name": "add",') == ""
    assert llama.feed(' "parameters": {}}') == ""
    assert llama.finish().calls == [("add", "{}")]
    prose = ToolStreamSplitter("llama3", NAMES)
    assert prose.feed("Sure") == "Sure" and prose.feed(" {x}") == " {x}" and prose.finish().content is None


def test_a_forced_call_schema_and_its_parse() -> None:
    schema = forced_call_schema(TOOLS, "hermes", "get_weather")
    assert schema["properties"] == {"name": {"const": "get_weather"}, "arguments": {"type": "object"}}
    assert schema["required"] == ["name", "arguments"] and schema["additionalProperties"] is False
    any_tool = forced_call_schema(TOOLS, "llama3")
    assert [s["properties"]["name"]["const"] for s in any_tool["anyOf"]] == list(NAMES)
    assert all("parameters" in s["properties"] for s in any_tool["anyOf"])
    declared = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": declared}}]
    closed = forced_call_schema(tools, "hermes")["properties"]["arguments"]
    assert closed == {**declared, "additionalProperties": False} and "additionalProperties" not in declared
    opened = [
        {
            "type": "function",
            "function": {"name": "add", "parameters": {**declared, "additionalProperties": True}},
        }
    ]
    assert forced_call_schema(opened, "hermes")["properties"]["arguments"]["additionalProperties"] is True
    with pytest.raises(ValueError, match="'nope'"):
        forced_call_schema(TOOLS, "hermes", "nope")
    assert parse_forced_call('{"name": "add", "arguments": {"a": 1}}', "hermes").calls == [
        ("add", '{"a": 1}')
    ]
    cut = parse_forced_call('{"name": "add", "argu', "hermes")
    assert cut.calls == [] and cut.content == '{"name": "add", "argu'


def test_which_format_a_model_gets() -> None:
    assert choose_parser("mistral", chat_template="<tool_call>") == "mistral"  # the definition wins
    assert choose_parser(None, chat_template="{{ '<tool_call>' }}") == "hermes"
    assert choose_parser(None, chat_template="[TOOL_CALLS]") == "mistral"
    assert choose_parser(None, chat_template="<|python_tag|>") == "llama3"
    assert choose_parser(None, model_family="Meta-Llama-3.1-8B") == "llama3"
    assert choose_parser(None) == "hermes"


def test_the_tools_prompt_and_the_history_in_each_format() -> None:
    prompt = tools_system_prompt(TOOLS, "hermes")
    assert "<tools>" in prompt and json.dumps(TOOLS[0]) in prompt and "<tool_call>" in prompt
    assert '"parameters": <args-json-object>' in tools_system_prompt(TOOLS, "llama3")
    calls = [{"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    assert (
        history_call_text(calls, "hermes")
        == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    )
    assert history_call_text(calls, "mistral") == '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]'
    assert history_call_text(calls, "llama3") == '{"name": "add", "parameters": {"a": 1}}'
