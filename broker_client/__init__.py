"""natserve's client library: ``Client``/``AsyncClient``, model handles, wire models, errors.

    from broker_client import Client
    client = Client("nats://127.0.0.1:4222")
    uid = client.launch_model(model_name="nsql-2B")
    client.get_model(uid).generate("SELECT")

Workers and the registry import the protocol from here: errors, wire models, definitions,
subjects and auth from this package, the pure codec and wire rules from ``broker_client.codec``
and ``broker_client.wire``, and the NATS runtime (connect, transport, responder, service host)
from ``broker_client.runtime``. This package imports neither of them.

Tests of code that uses the client need no server: ``AsyncClient(transport=MemoryTransport(...))``
answers each subject with a handler in the same process (``ClientTransport`` is the interface).
"""

from importlib.metadata import PackageNotFoundError, version

from ._async_client import AsyncClient
from ._auth import (
    LOCAL_TOKEN_FILE,
    NatsAuth,
    connect_options,
    local_token,
    with_local_token,
)
from ._bounds import MAX_DEFINITION_BYTES, MAX_HEARTBEAT_INTERVAL
from ._client_transport import ClientTransport, EventHandler, EventSubscription
from ._definition import (
    ABILITIES,
    GGUF_QUANTIZATION_PATTERN,
    MODEL_FORMATS,
    MODEL_TYPES,
    QUANTIZATIONS,
    EmbeddingDefinition,
    LLMDefinition,
    ModelDefinition,
    ModelSpec,
    PromptStyle,
    format_validation_error,
    parse_definition,
)
from ._errors import (
    BadRequest,
    Conflict,
    InternalError,
    NatserveError,
    NoResponders,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    ServerTimeout,
    ServiceError,
    TransportError,
    Unavailable,
    error_from_wire,
)
from ._handles import (
    AsyncChatModelHandle,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    AsyncModelHandle,
    AsyncStream,
    check_generate_config,
)
from ._memory_transport import MemoryHandler, MemoryRequest, MemoryTransport
from ._messages import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    DescribeRequest,
    DeviceInfo,
    Embedding,
    EmbeddingList,
    EmbedRequest,
    GenerateConfig,
    GenerateRequest,
    GetRegistrationRequest,
    LaunchReply,
    LaunchRequest,
    ListRegistrationsRequest,
    ModelEvent,
    RegisterReply,
    RegisterRequest,
    ReplicaInfo,
    Request,
    TerminateRequest,
    UnregisterRequest,
    Usage,
    WorkerInfo,
    WorkerLaunch,
    WorkerLaunchReply,
    WorkerTerminate,
)
from ._progress import ProgressCallback
from ._subjects import (
    DEFAULT_PREFIX,
    NAME_PATTERN,
    Subjects,
    check_name,
)
from ._sync_client import (
    ChatModelHandle,
    Client,
    EmbeddingModelHandle,
    GenerateModelHandle,
    ModelHandle,
    Stream,
)

try:
    __version__ = version("natserve")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "ABILITIES",
    "DEFAULT_PREFIX",
    "GGUF_QUANTIZATION_PATTERN",
    "LOCAL_TOKEN_FILE",
    "MAX_DEFINITION_BYTES",
    "MAX_HEARTBEAT_INTERVAL",
    "MODEL_FORMATS",
    "MODEL_TYPES",
    "NAME_PATTERN",
    "QUANTIZATIONS",
    "AsyncChatModelHandle",
    "AsyncClient",
    "AsyncEmbeddingModelHandle",
    "AsyncGenerateModelHandle",
    "AsyncModelHandle",
    "AsyncStream",
    "BadRequest",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatModelHandle",
    "ChatRequest",
    "Client",
    "ClientTransport",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "Conflict",
    "DescribeRequest",
    "DeviceInfo",
    "EmbedRequest",
    "Embedding",
    "EmbeddingDefinition",
    "EmbeddingList",
    "EmbeddingModelHandle",
    "EventHandler",
    "EventSubscription",
    "GenerateConfig",
    "GenerateModelHandle",
    "GenerateRequest",
    "GetRegistrationRequest",
    "InternalError",
    "LLMDefinition",
    "LaunchReply",
    "LaunchRequest",
    "ListRegistrationsRequest",
    "MemoryHandler",
    "MemoryRequest",
    "MemoryTransport",
    "ModelDefinition",
    "ModelEvent",
    "ModelHandle",
    "ModelSpec",
    "NatsAuth",
    "NatserveError",
    "NoResponders",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProgressCallback",
    "PromptStyle",
    "ProtocolError",
    "RegisterReply",
    "RegisterRequest",
    "ReplicaInfo",
    "Request",
    "RequestTimeout",
    "ServerTimeout",
    "ServiceError",
    "Stream",
    "Subjects",
    "TerminateRequest",
    "TransportError",
    "Unavailable",
    "UnregisterRequest",
    "Usage",
    "WorkerInfo",
    "WorkerLaunch",
    "WorkerLaunchReply",
    "WorkerTerminate",
    "__version__",
    "check_generate_config",
    "check_name",
    "connect_options",
    "error_from_wire",
    "format_validation_error",
    "local_token",
    "parse_definition",
    "with_local_token",
]
