"""Wire models: every request and reply on natserve's subjects (pydantic v2, no I/O).

Requests forbid unknown keys, so a typo (``max_token``) is a 400 naming the key rather than
a silently ignored option. Replies follow the OpenAI/Xinference shapes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- inference


class GenerateConfig(Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value


# ``ack`` on a model request: the replica that takes it says which worker it is (an empty
# ``Natserve-Accepted`` message once it has run for a while), so that the client can fail the
# request at once if that worker dies. The body's form of the ``Natserve-Ack: 1`` header.


class GenerateRequest(Request):
    prompt: str
    generate_config: GenerateConfig | None = None
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = ""


class ChatRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    generate_config: GenerateConfig | None = None
    request_id: str | None = Field(default=None, max_length=128)
    ack: bool = False


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
    model_name: str = Field(pattern=NAME_PATTERN)
    model_type: ModelType | None = None
    model_uid: str | None = Field(default=None, pattern=NAME_PATTERN)
    model_format: Literal["pytorch"] | None = None
    model_size_in_billions: float | None = Field(default=None, gt=0)
    quantization: Literal["none", "8-bit", "4-bit"] | None = None
    replica: int = Field(default=1, ge=1, le=64)
    n_gpu: int | Literal["auto"] | None = "auto"
    worker_id: str | None = None
    request_limits: int | None = Field(default=None, ge=1)
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    # Per replica: the largest max_tokens a request may ask for, and requests per second
    # (a token bucket); a worker's own settings cap both.
    max_tokens_limit: int | None = Field(default=None, ge=1)
    rate_limit: float | None = Field(default=None, gt=0, le=1e6)
    wait: bool = True
    timeout: float | None = Field(default=None, gt=0)


class LaunchReply(_Reply):
    model_uid: str


class DescribeRequest(Request):
    model_uid: str = Field(pattern=NAME_PATTERN)


class TerminateRequest(Request):
    model_uid: str = Field(pattern=NAME_PATTERN)


# ---------------------------------------------------------------------------- workers


class DeviceInfo(_Reply):
    name: str  # "cpu", "cuda:0"
    kind: str  # "cpu" or "cuda"
    total_memory: int
    free_memory: int
    description: str = ""


class ReplicaInfo(_Reply):
    model_uid: str
    replica_index: int
    model_name: str
    model_type: str
    device: str
    status: str  # "loading", "ready", "failed", "stopping"
    memory_bytes: int = 0
    active: int = 0
    waiting: int = 0


class WorkerInfo(_Reply):
    worker_id: str
    host: str
    pid: int
    version: str
    devices: list[DeviceInfo]
    replicas: list[ReplicaInfo] = Field(default_factory=list)
    started_at: float
    last_seen: float
    heartbeat_interval: float
    # The worker's last errors (5xx replies, failed launches), newest last:
    # {"ts", "model_uid", "endpoint", "code", "message", "request_id"}.
    recent_errors: list[dict[str, Any]] = Field(default_factory=list)


class WorkerLaunch(Request):
    """Registry → worker: load one replica and serve it on the model's subjects."""

    model_uid: str
    replica_index: int = 0
    model_type: ModelType
    model_name: str
    definition: dict[str, Any]
    spec: dict[str, Any]
    quantization: Literal["none", "8-bit", "4-bit"] = "none"
    device: str | None = None
    request_limits: int | None = None
    max_batch_size: int | None = None
    max_tokens_limit: int | None = Field(default=None, ge=1)
    rate_limit: float | None = Field(default=None, gt=0, le=1e6)


class WorkerLaunchReply(_Reply):
    model_uid: str
    replica_index: int
    device: str
    memory_bytes: int


class WorkerTerminate(Request):
    model_uid: str
    replica_index: int | None = None


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
