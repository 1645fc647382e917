"""OpenAI's request and reply shapes, translated to and from natserve's: pure functions, no I/O.

A request body becomes what a natserve model handle takes: the model uid, the prompt (or the
messages, or the input) and a ``generate_config``. natserve's replies already have OpenAI's
shapes (``text_completion``, ``chat.completion``, ``chat.completion.chunk``, a ``list`` of
``embedding``), so the way back only moves the usage of a stream and encodes embeddings.

Every field of a body is one of three kinds:

- taken: the fields natserve's ``generate_config`` has (:data:`SAMPLING_FIELDS`, OpenAI's name
  to natserve's; ``max_completion_tokens`` is ``max_tokens``): sampling, ``n``, ``logprobs`` /
  ``top_logprobs``, ``echo``, the penalties and ``logit_bias``, ``response_format``, the tools,
  and natserve's own ``regex`` and ``choice`` (``extra_body`` in OpenAI's client); plus the
  fields that say what to do (``model``, ``prompt``/``messages``/``input``, ``stream``,
  ``stream_options``, ``user``, ``encoding_format``). natserve checks their values and names
  the field when one is wrong;
- neutral only: OpenAI fields natserve does not act on (``suffix``, the deprecated
  ``functions`` / ``function_call``), accepted with the one value that asks for nothing and
  otherwise a 400 naming them;
- anything else: a 400 naming the field. Nothing is silently dropped.
"""

from __future__ import annotations

import base64
import re
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

from broker_client import AsyncStream, BadRequest, check_generate_config, check_name

from .errors import InvalidField

__all__ = [
    "CHAT_NEUTRAL",
    "COMPLETION_NEUTRAL",
    "SAMPLING_FIELDS",
    "chat_call",
    "completion_call",
    "embedding_call",
    "encode_embeddings",
    "model_entry",
    "name_the_field",
    "openai_chunks",
]

# OpenAI's name -> natserve's generate_config key. top_k and stop_token_ids are natserve's own,
# taken beside OpenAI's fields as vLLM and Xinference take them.
SAMPLING_FIELDS: dict[str, str] = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "n": "n",
    "best_of": "best_of",
    "logprobs": "logprobs",
    "top_logprobs": "top_logprobs",
    "echo": "echo",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_p": "min_p",
    "logit_bias": "logit_bias",
    "response_format": "response_format",
    "regex": "regex",
    "choice": "choice",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls",
}


def _none_or(*values: Any) -> Callable[[Any], bool]:
    # ``type(v) is type(x)``: True == 1 and 0 == False in Python, but n: true asks for something.
    return lambda v: v is None or any(type(v) is type(x) and v == x for x in values)


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# Taken fields whose value asks for what natserve does anyway: left out of the generate_config,
# so that a request with OpenAI's defaults written out takes the plain path.
_DEFAULTS: dict[str, Callable[[Any], bool]] = {
    "n": _none_or(1),
    "best_of": _none_or(1),
    "echo": _none_or(False),
    "logprobs": _none_or(False),
    "top_logprobs": _none_or(0),
    "presence_penalty": _none_or(0, 0.0),
    "frequency_penalty": _none_or(0, 0.0),
    "repetition_penalty": _none_or(1, 1.0),
    "min_p": _none_or(0, 0.0),
    "logit_bias": _empty,
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": _empty,
    "tool_choice": _none_or("auto"),
    "parallel_tool_calls": _none_or(True),
}

# The fields natserve does not act on, and the values of them that ask for nothing.
COMPLETION_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "suffix": _none_or(""),
}
CHAT_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    # The deprecated forms of tools / tool_choice.
    "functions": _empty,
    "function_call": lambda v: v is None or v in ("none", "auto"),
}
_EMBEDDING_FORMATS = ("float", "base64")


def _unsupported(key: str, value: Any, neutral: Mapping[str, Callable[[Any], bool]], route: str) -> None:
    check = neutral.get(key)
    if check is None:
        raise InvalidField(
            f"{key!r} is not a field natserve takes in {route} bodies",
            param=key,
            code="unsupported_parameter",
        )
    if not check(value):
        raise InvalidField(
            f"{key} {value!r} is not supported by natserve yet; leave it out",
            param=key,
            code="unsupported_value",
        )


def _model(value: Any) -> str:
    if value is None:
        raise InvalidField("'model' is required: the uid of a running model", param="model", code="missing")
    try:
        return check_name(value, "model")
    except BadRequest as exc:
        raise InvalidField(exc.message, param="model") from None


