"""Chat messages to one prompt string, as Xinference builds it.

The prompt comes from, in this order:

a. the definition's ``chat_template`` (a Jinja string, rendered by the tokenizer's
   ``apply_chat_template`` so that ``bos_token`` and friends are the model's);
b. the definition's Xinference ``prompt_style`` (``style_name``, ``system_prompt``, ``roles``,
   ``intra_message_sep``, ``inter_message_sep``, ``stop``, ``stop_token_ids``);
c. the tokenizer's own chat template.

Prompt styles reproduce Xinference's ``ChatModelMixin.get_prompt`` byte for byte, quirks
included, so that a custom-model JSON written for Xinference prompts the model the same way here:

* the OpenAI-style messages are split as Xinference's REST API splits them: the contents of all
  ``system`` messages joined with ``". "`` *replace* the style's ``system_prompt`` (raw: for
  LLAMA2 and CHATML the style's prompt carries the wrapping markup and a system message does not);
  the last message is the new prompt, the rest the history;
* ``user``/``assistant`` map to ``roles[0]``/``roles[1]``; a history turn with empty content is
  rendered as its role alone, as Xinference does;
* the style's ``stop`` and ``stop_token_ids`` are added to the request's.

Tools (a chat's ``tools``) go to the template's ``tools`` argument, as transformers passes them.
A template that renders the same prompt with and without them (and every prompt style) does not
know tools: the prompt then gets a system message that lists them in the model's tool-call format
(``workers.tools``), the history's calls written in that format and its ``tool`` messages as user
turns wrapped in ``<tool_response>``, as Qwen 2.5's template writes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker_client import BadRequest, PromptStyle

from .tools import ToolParser, history_call_text, tools_system_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_ROLES",
    "PROMPT_STYLES",
    "ChatPrompt",
    "build_chat_prompt",
    "normalize_messages",
    "render_prompt_style",
]

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    # Where the prompt came from: "chat_template", "prompt_style" or "tokenizer".
    source: str
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # Templates write their own BOS; Xinference's prompt styles rely on the tokenizer adding it.
    add_special_tokens: bool = False


Turn = tuple[str, str]  # (rendered role, content)


def normalize_messages(
    messages: Sequence[Any], *, model: str, allowed: Sequence[str] = CHAT_ROLES
) -> list[dict[str, Any]]:
    """Messages as plain dicts with string content; a 400 naming any role not in ``allowed``."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        data = message.model_dump() if hasattr(message, "model_dump") else dict(message)
        role = data.get("role")
        if role not in allowed:
            raise BadRequest(
                f"messages[{i}].role {role!r} is not supported by model {model!r}; "
                f"use one of: {', '.join(allowed)}"
            )
        content = data.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string, got {type(content).__name__}")
        data["content"] = content
        calls = data.get("tool_calls")
        if calls is None:
            data.pop("tool_calls", None)
        else:
            # Templates take the arguments as an object (transformers' convention); OpenAI
            # sends them as a JSON string.
            data["tool_calls"] = [_template_call(call) for call in calls]
        if data.get("tool_call_id") is None:
            data.pop("tool_call_id", None)
        out.append(data)
    if not out:
        raise BadRequest("messages must hold at least one message")
    return out


def _field(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, Mapping) else getattr(message, key, None)


def _template_call(call: Any) -> dict[str, Any]:
    call = dict(call)
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    call["function"] = function
    return call


def _with_tool_text(
    items: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], parser: ToolParser
) -> list[dict[str, Any]]:
    """``items`` for a template that knows no tools: the tools in a system message, the history's
    calls and results as text."""
    out: list[dict[str, Any]] = []
    for original in items:
        item = {k: v for k, v in original.items() if k not in ("tool_calls", "tool_call_id")}
        calls = original.get("tool_calls")
        if calls:
            written = history_call_text(calls, parser)
            item["content"] = f"{item['content']}\n{written}" if item["content"] else written
        if original["role"] == "tool":
            item = {"role": "user", "content": f"<tool_response>\n{original['content']}\n</tool_response>"}
        out.append(item)
    if not tools:
        return out
    listing = tools_system_prompt(tools, parser)
    if out and out[0]["role"] == "system":
        first = out[0]["content"]
        out[0] = {**out[0], "content": f"{first}\n\n{listing}" if first else listing}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out


