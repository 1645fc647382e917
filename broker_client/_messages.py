"""Wire models: every request and reply on natserve's subjects (pydantic v2, no I/O).

Requests forbid unknown keys, so a typo (``max_token``) is a 400 naming the key rather than
a silently ignored option, and they are strict: a value of the wrong type (``max_tokens: "5"``,
``max_tokens: true``, ``stream: "yes"``) is a 400 naming the field, never coerced. Their sizes,
counts and ranges come from ``_bounds.py``. Replies follow the OpenAI/Xinference shapes.

Heartbeats (``WorkerInfo`` with its ``DeviceInfo`` and ``ReplicaInfo``) are checked field by
field the same way: they decide where models are placed and when a worker is dead. Keys a newer
worker may add ride along only as small scalars (see ``_bounded_extras``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._bounds import (
    DEVICE_PATTERN,
    INT64_MAX,
    INT64_MIN,
    MAX_BATCH_SIZE,
    MAX_CHOICES,
    MAX_DESCRIPTION,
    MAX_DEVICES,
    MAX_HEARTBEAT_INTERVAL,
    MAX_IDLE_TIMEOUT,
    MAX_KEEPALIVE,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PATTERN,
    MAX_RECENT_ERRORS,
    MAX_REPLICAS,
    MAX_REQUEST_LIMITS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEXT,
    MAX_TOKENS,
    MAX_TOOLS,
    MAX_WORKER_REPLICAS,
)
from ._subjects import NAME_PATTERN

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatLogprobs",
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "DescribeRequest",
    "DeviceInfo",
    "EmbedRequest",
    "Embedding",
    "EmbeddingList",
    "FunctionSpec",
    "GenerateConfig",
    "GenerateRequest",
    "GetRegistrationRequest",
    "JsonSchemaFormat",
    "JsonSchemaSpec",
    "LaunchReply",
    "LaunchRequest",
    "ListRegistrationsRequest",
    "ModelEvent",
    "NamedToolChoice",
    "RegisterReply",
    "RegisterRequest",
    "ReplicaInfo",
    "Request",
    "TerminateRequest",
    "TokenLogprobEntry",
    "ToolCall",
    "ToolSpec",
    "TopLogprob",
    "UnregisterRequest",
    "Usage",
    "WorkerInfo",
    "WorkerLaunch",
    "WorkerLaunchReply",
    "WorkerTerminate",
    "check_config_for",
]

ModelType = Literal["LLM", "embedding"]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Device = Annotated[str, Field(pattern=DEVICE_PATTERN)]
ReplicaIndex = Annotated[int, Field(ge=0, lt=MAX_REPLICAS)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Wall-clock seconds and durations: finite and not negative.
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- inference


# OpenAI's bounds on names: a function's, a JSON schema's.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION)]
ChoiceString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
# A logit_bias key: a token id as a decimal string (JSON object keys are strings).
_TOKEN_KEY = re.compile(r"^[0-9]{1,19}$")


class TextFormat(Request):
    type: Literal["text"]


class JsonObjectFormat(Request):
    type: Literal["json_object"]


class JsonSchemaSpec(Request):
    """``response_format.json_schema``: OpenAI's ``{name, description, schema, strict}``."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: FunctionName
    description: Description | None = None
    # ``schema`` on the wire (the attribute name would shadow BaseModel's); none: any JSON object.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionSpec(Request):
    name: FunctionName
    description: Description | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolSpec(Request):
    """One of a chat's ``tools``: ``{"type": "function", "function": {name, description, parameters}}``."""

    type: Literal["function"]
    function: FunctionSpec


class FunctionRef(Request):
    name: FunctionName


class NamedToolChoice(Request):
    type: Literal["function"]
    function: FunctionRef


class StreamOptions(Request):
    include_usage: bool | None = None


# ``logprobs`` and the keys that only one of the two kinds of request takes (the checks of
# ``check_config_for``): a completion's logprobs is OpenAI's integer k, a chat's a boolean with
# ``top_logprobs`` beside it.
_CHAT_ONLY = ("top_logprobs", "tools", "tool_choice", "parallel_tool_calls")
_COMPLETION_ONLY = ("echo",)