def _stream_options(value: Any, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk."""
    if value is None:
        return False
    if not stream:
        raise InvalidField("stream_options is only allowed with stream: true", param="stream_options")
    if type(value) is not dict:
        raise InvalidField(f"stream_options must be an object, got {value!r}", param="stream_options")
    include = False
    for key, option in value.items():
        if key != "include_usage":
            raise InvalidField(
                f"stream_options.{key} is not supported",
                param=f"stream_options.{key}",
                code="unsupported_parameter",
            )
        if option is not None and type(option) is not bool:
            raise InvalidField(
                f"stream_options.include_usage must be a boolean, got {option!r}",
                param="stream_options.include_usage",
            )
        include = bool(option)
    return include


def _sampling(config: dict[str, Any], key: str, target: str, value: Any) -> None:
    default = _DEFAULTS.get(key)
    if value is None or (default is not None and default(value)):
        return
    if target in config and config[target] != value:
        raise InvalidField(
            f"max_tokens {config[target]!r} and max_completion_tokens {value!r} differ: give one", param=key
        )
    config[target] = value


def _checked(
    config: dict[str, Any], kind: Literal["completion", "chat"], body: Mapping[str, Any]
) -> dict[str, Any]:
    """The generate_config as natserve checks it, a wrong value a 400 naming the body's field."""
    try:
        return check_generate_config(config, kind) or {}
    except BadRequest as exc:
        named = name_the_field(exc, body)
        raise (named or InvalidField(exc.message, param=None)) from None


def _user(value: Any) -> None:
    if value is not None and type(value) is not str:
        raise InvalidField(f"user must be a string, got {value!r}", param="user")


def _stream_flag(value: Any) -> bool:
    if value is None:
        return False
    if type(value) is not bool:
        raise InvalidField(f"stream must be a boolean, got {value!r}", param="stream")
    return value


def _object(body: Any, route: str) -> dict[str, Any]:
    if type(body) is not dict:
        raise InvalidField(
            f"the body of {route} must be a JSON object, got {type(body).__name__}", param=None
        )
    return body


def completion_call(body: Any) -> tuple[str, str, dict[str, Any], bool]:
    """``POST /v1/completions``: (model uid, prompt, generate_config, include_usage)."""
    body = _object(body, "/v1/completions")
    config: dict[str, Any] = {}
    model = prompt = options = None
    stream = False
    for key, value in body.items():
        target = SAMPLING_FIELDS.get(key)
        if target is not None:
            _sampling(config, key, target, value)
        elif key == "model":
            model = value
        elif key == "prompt":
            prompt = value
        elif key == "stream":
            stream = _stream_flag(value)
        elif key == "stream_options":
            options = value
        elif key == "user":
            _user(value)
        else:
            _unsupported(key, value, COMPLETION_NEUTRAL, "/v1/completions")
    uid = _model(model)
    if type(prompt) is list and len(prompt) == 1:
        prompt = prompt[0]  # one prompt in OpenAI's list form
    if type(prompt) is not str:
        if type(prompt) is list:
            raise InvalidField(
                f"prompt holds {len(prompt)} prompts or token ids; natserve takes one prompt string",
                param="prompt",
                code="unsupported_value",
            )
        raise InvalidField(
            "'prompt' is required: a string"
            if prompt is None
            else f"prompt must be a string, got {prompt!r:.80}",
            param="prompt",
        )
    include_usage = _stream_options(options, stream)
    if stream:
        config["stream"] = True
    return uid, prompt, _checked(config, "completion", body), include_usage


def _text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for j, part in enumerate(parts):
        if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
            kind = part.get("type") if type(part) is dict else type(part).__name__
            raise InvalidField(
                f"messages[{index}].content[{j}] is a {kind!r} part; natserve takes text parts only",
                param=f"messages[{index}].content[{j}]",
                code="unsupported_value",
            )
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: Any) -> list[dict[str, Any]]:
    if type(value) is not list or not value:
        raise InvalidField(
            "'messages' is required: a non-empty list of messages"
            if value is None
            else f"messages must be a non-empty list, got {value!r:.80}",
            param="messages",
        )
    for i, message in enumerate(value):
        if type(message) is not dict:
            raise InvalidField(
                f"messages[{i}] must be an object, got {message!r:.80}", param=f"messages[{i}]"
            )
        if type(message.get("role")) is not str:
            raise InvalidField(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        content = message.get("content")
        if content is None or type(content) is str:
            continue
        if type(content) is list:
            message["content"] = _text_parts(content, i)
        else:
            raise InvalidField(
                f"messages[{i}].content must be a string or a list of text parts, got {content!r:.80}",
                param=f"messages[{i}].content",
            )
    return value


def chat_call(body: Any) -> tuple[str, list[dict[str, Any]], dict[str, Any], bool]:
    """``POST /v1/chat/completions``: (model uid, messages, generate_config, include_usage)."""
    body = _object(body, "/v1/chat/completions")
    config: dict[str, Any] = {}
    model = messages = options = None
    stream = False
    for key, value in body.items():
        target = SAMPLING_FIELDS.get(key)
        if target is not None:
            _sampling(config, key, target, value)
        elif key == "model":
            model = value
        elif key == "messages":
            messages = value
        elif key == "stream":
            stream = _stream_flag(value)
        elif key == "stream_options":
            options = value
        elif key == "user":
            _user(value)
        else:
            _unsupported(key, value, CHAT_NEUTRAL, "/v1/chat/completions")
    uid = _model(model)
    checked = _messages(messages)
    include_usage = _stream_options(options, stream)
    if stream:
        config["stream"] = True
    return uid, checked, _checked(config, "chat", body), include_usage


def embedding_call(body: Any) -> tuple[str, str | list[str], bool]:
    """``POST /v1/embeddings``: (model uid, input, whether to answer base64)."""
    body = _object(body, "/v1/embeddings")
    model = text = None
    encoding = "float"
    for key, value in body.items():
        if key == "model":
            model = value
        elif key == "input":
            text = value
        elif key == "encoding_format":
            if value is not None and value not in _EMBEDDING_FORMATS:
                raise InvalidField(
                    f"encoding_format {value!r} is not one of {', '.join(_EMBEDDING_FORMATS)}",
                    param="encoding_format",
                )
            encoding = value or "float"
        elif key == "user":
            _user(value)
        elif key == "dimensions":
            if value is not None:
                raise InvalidField(
                    "dimensions is not supported: natserve's embeddings have the model's own size",
                    param="dimensions",
                    code="unsupported_value",
                )
        else:
            raise InvalidField(
                f"{key!r} is not a field natserve takes in /v1/embeddings bodies",
                param=key,
                code="unsupported_parameter",
            )
    uid = _model(model)
    if type(text) is not str:
        if type(text) is not list or not text:
            raise InvalidField(
                "'input' is required: a string or a non-empty list of strings"
                if text is None
                else f"input must be a string or a non-empty list of strings, got {text!r:.80}",
                param="input",
            )
        for i, item in enumerate(text):
            if type(item) is not str:
                raise InvalidField(
                    f"input[{i}] is {item!r:.40}; natserve embeds text, not token ids",
                    param=f"input[{i}]",
                    code="unsupported_value",
                )
    return uid, text, encoding == "base64"


def encode_embeddings(reply: dict[str, Any]) -> dict[str, Any]:
    """Turn each embedding into OpenAI's base64 form: little-endian float32, base64."""
    for item in reply.get("data") or ():
        packed = array("f", item["embedding"])
        if sys.byteorder != "little":
            packed.byteswap()
        item["embedding"] = base64.b64encode(packed.tobytes()).decode("ascii")
    return reply


async def openai_chunks(stream: AsyncStream, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """natserve's stream chunks as OpenAI's.

    natserve puts the usage on its last chunk; OpenAI sends it only when asked
    (``stream_options.include_usage``), then as ``"usage": null`` on every chunk and one more
    chunk with empty ``choices`` and the usage at the end.
    """
    usage = last = None
    try:
        async for chunk in stream:
            counted = chunk.pop("usage", None)
            if counted is not None:
                usage = counted
            if include_usage:
                chunk["usage"] = None
            last = chunk
            yield chunk
        if include_usage and last is not None and usage is not None:
            yield {
                "id": last["id"],
                "object": last["object"],
                "created": last["created"],
                "model": last["model"],
                "choices": [],
                "usage": usage,
            }
    finally:
        await stream.aclose()


def model_entry(uid: str, description: Mapping[str, Any]) -> dict[str, Any]:
    """One model in ``GET /v1/models``: OpenAI's fields on natserve's description (Xinference's
    client reads ``id`` and the description's ``model_type``, ``model_ability``, ...)."""
    created = description.get("created_at")
    return {
        **description,
        "id": uid,
        "object": "model",
        "created": int(created) if isinstance(created, int | float) else 0,
        "owned_by": "natserve",
    }


# natserve names a wrong generate_config value "generate_config.<key>"; the caller wrote the
# OpenAI name.
_CONFIG_KEY = re.compile(r"generate_config\.(\w+)")


def name_the_field(exc: BadRequest, body: Mapping[str, Any]) -> InvalidField | None:
    """A natserve 400 about a ``generate_config`` value with ``param`` naming the body's field
    it came from; None when ``exc`` is about something else."""
    if getattr(exc, "param", None) is not None:
        return None
    found = _CONFIG_KEY.search(exc.message)
    if found is None:
        return None
    key = found.group(1)
    if key == "max_tokens" and "max_completion_tokens" in body and "max_tokens" not in body:
        key = "max_completion_tokens"
    return InvalidField(exc.message, param=key)