# ---------------------------------------------------------------------------- prompt styles


def _add_colon_single(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    ret = system + style.intra_message_sep
    for role, content in turns:
        ret += f"{role}: {content}{style.intra_message_sep}" if content else f"{role}:"
    return ret


def _add_colon_two(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    seps = (style.intra_message_sep, style.inter_message_sep)
    ret = system + seps[0]
    for i, (role, content) in enumerate(turns):
        ret += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
    return ret


def _no_colon_two(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    seps = (style.intra_message_sep, style.inter_message_sep)
    ret = system
    for i, (role, content) in enumerate(turns):
        ret += f"{role}{content}{seps[i % 2]}" if content else role
    return ret


def _add_colon_single_cot(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    ret = system + style.intra_message_sep
    for role, content in turns:
        if content:
            ret += f"{role}: {content}{style.intra_message_sep}"
        else:
            ret += f"{role}: Let's think step by step."
    return ret


def _llama2(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    # The first turn has no role marker: the system prompt is expected to end with "[INST] ...".
    seps = (style.intra_message_sep, style.inter_message_sep)
    ret = ""
    for i, (role, content) in enumerate(turns):
        if content:
            ret += system + content if i == 0 else f"{role} {content}{seps[i % 2]}"
        else:
            ret += role
    return ret


def _llama3(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    intra, inter = style.intra_message_sep, style.inter_message_sep
    ret = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>{intra}{system}{inter}"
    for role, content in turns:
        if content:
            ret += f"<|start_header_id|>{role}<|end_header_id|>{intra}{content}{inter}"
        else:
            ret += f"<|start_header_id|>{role}<|end_header_id|>{intra}"
    return ret


def _chatml(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    ret = "" if system == "" else system + style.intra_message_sep + "\n"
    for role, content in turns:
        ret += f"{role}\n{content}{style.intra_message_sep}\n" if content else f"{role}\n"
    return ret


def _qwen(style: PromptStyle, system: str, turns: list[Turn]) -> str:
    # ChatML with the markup written by the style itself (Xinference's QWEN, without tools).
    ret = f"<|im_start|>system\n{system}<|im_end|>"
    for role, content in turns:
        ret += style.intra_message_sep
        if content:
            ret += f"<|im_start|>{role}\n{content.lstrip(chr(10)).rstrip()}<|im_end|>"
        else:
            ret += f"<|im_start|>{role}\n"
    return ret


_Renderer = Callable[[PromptStyle, str, list[Turn]], str]

_STYLES: dict[str, _Renderer] = {
    "ADD_COLON_SINGLE": _add_colon_single,
    "ADD_COLON_TWO": _add_colon_two,
    "NO_COLON_TWO": _no_colon_two,
    "ADD_COLON_SINGLE_COT": _add_colon_single_cot,
    "LLAMA2": _llama2,
    "LLAMA3": _llama3,
    "CHATML": _chatml,
    "QWEN": _qwen,
}

PROMPT_STYLES: tuple[str, ...] = tuple(_STYLES)


def render_prompt_style(style: PromptStyle, messages: Sequence[Any], *, model: str = "") -> str:
    """The prompt Xinference's ``get_prompt`` builds for these OpenAI-style messages."""
    renderer = _STYLES.get(style.style_name)
    if renderer is None:
        raise BadRequest(
            f"prompt_style.style_name {style.style_name!r} of model {model!r} is not supported; "
            f"natserve implements {', '.join(PROMPT_STYLES)} (or give a chat_template)"
        )
    user_role, assistant_role = style.roles[0], style.roles[1]
    # A request may already speak the style's own role names (e.g. "USER"); tool messages are
    # user turns by now (build_chat_prompt).
    allowed = dict.fromkeys([*CHAT_ROLES[:3], user_role, assistant_role])
    items = normalize_messages(messages, model=model, allowed=tuple(allowed))

    system_parts = [m["content"] for m in items if m["role"] == "system"]
    others = [m for m in items if m["role"] != "system"]
    if not others or others[-1]["role"] not in ("user", user_role):
        last = others[-1]["role"] if others else "system"
        raise BadRequest(
            f"the last message to model {model!r} must come from the user (role 'user'), got role {last!r}"
        )

    def role_of(role: str) -> str:
        if role == "user":
            return user_role
        if role == "assistant":
            return assistant_role
        return role

    turns: list[Turn] = [(role_of(m["role"]), m["content"]) for m in others[:-1]]
    turns.append((user_role, others[-1]["content"]))
    turns.append((assistant_role, ""))
    # An empty join (no system message, or only empty ones) keeps the style's own prompt.
    system = ". ".join(system_parts) or style.system_prompt
    return renderer(style, system, turns)


# ---------------------------------------------------------------------------- templates


def _render_jinja(
    template: str, messages: list[dict[str, Any]], *, model: str, tools: Sequence[Any] | None = None
) -> str:
    """A chat template without a tokenizer (the echo engine): the sandbox transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    extra = {"tools": list(tools)} if tools else {}
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token="", **extra
        )
    except TemplateError as exc:
        raise BadRequest(f"the chat template of model {model!r} rejected the messages: {exc}") from exc


def _apply_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str | None,
    *,
    model: str,
    tools: Sequence[Any] | None = None,
) -> str:
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=True,
        )
    except TemplateError as exc:
        # Templates call raise_exception() for conversations they do not accept.
        raise BadRequest(f"the chat template of model {model!r} rejected the messages: {exc}") from exc
    except ValueError as exc:
        raise BadRequest(f"the chat template of model {model!r} failed: {exc}") from exc
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _render_with_tools(
    render: Callable[[list[dict[str, Any]], Sequence[Any] | None], str],
    items: list[dict[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    parser: ToolParser,
) -> str:
    """The template's prompt with ``tools``; written out as text when the template ignores them
    (it renders the same prompt without them)."""
    if not tools:
        return render(items, None)
    text = render(items, tools)
    if text != render(items, None):
        return text
    return render(_with_tool_text(items, tools, parser), None)


def _union(first: Sequence[Any] | None, *more: Sequence[Any] | None) -> tuple[Any, ...]:
    out = dict.fromkeys(first or ())
    for items in more:
        out.update(dict.fromkeys(items or ()))
    return tuple(out)


def build_chat_prompt(
    messages: Sequence[Any],
    *,
    model: str,
    chat_template: str | None = None,
    prompt_style: PromptStyle | Mapping[str, Any] | None = None,
    tokenizer: Any | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_parser: ToolParser = "hermes",
) -> ChatPrompt:
    """The prompt for ``messages`` from the first of: chat_template, prompt_style, tokenizer's
    template; ``tools`` (OpenAI's tool list) rendered by the template, or as text in
    ``tool_parser``'s format when it cannot."""
    if chat_template:
        items = normalize_messages(messages, model=model)
        if tokenizer is not None:

            def render(items: list[dict[str, Any]], tools: Sequence[Any] | None) -> str:
                return _apply_template(tokenizer, items, chat_template, model=model, tools=tools)

        else:

            def render(items: list[dict[str, Any]], tools: Sequence[Any] | None) -> str:
                return _render_jinja(chat_template, items, model=model, tools=tools)

        return ChatPrompt(text=_render_with_tools(render, items, tools, tool_parser), source="chat_template")

    if prompt_style is not None:
        style = (
            prompt_style
            if isinstance(prompt_style, PromptStyle)
            else PromptStyle.model_validate(prompt_style)
        )
        # A prompt style knows neither tools nor tool messages: both as text.
        if tools or any(_field(m, "role") == "tool" or _field(m, "tool_calls") for m in messages):
            items = normalize_messages(messages, model=model)
            messages = _with_tool_text(items, tools or (), tool_parser)
        text = render_prompt_style(style, messages, model=model)
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else None
        return ChatPrompt(
            text=text,
            source="prompt_style",
            stop=_union(style.stop),
            stop_token_ids=_union(style.stop_token_ids),
            # Xinference tokenises these prompts with the tokenizer's defaults (BOS added);
            # styles that write the BOS themselves would otherwise get two.
            add_special_tokens=not (bos and text.startswith(bos)),
        )

    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        items = normalize_messages(messages, model=model)

        def render_own(items: list[dict[str, Any]], tools: Sequence[Any] | None) -> str:
            return _apply_template(tokenizer, items, None, model=model, tools=tools)

        return ChatPrompt(text=_render_with_tools(render_own, items, tools, tool_parser), source="tokenizer")

    raise BadRequest(
        f"model {model!r} cannot chat: its definition gives neither chat_template nor "
        "prompt_style and its tokenizer has no chat template"
    )
