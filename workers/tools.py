"""Tool calls: the formats models write them in, parsed into OpenAI's ``message.tool_calls``.

Three formats cover the open chat models that call tools:

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call
  (Hermes 2/3, Qwen 2/2.5/3 and the many models trained on their data);
* ``llama3``: the reply is one JSON object ``{"name": ..., "parameters": {...}}`` (or several
  joined by ``;``), optionally after ``<|python_tag|>`` (Llama 3.1-3.3);
* ``mistral``: ``[TOOL_CALLS]`` and a JSON list of ``{"name", "arguments"}`` (Mistral 7B v0.3,
  Mistral Nemo/Small).

Which one a model writes comes from the definition's ``tool_parser`` or, without it, from its chat
template and family (:func:`choose_parser`). A model whose template does not render ``tools``
(many small models) is told about them in a system message written in its parser's format
(:func:`tools_system_prompt`), so that what it writes back parses.

A forced call (``tool_choice`` ``required`` or a named function) is decoded under a JSON-schema
constraint (:func:`forced_call_schema`): the output is exactly the call object, its name one of
the tools' and its arguments valid for the function's parameter schema, so it always parses.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "PARSERS",
    "ParsedCalls",
    "ToolParser",
    "ToolStreamSplitter",
    "choose_parser",
    "forced_call_schema",
    "history_call_text",
    "parse_forced_call",
    "parse_tool_calls",
    "tool_call_body",
    "tools_system_prompt",
]

ToolParser = Literal["hermes", "llama3", "mistral"]
PARSERS: tuple[ToolParser, ...] = ("hermes", "llama3", "mistral")

# The key a format writes the arguments under.
_ARGUMENTS_KEY: dict[str, str] = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_MISTRAL_START = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedCalls:
    """What a reply holds: its text outside the calls (None when nothing is left) and the calls,
    each ``(name, arguments as a JSON string)``."""

    content: str | None
    calls: list[tuple[str, str]]


def choose_parser(
    configured: str | None, *, chat_template: str | None = None, model_family: str | None = None
) -> ToolParser:
    """The definition's ``tool_parser``, else the format the chat template writes, else the one
    the family name suggests, else ``hermes`` (the format most open models were trained on)."""
    if configured in PARSERS:
        return configured  # type: ignore[return-value]
    template = chat_template or ""
    if _MISTRAL_START in template:
        return "mistral"
    if _HERMES_START in template:
        return "hermes"
    if _PYTHON_TAG in template or "ipython" in template:
        return "llama3"
    family = (model_family or "").lower()
    if "mistral" in family or "mixtral" in family:
        return "mistral"
    if "llama-3" in family or "llama3" in family:
        return "llama3"
    return "hermes"


def _arguments(value: Any) -> str | None:
    """The arguments of a parsed call as OpenAI's JSON string; None when they are not an object."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call(obj: Any, key: str) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = _arguments(obj.get(key, obj.get("arguments", obj.get("parameters"))))
    if arguments is None:
        return None
    return obj["name"], arguments


def _json_objects(text: str) -> list[Any] | None:
    """The JSON values ``text`` holds one after another (``;`` or blanks between); None if any
    part of it is not JSON."""
    decoder = json.JSONDecoder()
    values = []
    i, n = 0, len(text)
    while i < n:
        while i < n and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i >= n:
            break
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)
    return values


def _known(calls: list[tuple[str, str]], names: Iterable[str] | None) -> bool:
    if names is None:
        return True
    allowed = set(names)
    return all(name in allowed for name, _ in calls)


def parse_tool_calls(text: str, parser: ToolParser, names: Iterable[str] | None = None) -> ParsedCalls:
    """The tool calls in a model's reply, in ``parser``'s format. Text that does not hold a
    well-formed call of a known function (``names``) is content, as it came."""
    plain = ParsedCalls(text, [])
    if parser == "hermes":
        if _HERMES_START not in text:
            return plain
        calls = []
        for block in _HERMES_BLOCK.finditer(text):
            try:
                call = _call(json.loads(block.group(1)), "arguments")
            except ValueError:
                return plain
            if call is None:
                return plain
            calls.append(call)
        if not calls or not _known(calls, names):
            return plain
        rest = _HERMES_BLOCK.sub("", text).strip()
        return ParsedCalls(rest or None, calls)
    if parser == "mistral":
        start = text.find(_MISTRAL_START)
        if start < 0:
            return plain
        values = _json_objects(text[start + len(_MISTRAL_START) :])
        if not values:
            return plain
        items = [item for value in values for item in (value if isinstance(value, list) else [value])]
        parsed = [_call(item, "arguments") for item in items]
        if any(call is None for call in parsed) or not _known(parsed, names):  # type: ignore[arg-type]
            return plain
        rest = text[:start].strip()
        return ParsedCalls(rest or None, parsed)  # type: ignore[arg-type]
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :]
    if not body.lstrip().startswith("{"):
        return plain
    values = _json_objects(body)
    if not values:
        return plain
    parsed = [_call(value, "parameters") for value in values]
    if any(call is None for call in parsed) or not _known(parsed, names):  # type: ignore[arg-type]
        return plain
    return ParsedCalls(None, parsed)  # type: ignore[arg-type]


def _start_marker(parser: ToolParser) -> str:
    return {"hermes": _HERMES_START, "mistral": _MISTRAL_START, "llama3": "{"}[parser]


