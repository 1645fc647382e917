"""The batch-job client: files in the pool's object store, and ``batches.*`` on the registry.

Files go straight to NATS Object Store (bucket ``<prefix>_files``, which the registry makes):
an input file of any size travels in the object store's chunks, never in one request that
``max_payload`` would bound. The registry reads it from there when the job is created.

    async with AsyncBatchClient.connect("nats://127.0.0.1:4222") as batches:
        file_id = await batches.upload(open("jobs.jsonl", "rb").read(), filename="jobs.jsonl")
        job = await batches.create(input_file_id=file_id, endpoint="/v1/chat/completions")
        ...
        output = await batches.download(job["output_file_id"])
"""

from __future__ import annotations

import json
import time
from types import TracebackType
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore

from ._auth import NatsAuth, connect_options, with_local_token
from ._batches import BatchNames, check_batch_id, check_file_id, new_file_id
from ._connect import NATSConnection, connect
from ._errors import NoResponders, NotFound, Unavailable
from ._nats_transport import NatsTransport
from ._subjects import DEFAULT_PREFIX, Subjects

__all__ = ["AsyncBatchClient"]

# A batch of 50,000 lines is checked and queued within this on two loaded cores.
DEFAULT_TIMEOUT = 120.0


class AsyncBatchClient:
    """Batch jobs and their files over one NATS connection."""

    def __init__(
        self, nc: NATSConnection, *, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.names = BatchNames(prefix)
        self.timeout = timeout
        self.transport = NatsTransport(nc)
        self._files: ObjectStore | None = None
        self._owns = False

    @classmethod
    async def connect(
        cls,
        url: str | list[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        auth: NatsAuth | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> AsyncBatchClient:
        # As the client's: the local pool's token when nothing else identifies us (``_auth``).
        merged = with_local_token(url, {**connect_options(auth), **options})
        nc = await connect(url, name="natserve-batches", **merged)
        client = cls(nc, prefix=prefix, timeout=timeout)
        client._owns = True
        return client

    async def close(self) -> None:
        await self.transport.close()
        if self._owns and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> AsyncBatchClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the registry

    async def _request(self, subject: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self.transport.is_closed:
            await self.transport.start()
        try:
            reply = await self.transport.request(subject, payload, timeout=self.timeout)
        except NoResponders as exc:
            raise NoResponders(
                f"no natserve registry answers on {subject!r}: is `natserve up` or `natserve registry` "
                f"running with prefix {self.subjects.prefix!r}?",
                subject=subject,
            ) from exc
        if not isinstance(reply, dict):
            raise Unavailable(f"the reply on {subject!r} is not an object: {reply!r}"[:300])
        return reply

    async def create(self, **body: Any) -> dict[str, Any]:
        """``batches.create``: ``input_file_id`` or ``requests``, ``endpoint``, ``model``,
        ``completion_window``, ``metadata`` -> the batch object."""
        return await self._request(
            self.subjects.batches_create, {k: v for k, v in body.items() if v is not None}
        )

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._request(self.subjects.batches_get, {"batch_id": check_batch_id(batch_id)})

    async def list(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"limit": limit}
        if after is not None:
            body["after"] = after
        return await self._request(self.subjects.batches_list, body)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._request(self.subjects.batches_cancel, {"batch_id": check_batch_id(batch_id)})

    # -- files

    async def _store(self) -> ObjectStore:
        if self._files is None:
            js = self.nc.jetstream(timeout=10)
            try:
                self._files = await js.object_store(self.names.files_bucket)
            except nats.js.errors.BucketNotFoundError:
                raise Unavailable(
                    f"the object store {self.names.files_bucket!r} does not exist: no natserve registry "
                    f"with JetStream has run with prefix {self.subjects.prefix!r}"
                ) from None
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.Error) as exc:
                raise Unavailable(
                    f"JetStream is not available on the NATS server ({type(exc).__name__}: {exc})"
                ) from exc
        return self._files

    async def upload(self, data: bytes, *, filename: str = "batch.jsonl", purpose: str = "batch") -> str:
        """Store ``data`` as a new file; its id."""
        file_id = new_file_id()
        meta = ObjectMeta(
            name=file_id,
            description=json.dumps(
                {"filename": filename, "purpose": purpose, "created_at": int(time.time())}
            ),
        )
        await (await self._store()).put(file_id, data, meta=meta)
        return file_id

    async def download(self, file_id: str) -> bytes:
        store = await self._store()
        try:
            result = await store.get(check_file_id(file_id, "file_id"))
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"file_id {file_id!r}: no such file") from None
        return result.data or b""

    async def file(self, file_id: str) -> dict[str, Any]:
        """The file object, as OpenAI's ``files`` API shows it."""
        store = await self._store()
        try:
            info = await store.get_info(check_file_id(file_id, "file_id"))
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"file_id {file_id!r}: no such file") from None
        try:
            described = json.loads(info.description or "{}")
        except ValueError:
            described = {}
        if not isinstance(described, dict):
            described = {}
        created = described.get("created_at")
        if not isinstance(created, int):
            created = int(time.time())
        kind = "batch_output" if file_id.endswith(("-output", "-errors")) else "batch"
        return {
            "id": file_id,
            "object": "file",
            "bytes": info.size or 0,
            "created_at": created,
            "filename": described.get("filename", f"{file_id}.jsonl"),
            "purpose": described.get("purpose", kind),
            "status": "processed",
            "status_details": None,
        }
