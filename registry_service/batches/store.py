"""Where batch jobs live in JetStream: job states (key-value), files (object store), the streams.

All of it is file storage, so a job survives a restart of the nats-server as well as of the
registry:

    <token>_batches          key-value bucket: one key per job, the job's record (JSON)
    <token>_files            object store: input files, output and error files
    <token>_batch_<uid>      work-queue stream of one model's requests, subjects
                             ``<prefix>.batches.requests.<uid>.<batch id>``, consumer ``workers``
    <token>_batch_results    the results, subjects ``<prefix>.batches.results.<batch id>``

A request stream is bounded (``max_msgs``, ``max_bytes``, discard new): a job that does not fit
is refused when it is submitted, never dropped later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from broker_client import ACK_WAIT, WORKERS_CONSUMER, BatchNames, NotFound, Overloaded, Unavailable
from broker_client.runtime import NATSConnection

__all__ = ["BatchLimits", "BatchStore"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """What one job, and one model's queue of requests, may hold."""

    # OpenAI's limits of one job: 50,000 requests, a 200 MB input file.
    max_lines: int = 50_000
    max_input_bytes: int = 200 * 1024 * 1024
    # One model's queue of requests not yet answered, over all its jobs.
    max_queued: int = 1_000_000
    max_queued_bytes: int = 1024 * 1024 * 1024
    # How long the results streams remember a Nats-Msg-Id (a request redelivered within this is
    # stored once); the output is deduplicated by custom_id whatever the window.
    duplicate_window: float = 600.0


def _jetstream_missing(exc: BaseException) -> Unavailable:
    return Unavailable(
        f"JetStream is not available on the NATS server ({type(exc).__name__}: {exc}); batch jobs need "
        "a nats-server started with JetStream (-js, and -sd for its store)"
    )


class BatchStore:
    """The JetStream side of batch jobs for one prefix."""

    def __init__(self, nc: NATSConnection, names: BatchNames, limits: BatchLimits) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.names = names
        self.limits = limits
        self._kv: KeyValue | None = None
        self._files: ObjectStore | None = None
        self._streams: set[str] = set()

    async def check_jetstream(self) -> None:
        """A 503 naming the cause when the server has no JetStream for us."""
        try:
            await self.js.account_info()
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.Error) as exc:
            raise _jetstream_missing(exc) from exc

    async def open(self) -> None:
        """Make the bucket, the object store and the results stream (idempotent)."""
        await self.check_jetstream()
        try:
            self._kv = await self.js.create_key_value(
                bucket=self.names.jobs_bucket, history=1, storage=api.StorageType.FILE
            )
            self._files = await self.js.create_object_store(
                self.names.files_bucket, config=api.ObjectStoreConfig(storage=api.StorageType.FILE)
            )
            await self._add_stream(
                api.StreamConfig(
                    name=self.names.results_stream,
                    subjects=[self.names.results_subjects],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    duplicate_window=self.limits.duplicate_window,
                )
            )
        except nats.js.errors.Error as exc:
            raise _jetstream_missing(exc) from exc

    @property
    def opened(self) -> bool:
        return self._kv is not None

    async def _add_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # It exists with other settings (an older limit): keep it, with ours.
            if exc.err_code != 10058:
                raise
            await self.js.update_stream(config)

    # -- jobs

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise Unavailable("batch jobs are not available: JetStream was not reachable")
        return self._kv

    async def put_job(self, record: dict[str, Any]) -> None:
        await self.kv.put(record["batch"]["id"], json.dumps(record).encode())

    async def get_job(self, batch_id: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(batch_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        record: dict[str, Any] = json.loads(entry.value)
        return record

    async def job_ids(self) -> list[str]:
        """Every job's key: the subjects of the bucket's stream, in one call (``KeyValue.keys``
        walks a consumer, and missed keys put while it ran)."""
        head = f"$KV.{self.names.jobs_bucket}."
        info = await self.js.stream_info(f"KV_{self.names.jobs_bucket}", subjects_filter=f"{head}>")
        subjects = info.state.subjects or {}
        return [s.removeprefix(head) for s in subjects]

    # -- files

    @property
    def files(self) -> ObjectStore:
        if self._files is None:
            raise Unavailable("batch files are not available: JetStream was not reachable")
        return self._files

    async def put_file(self, file_id: str, data: bytes) -> None:
        await self.files.put(file_id, data)

    async def get_file(self, file_id: str, field: str = "input_file_id") -> bytes:
        try:
            result = await self.files.get(file_id)
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"{field} {file_id!r}: no such file in {self.names.files_bucket!r}") from None
        return result.data or b""

    # -- requests

    async def ensure_requests_stream(self, model_uid: str) -> str:
        """The model's work-queue stream and the workers' consumer (idempotent)."""
        name = self.names.requests_stream(model_uid)
        if name in self._streams:
            return name
        await self._add_stream(
            api.StreamConfig(
                name=name,
                subjects=[self.names.requests_subjects(model_uid)],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                max_msgs=self.limits.max_queued,
                max_bytes=self.limits.max_queued_bytes,
                discard=api.DiscardPolicy.NEW,
                duplicate_window=self.limits.duplicate_window,
            )
        )
        await self.js.add_consumer(
            name,
            api.ConsumerConfig(
                durable_name=WORKERS_CONSUMER,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=10_000,
                deliver_policy=api.DeliverPolicy.ALL,
            ),
        )
        self._streams.add(name)
        return name

    async def check_room(self, model_uid: str, count: int, size: int) -> None:
        """A 429 naming the stream and the numbers when ``count`` requests of ``size`` bytes do
        not fit the model's queue, or the account's JetStream storage."""
        name = await self.ensure_requests_stream(model_uid)
        info = await self.js.stream_info(name)
        state, config = info.state, info.config
        max_msgs = config.max_msgs if config.max_msgs and config.max_msgs > 0 else None
        max_bytes = config.max_bytes if config.max_bytes and config.max_bytes > 0 else None
        if max_msgs is not None and state.messages + count > max_msgs:
            raise Overloaded(
                f"stream {name!r} holds {state.messages} requests of model {model_uid!r} and takes at "
                f"most {max_msgs}: a job of {count} more does not fit; retry when it has drained"
            )
        if max_bytes is not None and state.bytes + size > max_bytes:
            raise Overloaded(
                f"stream {name!r} holds {state.bytes} bytes of requests of model {model_uid!r} and takes "
                f"at most {max_bytes}: a job of {size} more bytes does not fit"
            )
        account = await self.js.account_info()
        limit = account.limits.max_storage
        if limit is not None and limit > 0 and account.storage + 2 * size > limit:
            raise Overloaded(
                f"the JetStream account uses {account.storage} of its {limit} bytes of storage: a job of "
                f"{size} bytes (and its results) does not fit"
            )

    async def publish_request(self, subject: str, data: bytes, msg_id: str) -> None:
        ack = await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        if ack.stream is None:
            raise Unavailable(f"JetStream did not store the request on {subject!r}")

    async def purge_requests(self, model_uid: str, batch_id: str) -> None:
        name = self.names.requests_stream(model_uid)
        try:
            await self.js.purge_stream(name, subject=self.names.requests_subject(model_uid, batch_id))
        except nats.js.errors.NotFoundError:
            pass

    async def purge_results(self, batch_id: str) -> None:
        await self.js.purge_stream(self.names.results_stream, subject=self.names.results_subject(batch_id))