class GenerateConfig(Request):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT64_MAX)
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Choices and what each token cost (see check_config_for for which kind takes which form).
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    best_of: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: LogprobCount | None = None
    echo: bool | None = None
    # Penalties and biases: OpenAI's (presence, frequency, logit_bias), Hugging Face's
    # repetition_penalty (1 is off; the engine takes up to 100) and min_p.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    min_p: float | None = Field(default=None, ge=0, le=1)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    # Structured output: OpenAI's response_format, and natserve's own two constraints: the whole
    # output matches the regex ``regex``, or is exactly one of the strings of ``choice``.
    response_format: ResponseFormat | None = None
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_PATTERN)
    choice: list[ChoiceString] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    # Tools (chat only): OpenAI's shapes.
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, tuple):
            return list(value)  # Python callers; the wire only has lists
        return value

    @field_validator("stop_token_ids", "choice", mode="before")
    @classmethod
    def _ids_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any) -> Any:
        if value is None or type(value) is bool:
            return value
        if type(value) is not int or not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(
                f"must be an integer 0..{MAX_LOGPROBS} (a completion) or true/false (a chat), "
                f"got {_shown_value(value)}"
            )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError(
                f"must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {value[:40]!r}"
            )
        if value is not None and not isinstance(value, str | dict | NamedToolChoice):
            raise ValueError(f"must be a string or an object, got {_shown_value(value)}")
        return value

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, value: Any) -> Any:
        if value is not None and not (type(value) is int and value == 1):
            raise ValueError(
                f"must be 1 (natserve samples each of the n choices once), got {_shown_value(value)}"
            )
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            # Python callers may key by the token id itself; JSON keys are strings.
            return {str(k) if type(k) is int else k: v for k, v in value.items()}
        return value

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _bias_values(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_KEY.match(key) or int(key) > INT64_MAX:
                raise ValueError(f"key {key[:40]!r} is not a token id (a decimal integer string)")
            if not -100 <= bias <= 100:  # also false for NaN
                raise ValueError(f"[{key}] must be in -100..100, got {bias!r}")
        return value

    @model_validator(mode="after")
    def _together(self) -> GenerateConfig:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        forced = self.tool_choice not in (None, "none", "auto")
        formats = [
            name
            for name, given in (
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("regex", self.regex is not None),
                ("choice", self.choice is not None),
                ("tool_choice", forced),
            )
            if given
        ]
        if len(formats) > 1:
            raise ValueError(f"{formats[0]}: constrains the output, and so does {formats[1]}; give one")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"tools: function {twice!r} is given twice")
        if forced and not names:
            raise ValueError(f"tool_choice: {_shown_choice(self.tool_choice)} needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(
                f"tool_choice: function {self.tool_choice.function.name!r} is not one of the tools "
                f"({', '.join(names)})"
            )
        return self


def _shown_value(value: Any) -> str:
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40])
    return f"a {type(value).__name__}"


