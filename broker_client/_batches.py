"""Batch jobs: OpenAI Batch API shapes, the JSONL lines of a job, and the JetStream names (pure).

A job is a list of request lines, as OpenAI's Batch API takes them::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "<uid>", "messages": [...], "max_tokens": 16}}

``url`` is ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings``. Each line is
checked and turned into natserve's own request (:class:`BatchItem`: the operation and the body
of a ``ChatRequest``, ``GenerateRequest`` or ``EmbedRequest``) when the job is created, so a bad
line is a 400 naming its line number and field before anything is queued.

The JetStream names of one prefix (:class:`BatchNames`): a work-queue stream of requests per
model uid, one results stream, a key-value bucket of job states and an object store of files.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._definition import format_validation_error
from ._errors import BadRequest
from ._messages import ChatRequest, EmbedRequest, GenerateRequest
from ._subjects import NAME_PATTERN, check_name

__all__ = [
    "ACK_WAIT",
    "BATCH_ENDPOINTS",
    "BATCH_ID_PATTERN",
    "BATCH_STATUSES",
    "FILE_ID_PATTERN",
    "IN_PROGRESS_EVERY",
    "MAX_DELIVERIES",
    "WORKERS_CONSUMER",
    "BatchCancelRequest",
    "BatchCreateRequest",
    "BatchGetRequest",
    "BatchItem",
    "BatchListRequest",
    "BatchNames",
    "check_batch_id",
    "check_file_id",
    "error_line",
    "new_batch_id",
    "new_file_id",
    "parse_batch_lines",
    "parse_jsonl",
    "success_line",
]

# url -> natserve operation.
BATCH_ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "generate",
    "/v1/embeddings": "embed",
}
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
BATCH_ID_PATTERN = r"^batch_[0-9a-f]{24}$"
FILE_ID_PATTERN = r"^file-[A-Za-z0-9_-]{1,100}$"
_BATCH_ID_RE = re.compile(BATCH_ID_PATTERN)
_FILE_ID_RE = re.compile(FILE_ID_PATTERN)

# The workers' durable pull consumer on each request stream.
WORKERS_CONSUMER = "workers"
# A request not acknowledged for ACK_WAIT seconds is delivered again: a SIGKILLed worker's
# requests go to another worker within that. A worker marks each request it runs "in progress"
# every IN_PROGRESS_EVERY seconds, a third of the wait, so that a beat late by a loaded machine's
# hiccup does not get a live request redelivered.
ACK_WAIT = 6.0
IN_PROGRESS_EVERY = 2.0
# A request delivered this many times without an answer (a request that kills its worker every
# time) is answered with an error line instead of being tried forever.
MAX_DELIVERIES = 5

# custom_id becomes part of a Nats-Msg-Id header: printable, one line, bounded.
_CUSTOM_ID_MAX = 256
_CUSTOM_ID_RE = re.compile(r"[\x20-\x7e]+")
# OpenAI's sampling fields -> natserve's generate_config keys (as the HTTP gateway takes them).
_SAMPLING = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
}
_INPUT_FIELD = {"chat": "messages", "generate": "prompt", "embed": "input"}
_KINDS: dict[str, type[BaseModel]] = {"chat": ChatRequest, "generate": GenerateRequest, "embed": EmbedRequest}


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def check_batch_id(value: object) -> str:
    if not isinstance(value, str) or not _BATCH_ID_RE.fullmatch(value):
        raise BadRequest(f"batch_id {value!r} is invalid: a batch id is 'batch_' and 24 hex digits")
    return value


def check_file_id(value: object, field: str = "input_file_id") -> str:
    if not isinstance(value, str) or not _FILE_ID_RE.fullmatch(value):
        raise BadRequest(
            f"{field} {value!r} is invalid: a file id is 'file-' and up to 100 letters, digits, '_' or '-'"
        )
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BatchCreateRequest(_Request):
    """``batches.create``: OpenAI's body, and natserve's inline ``requests`` as the other way to
    give the lines (a list of line objects, or one JSONL string)."""

    input_file_id: str | None = Field(default=None, pattern=FILE_ID_PATTERN)
    requests: list[dict[str, Any]] | str | None = None
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] | None = None
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    # The model of the lines whose body names none (``natserve batch submit --model``).
    model: str | None = Field(default=None, pattern=NAME_PATTERN)


class BatchGetRequest(_Request):
    batch_id: str = Field(pattern=BATCH_ID_PATTERN)


class BatchCancelRequest(_Request):
    batch_id: str = Field(pattern=BATCH_ID_PATTERN)


class BatchListRequest(_Request):
    limit: int = Field(default=20, ge=1, le=100)
    after: str | None = Field(default=None, pattern=BATCH_ID_PATTERN)


@dataclass(frozen=True)
class BatchItem:
    """One checked line: where it goes (``model``, ``operation``) and natserve's request body."""

    line: int  # 1-based, as an editor shows it
    custom_id: str
    url: str
    model: str
    operation: str
    request: dict[str, Any]

    def message(self, batch_id: str) -> dict[str, Any]:
        """What goes on the model's request stream."""
        return {
            "batch_id": batch_id,
            "line": self.line,
            "custom_id": self.custom_id,
            "url": self.url,
            "operation": self.operation,
            "request": self.request,
        }