class ToolStreamSplitter:
    """A streamed reply, split into content that can go out at once and the tool-call text held
    back until the end.

    Text that is, or may be the beginning of, the parser's start marker is held; once the marker
    has come, everything after it is held and :meth:`finish` parses it. A Llama 3 reply is a
    call only as a whole, so one that starts with ``{`` (or the python tag) is held entirely.
    """

    def __init__(self, parser: ToolParser, names: Iterable[str] | None = None) -> None:
        self.parser = parser
        self.names = list(names) if names is not None else None
        self._marker = _start_marker(parser)
        self._held = ""  # text not yet sent
        self._sent: list[str] = []
        self._calling = False  # the marker came: the rest is held for finish()

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held) that can be sent as content now."""
        if self._calling:
            self._held += text
            return ""
        held = self._held + text
        if self.parser == "llama3":
            if not self._sent:
                lead = held.lstrip()
                if lead.startswith(("{", _PYTHON_TAG)):
                    self._calling = True
                if self._calling or not lead or _PYTHON_TAG.startswith(lead):
                    self._held = held
                    return ""
            self._held = ""
            self._sent.append(held)
            return held
        at = held.find(self._marker)
        if at >= 0:
            self._calling = True
            self._held = held[at:]
            out = held[:at]
        else:
            # Hold the longest tail that may begin the marker.
            keep = 0
            for size in range(min(len(self._marker) - 1, len(held)), 0, -1):
                if self._marker.startswith(held[-size:]):
                    keep = size
                    break
            out = held[: len(held) - keep]
            self._held = held[len(held) - keep :]
        if out:
            self._sent.append(out)
        return out

    def finish(self) -> ParsedCalls:
        """The held text: its calls and the content still to send (None for none)."""
        held, self._held = self._held, ""
        if not held:
            return ParsedCalls(None, [])
        if not self._calling:
            return ParsedCalls(held, [])
        parsed = parse_tool_calls(held, self.parser, self.names)
        if not parsed.calls:
            return ParsedCalls(held, [])
        return parsed


def _closed(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter schema with no arguments beyond its properties, unless it says otherwise
    (OpenAI's strict mode does the same): a function takes the arguments it declares, and left
    open, SmolLM2 under a forced call wandered into made-up keys until max_tokens cut it."""
    out = dict(parameters)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_object(tool: Mapping[str, Any], key: str) -> dict[str, Any]:
    function = tool["function"]
    parameters = _closed(function.get("parameters") or {"type": "object"})
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, key: parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }


def forced_call_schema(
    tools: Sequence[Mapping[str, Any]], parser: ToolParser, name: str | None = None
) -> dict[str, Any]:
    """The JSON schema a forced call is decoded under: the call object of the parser's format
    (``{"name", "arguments"}``, or ``"parameters"`` for Llama 3) for the function ``name``, or
    for any of ``tools``. One call: the reply is that object, nothing around it."""
    key = _ARGUMENTS_KEY[parser]
    chosen = [tool for tool in tools if name is None or tool["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names function {name!r}, which is not one of the tools")
    if len(chosen) == 1:
        return _call_object(chosen[0], key)
    return {"anyOf": [_call_object(tool, key) for tool in chosen]}


def parse_forced_call(text: str, parser: ToolParser) -> ParsedCalls:
    """The call of a reply decoded under :func:`forced_call_schema` (the whole text is the object).
    A reply cut short (``max_tokens``) does not parse: it is returned as content."""
    try:
        call = _call(json.loads(text), _ARGUMENTS_KEY[parser])
    except ValueError:
        call = None
    if call is None:
        return ParsedCalls(text, [])
    return ParsedCalls(None, [call])


def tool_call_body(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    """One of ``message.tool_calls`` (with ``index`` for a stream's delta), with a fresh id."""
    body: dict[str, Any] = {}
    if index is not None:
        body["index"] = index
    body.update(
        id=f"call_{secrets.token_hex(12)}",
        type="function",
        function={"name": name, "arguments": arguments},
    )
    return body


_INSTRUCTIONS: dict[str, str] = {
    "hermes": (
        "For each function call, return a JSON object with the function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call>'
    ),
    "llama3": (
        "To call a function, respond only with a JSON object of the form "
        '{"name": <function-name>, "parameters": <args-json-object>}.'
    ),
    "mistral": (
        "To call functions, respond with [TOOL_CALLS] followed by a JSON list of objects of the "
        'form {"name": <function-name>, "arguments": <args-json-object>}.'
    ),
}


def tools_system_prompt(tools: Sequence[Mapping[str, Any]], parser: ToolParser) -> str:
    """The system text that tells a model whose template ignores ``tools`` what it may call and
    how (Qwen 2.5's own wording, for the Hermes format)."""
    listed = "\n".join(json.dumps(dict(tool), ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n{_INSTRUCTIONS[parser]}"
    )


def history_call_text(calls: Sequence[Mapping[str, Any]], parser: ToolParser) -> str:
    """An assistant's earlier calls written back in the parser's format, for a template that
    does not render ``tool_calls`` itself."""
    key = _ARGUMENTS_KEY[parser]
    objects = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        objects.append({"name": function.get("name"), key: arguments})
    if parser == "hermes":
        return "\n".join(
            f"{_HERMES_START}\n{json.dumps(o, ensure_ascii=False)}\n{_HERMES_END}" for o in objects
        )
    if parser == "mistral":
        return _MISTRAL_START + json.dumps(objects, ensure_ascii=False)
    return "; ".join(json.dumps(o, ensure_ascii=False) for o in objects)