def _shown_choice(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"function {value.function.name!r}"


def check_config_for(config: GenerateConfig | None, kind: Literal["completion", "chat"]) -> None:
    """ValueError naming the ``generate_config`` key that the other kind of request takes:
    ``echo`` is a completion's, ``top_logprobs`` and the tools a chat's, and ``logprobs`` is an
    integer k for a completion and a boolean for a chat."""
    if config is None:
        return
    given = config.model_fields_set
    logprobs = config.logprobs
    if kind == "completion":
        if type(logprobs) is bool:
            raise ValueError(
                f"generate_config.logprobs: a completion takes an integer 0..{MAX_LOGPROBS} "
                f"(the alternatives per token), got {logprobs!r}"
            )
        for key in _CHAT_ONLY:
            if key in given and getattr(config, key) is not None:
                raise ValueError(f"generate_config.{key}: only a chat takes it (a completion was asked)")
        return
    if logprobs is not None and type(logprobs) is not bool:
        raise ValueError(
            f"generate_config.logprobs: a chat takes true or false (top_logprobs gives the "
            f"alternatives), got {logprobs!r}"
        )
    if config.top_logprobs is not None and logprobs is not True:
        raise ValueError(
            f"generate_config.top_logprobs: {config.top_logprobs} needs logprobs: true, got {logprobs!r}"
        )
    for key in _COMPLETION_ONLY:
        if key in given and getattr(config, key) is not None:
            raise ValueError(f"generate_config.{key}: only a completion takes it (a chat was asked)")


# ``ack`` on a model request: the replica that takes it says which worker it is (an empty
# ``Natserve-Accepted`` message once it has run for a while), so that the client can fail the
# request at once if that worker dies. The body's form of the ``Natserve-Ack: 1`` header.
# ``keepalive`` on a streamed one: the reader acknowledges every N chunks, and the stream stops
# when it goes silent (_keepalive.py); without it a stream runs to its end.
Keepalive = Annotated[int, Field(ge=1, le=MAX_KEEPALIVE)]


class GenerateRequest(Request):
    prompt: str
    generate_config: GenerateConfig | None = None
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False
    keepalive: Keepalive | None = None

    @model_validator(mode="after")
    def _completion_keys(self) -> GenerateRequest:
        check_config_for(self.generate_config, "completion")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: FunctionName
    # OpenAI's form is a JSON string; an object (what chat templates take) is accepted too.
    arguments: str | dict[str, Any]


class ToolCall(BaseModel):
    """A call an assistant made: ``message.tool_calls[i]`` of a reply, or of a chat's history."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(max_length=MAX_TEXT)
    content: str | None = ""
    # An assistant's calls, and the call a "tool" message answers.
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message holds them, not role {self.role!r:.40}")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self


class ChatRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    generate_config: GenerateConfig | None = None
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False
    keepalive: Keepalive | None = None

    @model_validator(mode="after")
    def _chat_keys(self) -> ChatRequest:
        check_config_for(self.generate_config, "chat")
        return self


class EmbedRequest(Request):
    input: str | list[str]
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False

    @field_validator("input")
    @classmethod
    def _nonempty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must hold at least one string")
        return value


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(_Reply):
    """A completion choice's ``logprobs``: OpenAI's legacy shape, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token of an echo
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Reply):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(_Reply):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Reply):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Reply):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(_Reply):
    """One token of ``choices[].logprobs.content``: OpenAI's chat shape."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Reply):
    content: list[TokenLogprobEntry] | None


ChatFinish = Literal["stop", "length", "tool_calls"]


class ChatChoice(_Reply):
    index: int = 0
    message: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinish | None = None


class ChatCompletion(_Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(_Reply):
    index: int = 0
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinish | None = None


class ChatCompletionChunk(_Reply):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(_Reply):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float]


class EmbeddingList(_Reply):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# ---------------------------------------------------------------------------- registry


class RegisterRequest(Request):
    model_type: ModelType = "LLM"
    # The definition (a JSON string or an object); parse_definition bounds its size.
    model: str | dict[str, Any]
    persist: bool = False


class RegisterReply(_Reply):
    model_type: str
    model_name: str


class UnregisterRequest(Request):
    model_type: ModelType = "LLM"
    # Names are subject tokens: one that breaks the pattern is a 400 before it reaches SQL
    # (PostgreSQL rejects a NUL in a text parameter with an error, which was a 500).
    model_name: str = Field(pattern=NAME_PATTERN)


class ListRegistrationsRequest(Request):
    model_type: ModelType | None = None


class GetRegistrationRequest(Request):
    model_type: ModelType = "LLM"
    model_name: str = Field(pattern=NAME_PATTERN)


class LaunchRequest(Request):
    model_name: Name
    model_type: ModelType | None = None
    model_uid: Name | None = None
    model_format: Literal["pytorch"] | None = None
    model_size_in_billions: float | None = Field(default=None, gt=0, le=1e5)
    quantization: Literal["none", "8-bit", "4-bit"] | None = None
    replica: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    n_gpu: Annotated[int, Field(ge=0, le=MAX_DEVICES)] | Literal["auto"] | None = "auto"
    worker_id: Name | None = None
    request_limits: int | None = Field(default=None, ge=1, le=MAX_REQUEST_LIMITS)
    max_batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)
    # Per replica: the largest max_tokens a request may ask for, and requests per second
    # (a token bucket); a worker's own settings cap both.
    max_tokens_limit: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    rate_limit: float | None = Field(default=None, gt=0, le=1e6)
    wait: bool = True
    # Seconds; a week is more than any download and load takes.
    timeout: float | None = Field(default=None, gt=0, le=7 * 86400)
    # On demand: the replicas kept while idle (0..replica; 0 scales to zero, and the launch
    # then loads nothing until the first request) and the seconds a replica may go without a
    # request before it is stopped. Either one makes the model scale; the definition's
    # ``launch`` key gives the defaults (registry_service/plan.py).
    min_replicas: int | None = Field(default=None, ge=0, lt=MAX_REPLICAS)
    idle_timeout: float | None = Field(default=None, gt=0, le=MAX_IDLE_TIMEOUT, allow_inf_nan=False)


class LaunchReply(_Reply):
    model_uid: str


class DescribeRequest(Request):
    model_uid: Name


class TerminateRequest(Request):
    model_uid: Name


# ---------------------------------------------------------------------------- workers

# Keys a heartbeat model does not declare: at most this many, each a short name holding a
# scalar (a counter a newer worker reports), so that one beat cannot carry megabytes.
_MAX_EXTRAS = 32
_EXTRA_KEY = 64


class _Heartbeat(BaseModel):
    """A part of a heartbeat: strict, bounded, and open only to small scalar extras."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _bounded_extras(self) -> Any:
        extra = self.__pydantic_extra__
        if extra:
            if len(extra) > _MAX_EXTRAS:
                raise ValueError(f"{len(extra)} undeclared keys; at most {_MAX_EXTRAS}")
            for key, value in extra.items():
                if len(key) > _EXTRA_KEY:
                    raise ValueError(f"undeclared key {key[:_EXTRA_KEY]!r}... is longer than {_EXTRA_KEY}")
                if isinstance(value, str):
                    if len(value) > MAX_TEXT:
                        raise ValueError(f"{key}: a string of {len(value)} characters; at most {MAX_TEXT}")
                elif value is not None and not isinstance(value, bool | int | float):
                    raise ValueError(f"{key}: an undeclared key must hold a number, a string or null")
        return self