def parse_jsonl(text: str | bytes) -> list[Any]:
    """The lines of a JSONL file (blank lines skipped); a 400 naming the line that is not JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the batch input is not UTF-8 text: {exc}") from None
    lines: list[Any] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            lines.append((number, json.loads(raw)))
        except ValueError as exc:
            raise BadRequest(f"line {number}: not a JSON object: {exc}") from None
    return lines


def _fail(number: int, field: str, message: str) -> BadRequest:
    return BadRequest(f"line {number}: {field}: {message}")


def _body(number: int, operation: str, body: dict[str, Any], model: str | None) -> tuple[str, dict[str, Any]]:
    config: dict[str, Any] = {}
    request: dict[str, Any] = {}
    uid = model
    for key, value in body.items():
        if key == "model":
            try:
                uid = check_name(value, "model")
            except BadRequest as exc:
                raise _fail(number, "body.model", exc.message) from None
        elif key == _INPUT_FIELD[operation]:
            request[key] = value
        elif operation != "embed" and key in _SAMPLING:
            if value is not None:
                target = _SAMPLING[key]
                if target in config and config[target] != value:
                    raise _fail(
                        number, f"body.{key}", "max_tokens and max_completion_tokens differ: give one"
                    )
                config[target] = value
        elif key == "stream":
            if value not in (None, False):
                raise _fail(number, "body.stream", f"{value!r}: a batch request cannot stream")
        elif key == "n" and operation != "embed":
            if value is not None and not (type(value) is int and value == 1):
                raise _fail(number, "body.n", f"{value!r} is not supported; leave it out or give 1")
        elif key == "user":
            if value is not None and type(value) is not str:
                raise _fail(number, "body.user", f"must be a string, got {value!r}")
        elif key == "encoding_format" and operation == "embed":
            if value not in (None, "float"):
                raise _fail(number, "body.encoding_format", f"{value!r}: batch embeddings are floats")
        else:
            raise _fail(number, f"body.{key}", "not a field natserve takes in this request")
    if uid is None:
        raise _fail(number, "body.model", "required (or give the job a model)")
    if _INPUT_FIELD[operation] not in request:
        raise _fail(number, f"body.{_INPUT_FIELD[operation]}", "required")
    if config:
        request["generate_config"] = config
    kind = _KINDS[operation]
    try:
        kind.model_validate(request)
    except ValidationError as exc:
        raise BadRequest(f"line {number}: {format_validation_error(exc, 'body')}") from None
    return uid, request


def parse_batch_lines(
    lines: list[Any], *, endpoint: str | None = None, model: str | None = None, max_lines: int
) -> list[BatchItem]:
    """Check a job's lines (``(number, object)`` pairs or bare objects) and make its items.

    Every error is a 400 naming the line and the field. ``endpoint``, when given, is the url
    every line must have (OpenAI's rule); ``model`` is the uid of the lines that name none.
    """
    if not lines:
        raise BadRequest("the batch has no request lines")
    if len(lines) > max_lines:
        raise BadRequest(f"the batch has {len(lines)} request lines; at most {max_lines}")
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(lines, 1):
        number, line = entry if isinstance(entry, tuple) else (index, entry)
        if type(line) is not dict:
            raise BadRequest(f"line {number}: must be a JSON object, got {type(line).__name__}")
        for key in line:
            if key not in ("custom_id", "method", "url", "body"):
                raise _fail(number, key, "unknown field (a line has custom_id, method, url, body)")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _fail(number, "custom_id", f"required, a non-empty string; got {custom_id!r}")
        if len(custom_id) > _CUSTOM_ID_MAX or not _CUSTOM_ID_RE.fullmatch(custom_id):
            raise _fail(
                number,
                "custom_id",
                f"{custom_id[:80]!r} must be printable ASCII on one line, "
                f"at most {_CUSTOM_ID_MAX} characters",
            )
        if custom_id in seen:
            raise _fail(number, "custom_id", f"{custom_id!r} is also the custom_id of line {seen[custom_id]}")
        seen[custom_id] = number
        method = line.get("method", "POST")
        if method != "POST":
            raise _fail(number, "method", f"{method!r} is not allowed: only 'POST'")
        url = line.get("url")
        operation = BATCH_ENDPOINTS.get(url) if isinstance(url, str) else None
        if operation is None:
            raise _fail(number, "url", f"{url!r} is not one of {', '.join(BATCH_ENDPOINTS)}")
        if endpoint is not None and url != endpoint:
            raise _fail(number, "url", f"{url!r} is not the batch's endpoint {endpoint!r}")
        body = line.get("body")
        if type(body) is not dict:
            raise _fail(number, "body", f"required, a JSON object; got {body!r}"[:200])
        uid, request = _body(number, operation, body, model)
        assert isinstance(url, str)
        items.append(BatchItem(number, custom_id, url, uid, operation, request))
    return items


def success_line(request_id: str, custom_id: str, body: Any) -> dict[str, Any]:
    """An output line of a request that was answered (OpenAI's shape)."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(request_id: str, custom_id: str, code: int, message: str, type_name: str) -> dict[str, Any]:
    """An output line of a request that failed: the error in OpenAI's shape, with the status."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": code,
            "request_id": request_id,
            "body": {"error": {"type": type_name, "code": code, "message": message}},
        },
        "error": {"code": type_name, "message": message},
    }


@dataclass(frozen=True)
class BatchNames:
    """The subjects and JetStream names of batch jobs under one prefix."""

    prefix: str

    @property
    def token(self) -> str:
        # Stream, bucket and consumer names may not hold dots.
        return self.prefix.replace(".", "_")

    def requests_stream(self, model_uid: str) -> str:
        return f"{self.token}_batch_{model_uid}"

    def requests_subject(self, model_uid: str, batch_id: str) -> str:
        return f"{self.prefix}.batches.requests.{model_uid}.{batch_id}"

    def requests_subjects(self, model_uid: str) -> str:
        return f"{self.prefix}.batches.requests.{model_uid}.*"

    @property
    def results_stream(self) -> str:
        return f"{self.token}_batch_results"

    def results_subject(self, batch_id: str) -> str:
        return f"{self.prefix}.batches.results.{batch_id}"

    @property
    def results_subjects(self) -> str:
        return f"{self.prefix}.batches.results.*"

    @property
    def jobs_bucket(self) -> str:
        return f"{self.token}_batches"

    @property
    def files_bucket(self) -> str:
        return f"{self.token}_files"

    def events(self, batch_id: str) -> str:
        return f"{self.prefix}.events.batches.{batch_id}"

    @staticmethod
    def msg_id(batch_id: str, custom_id: str) -> str:
        """The Nats-Msg-Id of a request or a result: JetStream drops a second copy."""
        return f"{batch_id}:{custom_id}"
