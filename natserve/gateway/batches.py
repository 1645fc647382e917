"""OpenAI's Files and Batches routes over natserve's batch jobs: ``/v1/files`` and ``/v1/batches``.

    POST /v1/files                       multipart (``file``, ``purpose=batch``) -> the file object
    GET  /v1/files/{file_id}             the file object
    GET  /v1/files/{file_id}/content     the file's bytes (an output file is JSONL)
    POST /v1/batches                     ``{input_file_id, endpoint, completion_window, metadata}``
    GET  /v1/batches                     ``?limit=&after=`` -> a list page
    GET  /v1/batches/{batch_id}          the batch object
    POST /v1/batches/{batch_id}/cancel   the batch object

Files live in the pool's object store and jobs in the registry (``broker_client.AsyncBatchClient``,
on a connection of the gateway's own, opened at the first batch request). The multipart body is
read by the standard library's MIME parser: the gateway's one form route does not justify a
dependency.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker_client import AsyncBatchClient, AsyncClient, PayloadTooLarge

from .errors import InvalidField

__all__ = ["GatewayBatches", "batch_routes", "multipart_fields"]

# The purposes natserve keeps files for.
_PURPOSES = ("batch",)


def multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidField(
            f"the body must be multipart/form-data (file, purpose), got {content_type or 'none'!r}",
            param=None,
        )
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise InvalidField("the multipart body has no parts (is its boundary right?)", param=None)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


class GatewayBatches:
    """The gateway's batch operations, on a batch client of its own."""

    def __init__(self, client: AsyncClient, *, nats_options: dict[str, Any] | None = None) -> None:
        self.client = client
        self._options = dict(nats_options or {})
        self._batches: AsyncBatchClient | None = None
        self._lock = asyncio.Lock()

    async def _get(self) -> AsyncBatchClient:
        async with self._lock:
            if self._batches is None:
                self._batches = await AsyncBatchClient.connect(
                    self.client.url, prefix=self.client.prefix, **self._options
                )
        return self._batches

    async def close(self) -> None:
        batches, self._batches = self._batches, None
        if batches is not None:
            await batches.close()

    async def upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        fields = multipart_fields(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace").strip()
        if purpose not in _PURPOSES:
            raise InvalidField(
                f"purpose {purpose!r} is not supported: natserve takes 'batch'", param="purpose"
            )
        if "file" not in fields:
            raise InvalidField("'file' is required: the JSONL file of requests", param="file")
        filename, data = fields["file"]
        batches = await self._get()
        file_id = await batches.upload(data, filename=filename or "batch.jsonl", purpose=purpose)
        return await batches.file(file_id)

    async def file(self, file_id: str) -> dict[str, Any]:
        return await (await self._get()).file(file_id)

    async def content(self, file_id: str) -> bytes:
        return await (await self._get()).download(file_id)

    async def create(self, body: Any) -> dict[str, Any]:
        if type(body) is not dict:
            raise InvalidField("the body of /v1/batches must be a JSON object", param=None)
        if "requests" in body or "model" in body:
            key = "requests" if "requests" in body else "model"
            raise InvalidField(f"{key!r} is not a field of OpenAI's batch body", param=key)
        return await (await self._get()).create(**body)

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await (await self._get()).get(batch_id)

    async def list(self, limit: str | None, after: str | None) -> dict[str, Any]:
        try:
            count = int(limit) if limit is not None else 20
        except ValueError:
            raise InvalidField(f"limit {limit!r} is not an integer", param="limit") from None
        return await (await self._get()).list(limit=count, after=after)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await (await self._get()).cancel(batch_id)


async def _raw_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the body is {length} bytes; this gateway takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes; this gateway takes at most {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def batch_routes(
    batches: GatewayBatches,
    route: Callable[..., Route],
    body_of: Callable[[Request], Any],
    max_body_bytes: int,
) -> list[Route]:
    """The Files and Batches routes, made with the app's ``route`` (key, id, errors, metrics)."""

    async def upload(request: Request, rid: str) -> Any:
        body = await _raw_body(request, max_body_bytes)
        return await batches.upload(request.headers.get("content-type", ""), body)

    async def file(request: Request, rid: str) -> Any:
        return await batches.file(request.path_params["file_id"])

    async def content(request: Request, rid: str) -> Any:
        data = await batches.content(request.path_params["file_id"])
        return Response(data, media_type="application/jsonl")

    async def create(request: Request, rid: str) -> Any:
        return await batches.create(await body_of(request))

    async def list_batches(request: Request, rid: str) -> Any:
        q = request.query_params
        return await batches.list(q.get("limit"), q.get("after"))

    async def get(request: Request, rid: str) -> Any:
        return await batches.get(request.path_params["batch_id"])

    async def cancel(request: Request, rid: str) -> Any:
        return await batches.cancel(request.path_params["batch_id"])

    return [
        route("/v1/files", "upload_file", upload, "POST"),
        route("/v1/files/{file_id}", "get_file", file, "GET"),
        route("/v1/files/{file_id}/content", "file_content", content, "GET"),
        route("/v1/batches", "create_batch", create, "POST"),
        route("/v1/batches", "list_batches", list_batches, "GET"),
        route("/v1/batches/{batch_id}", "get_batch", get, "GET"),
        route("/v1/batches/{batch_id}/cancel", "cancel_batch", cancel, "POST"),
    ]