class DeviceInfo(_Heartbeat):
    name: Device  # "cpu", "cuda:0"
    kind: Literal["cpu", "cuda"]
    total_memory: Count
    free_memory: Count
    description: Text = ""


class ReplicaInfo(_Heartbeat):
    model_uid: Name
    replica_index: ReplicaIndex
    model_name: Name
    model_type: ModelType
    device: Device
    status: Literal["loading", "ready", "failed", "stopping", "closed"]
    memory_bytes: Count = 0
    active: Count = 0
    waiting: Count = 0
    # Seconds since the replica last had a request in flight (0 while it has one); None from
    # a worker that does not say. The registry stops replicas idle past their idle timeout.
    idle_for: Seconds | None = None


class _RecentError(_Heartbeat):
    """One of a worker's last errors (a 5xx reply, a failed launch), in its heartbeat."""

    ts: Seconds
    model_uid: Name | None = None
    endpoint: Text | None = None
    code: int = Field(ge=0, le=999)
    message: str = ""
    request_id: Annotated[str, Field(max_length=128)] | None = None

    @field_validator("message", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        # A long message is cut rather than refused: the beat it rides in must go through.
        return value[:MAX_TEXT] if isinstance(value, str) else value


class WorkerInfo(_Heartbeat):
    worker_id: Name
    host: Annotated[str, Field(max_length=255)]
    pid: int = Field(ge=0, le=1 << 32)
    version: Annotated[str, Field(max_length=64)]
    devices: list[DeviceInfo] = Field(max_length=MAX_DEVICES)
    replicas: list[ReplicaInfo] = Field(default_factory=list, max_length=MAX_WORKER_REPLICAS)
    started_at: Seconds
    last_seen: Seconds
    heartbeat_interval: float = Field(gt=0, le=MAX_HEARTBEAT_INTERVAL)
    # The worker's last errors (5xx replies, failed launches), newest last:
    # {"ts", "model_uid", "endpoint", "code", "message", "request_id"}, each checked.
    recent_errors: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_RECENT_ERRORS)
    # What the worker is doing: "stopping" tells the registry to place elsewhere, "stopped"
    # that it is gone (its last beat). None: an older worker, taken as running.
    status: Literal["created", "starting", "running", "stopping", "stopped"] | None = None
    # The device a launch without one loads on.
    default_device: Device | None = None

    @field_validator("recent_errors", mode="after")
    @classmethod
    def _errors(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Checked one by one, kept as the plain dicts `natserve status` reads.
        return [_RecentError.model_validate(error).model_dump() for error in value]


class WorkerLaunch(Request):
    """Registry → worker: load one replica and serve it on the model's subjects.

    The registry's bounds hold here too: a worker's command subject is reachable by anything
    that may publish on it, not only the registry."""

    model_uid: Name
    replica_index: ReplicaIndex = 0
    model_type: ModelType
    model_name: Name
    definition: dict[str, Any]
    spec: dict[str, Any]
    quantization: Literal["none", "8-bit", "4-bit"] = "none"
    device: Device | None = None
    request_limits: int | None = Field(default=None, ge=1, le=MAX_REQUEST_LIMITS)
    max_batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH_SIZE)
    max_tokens_limit: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    rate_limit: float | None = Field(default=None, gt=0, le=1e6)


class WorkerLaunchReply(_Reply):
    model_uid: str
    replica_index: int
    device: str
    memory_bytes: int


class WorkerTerminate(Request):
    model_uid: Name
    replica_index: ReplicaIndex | None = None
    # Terminate only replicas idle at least this many seconds (no request in flight): the
    # worker answers 409 when a request came meanwhile, so that an idle stop loses nothing.
    if_idle_for: Seconds | None = None


class ModelEvent(_Reply):
    """Published on ``natserve.events.models.<uid>``: launch progress and status changes."""

    model_uid: str
    model_name: str | None = None
    stage: str  # "placing", "download", "loading", "ready", "failed", "terminated"
    status: str | None = None
    fraction: float | None = None
    replica_index: int | None = None
    worker_id: str | None = None
    message: str | None = None
    ts: float | None = None
    # Why a replica started or stopped: "on_demand", "idle_timeout", "evicted_for <uid>", ...
    reason: str | None = None
