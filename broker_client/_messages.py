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

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._bounds import (
    DEVICE_PATTERN,
    INT64_MAX,
    INT64_MIN,
    MAX_BATCH_SIZE,
    MAX_DEVICES,
    MAX_HEARTBEAT_INTERVAL,
    MAX_KEEPALIVE,
    MAX_RECENT_ERRORS,
    MAX_REPLICAS,
    MAX_REQUEST_LIMITS,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEXT,
    MAX_TOKENS,
    MAX_WORKER_REPLICAS,
)
from ._definition import QuantizationName
from ._subjects import NAME_PATTERN

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "DescribeRequest",
    "DeviceInfo",
    "EmbedRequest",
    "Embedding",
    "EmbeddingList",
    "GenerateConfig",
    "GenerateRequest",
    "GetRegistrationRequest",
    "LaunchReply",
    "LaunchRequest",
    "ListRegistrationsRequest",
    "ModelEvent",
    "RegisterReply",
    "RegisterRequest",
    "ReplicaInfo",
    "Request",
    "TerminateRequest",
    "UnregisterRequest",
    "Usage",
    "WorkerInfo",
    "WorkerLaunch",
    "WorkerLaunchReply",
    "WorkerTerminate",
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


class GenerateConfig(Request):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT64_MAX)
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, tuple):
            return list(value)  # Python callers; the wire only has lists
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(max_length=MAX_TEXT)
    content: str | None = ""


class ChatRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    generate_config: GenerateConfig | None = None
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False
    keepalive: Keepalive | None = None


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


class CompletionChoice(_Reply):
    text: str
    index: int = 0
    logprobs: None = None
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


class ChatChoice(_Reply):
    index: int = 0
    message: dict[str, Any]
    finish_reason: Literal["stop", "length"] | None = None


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
    finish_reason: Literal["stop", "length"] | None = None


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
    model_format: Literal["pytorch", "ggufv2"] | None = None
    model_size_in_billions: float | None = Field(default=None, gt=0, le=1e5)
    # "none", "8-bit", "4-bit" for a pytorch spec, a GGUF type (Q4_K_M) for a ggufv2 one.
    quantization: QuantizationName | None = None
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
    quantization: QuantizationName = "none"
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
