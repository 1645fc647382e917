"""Batch jobs: submit, follow the results, write the output, cancel, resume after a restart.

A job's life (OpenAI's statuses):

1. ``create`` checks every line (400 naming the line and field), checks that JetStream is there
   and that the requests fit the model's stream (503 / 429 otherwise), stores the input as a file,
   records the job as ``validating`` and publishes each request on its model's work-queue stream
   with the ``Nats-Msg-Id`` ``<batch id>:<custom id>``. Then the job is ``in_progress``. A
   publish that fails takes back what was published (the job's subjects are purged) and marks the
   job ``failed``: nothing is half-queued.
2. A tracker per job reads the job's results (``<prefix>.batches.results.<batch id>``) from the
   results stream, counts each custom_id once, appends its line to the output (or error) file it
   builds, and publishes progress on ``<prefix>.events.batches.<batch id>``.
3. When every custom_id has its line, the job is ``finalizing``: the files go to the object
   store, then ``completed``, and its results are purged from the stream.

A restarted registry resumes every job not finished from its record: ``validating`` ones publish
their requests again (JetStream drops the copies it already has), the others replay their
results from the stream's start. ``cancel`` purges the requests not yet taken
(``cancelling``); the tracker waits for the ones running and writes what was answered
(``cancelled``). A job not done 24 hours after its creation is ``expired`` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from broker_client import (
    ACK_WAIT,
    BadRequest,
    BatchCreateRequest,
    BatchItem,
    BatchNames,
    NotFound,
    ServiceError,
    Unavailable,
    new_batch_id,
    new_file_id,
    parse_batch_lines,
    parse_jsonl,
)
from broker_client.runtime import NATSConnection

from .store import BatchLimits, BatchStore

__all__ = ["FINISHED", "BatchJobs"]

logger = logging.getLogger(__name__)

FINISHED = ("completed", "failed", "cancelled", "expired")
_WINDOW = 24 * 3600
# Progress events and the record's counts go out at most this often (and at each change of
# status): a 1,000-request job on the tiny model gives ~20 events a second, not 1,000.
_PROGRESS_EVERY = 0.5
# A cancelled or expired job is written once no result has come for this long: a request a
# worker had taken before the purge is answered within it unless it is a long one, whose line
# then comes too late and is left out (the purge took it off the stream: it is not redone).
_QUIET = ACK_WAIT
# Requests published at once when a job is queued (each waits for its PubAck).
_PUBLISH_WINDOW = 256


def _public(record: dict[str, Any]) -> dict[str, Any]:
    batch = dict(record["batch"])
    if batch["status"] == "expiring":
        batch["status"] = "in_progress"  # not an OpenAI status: its files are being written
    return batch


class _Tracker:
    """Follows one job's results until the job is finished."""

    def __init__(self, jobs: BatchJobs, batch_id: str) -> None:
        self.jobs = jobs
        self.batch_id = batch_id
        self.seen: set[str] = set()
        self.failed = 0
        self.last_seq = 0
        self.last_result = time.monotonic()
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"natserve-batch {batch_id}")

    def counts(self, total: int) -> dict[str, int]:
        return {"total": total, "completed": len(self.seen) - self.failed, "failed": self.failed}

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("tracking batch %s failed", self.batch_id)
        finally:
            self.out.close()
            self.err.close()
            self.jobs._trackers.pop(self.batch_id, None)

    async def _follow(self) -> None:
        self.sub: Any = None
        try:
            await self._follow_results()
        finally:
            # A subscription left with messages in its queue would hold up the connection's drain.
            if self.sub is not None:
                with contextlib.suppress(Exception):
                    await self.sub.unsubscribe()

    async def _follow_results(self) -> None:
        jobs, store = self.jobs, self.jobs.store
        published = 0.0
        while True:
            sub = self.sub
            record = await self.jobs._record(self.batch_id)
            if record is None:
                return
            batch = record["batch"]
            total = batch["request_counts"]["total"]
            status = batch["status"]
            if status in FINISHED:
                return
            if len(self.seen) >= total:
                await jobs._finish(record, self, "completed")
                return
            now = time.time()
            if status == "in_progress" and now > batch["expires_at"]:
                await jobs._stop_requests(record, "expired")
                continue
            if status in ("cancelling", "expiring") and time.monotonic() - self.last_result > _QUIET:
                await jobs._finish(record, self, "cancelled" if status == "cancelling" else "expired")
                return
            try:
                if sub is None:
                    sub = await store.js.pull_subscribe(
                        store.names.results_subject(self.batch_id),
                        stream=store.names.results_stream,
                        config=api.ConsumerConfig(
                            ack_policy=api.AckPolicy.NONE,
                            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=self.last_seq + 1,
                            inactive_threshold=60.0,
                        ),
                    )
                    self.sub = sub
                # No more than the results still missing: a fetch for more lingers to its
                # timeout once the last one is in, and that 0.25 s was 9% of a 128-request job
                # on the tiny model (bench/batch.py: 1,550 tokens/s against 1,695 online).
                # Duplicates (a request answered twice) only make a fetch end sooner.
                wanted = max(1, min(512, total - len(self.seen)))
                msgs = await sub.fetch(wanted, timeout=0.25)
            except (nats.errors.TimeoutError, TimeoutError):
                msgs = []
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The server restarting, or the consumer gone with it: bind again, from where we were.
                logger.debug("batch %s: reading results failed: %r", self.batch_id, exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self.sub = None
                await asyncio.sleep(0.5)  # a retry timer, not a barrier
                continue
            for msg in msgs:
                self._take(msg)
            # At most every _PROGRESS_EVERY: the results of a job on two slots come one at a time,
            # and a record write and an event for each were 129 KV writes in a 128-request job
            # (bench/batch.py --timeline), the job's largest cost beside the online path's.
            if time.monotonic() - published > _PROGRESS_EVERY:
                if len(self.seen) != batch["request_counts"]["completed"] + batch["request_counts"]["failed"]:
                    published = time.monotonic()
                    await jobs._progress(record, self)

    def _take(self, msg: Any) -> None:
        self.last_seq = max(self.last_seq, msg.metadata.sequence.stream)
        try:
            result = json.loads(msg.data)
            custom_id = result["custom_id"]
            line = result["output"]
        except (ValueError, KeyError, TypeError):
            logger.warning("batch %s: ignoring a malformed result", self.batch_id)
            return
        if custom_id in self.seen:
            return  # a second answer (redelivered after its first was stored): the first stands
        self.seen.add(custom_id)
        self.last_result = time.monotonic()
        data = (json.dumps(line) + "\n").encode()
        self.out.write(data)
        if result.get("failed"):
            self.failed += 1
            self.err.write(data)

    def contents(self) -> tuple[bytes, bytes]:
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read(), self.err.read()
        self.out.seek(0, os.SEEK_END)
        self.err.seek(0, os.SEEK_END)
        return out, err


class BatchJobs:
    """The batch jobs of one prefix: the operations behind ``batches.*``."""

    def __init__(
        self,
        nc: NATSConnection,
        prefix: str,
        *,
        model_exists: Callable[[str], Awaitable[bool]],
        limits: BatchLimits | None = None,
    ) -> None:
        self.nc = nc
        self.names = BatchNames(prefix)
        self.store = BatchStore(nc, self.names, limits or BatchLimits())
        self.limits = self.store.limits
        self.model_exists = model_exists
        self._trackers: dict[str, _Tracker] = {}
        self._cache: dict[str, dict[str, Any]] = {}
        self._resume_task: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Open the JetStream side and resume the jobs not finished; without JetStream the
        registry still serves, and ``batches.*`` answer 503 until it is there."""
        self._resume_task = asyncio.create_task(self._open_and_resume(), name="natserve-batches resume")

    async def _open_and_resume(self) -> None:
        try:
            await self.store.open()
        except ServiceError as exc:
            logger.info("batch jobs off for now: %s", exc.message)
            return
        for batch_id in await self.store.job_ids():
            record = await self.store.get_job(batch_id)
            if record is None or record["batch"]["status"] in FINISHED:
                continue
            logger.info("resuming batch %s (%s)", batch_id, record["batch"]["status"])
            if record["batch"]["status"] == "validating":
                try:
                    await self._queue(record, await self._items_of(record))
                except ServiceError as exc:
                    await self._fail(record, exc.message)
                    continue
            self._track(batch_id)

    async def stop(self) -> None:
        tasks = [t.task for t in self._trackers.values()]
        if self._resume_task is not None:
            tasks.append(self._resume_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._trackers.clear()

    async def _ready(self) -> BatchStore:
        if not self.store.opened:
            await self.store.open()
        return self.store

    # -- records

    async def _record(self, batch_id: str) -> dict[str, Any] | None:
        record = self._cache.get(batch_id)
        if record is None:
            record = await self.store.get_job(batch_id)
            if record is not None:
                self._cache[batch_id] = record
        return record

    async def _save(self, record: dict[str, Any]) -> None:
        self._cache[record["batch"]["id"]] = record
        await self.store.put_job(record)
        await self._event(record)

    async def _event(self, record: dict[str, Any]) -> None:
        batch = record["batch"]
        event = {
            "id": batch["id"],
            "status": batch["status"],
            "request_counts": batch["request_counts"],
            "ts": time.time(),
        }
        with contextlib.suppress(Exception):
            await self.nc.publish(self.names.events(batch["id"]), json.dumps(event).encode())

    def _track(self, batch_id: str) -> None:
        if batch_id not in self._trackers:
            self._trackers[batch_id] = _Tracker(self, batch_id)

    # -- create

    async def create(self, req: BatchCreateRequest) -> dict[str, Any]:
        store = await self._ready()
        if (req.input_file_id is None) == (req.requests is None):
            raise BadRequest("give the batch's requests as exactly one of input_file_id or requests")
        if req.input_file_id is not None:
            data = await store.get_file(req.input_file_id)
            input_file_id = req.input_file_id
        elif isinstance(req.requests, str):
            data = req.requests.encode()
            input_file_id = new_file_id()
        else:
            assert req.requests is not None
            data = "".join(json.dumps(line) + "\n" for line in req.requests).encode()
            input_file_id = new_file_id()
        if len(data) > self.limits.max_input_bytes:
            raise BadRequest(f"the batch input is {len(data)} bytes; at most {self.limits.max_input_bytes}")
        items = parse_batch_lines(
            parse_jsonl(data), endpoint=req.endpoint, model=req.model, max_lines=self.limits.max_lines
        )
        per_model: dict[str, list[BatchItem]] = {}
        for item in items:
            per_model.setdefault(item.model, []).append(item)
        for uid in per_model:
            if not await self.model_exists(uid):
                raise NotFound(f"model {uid!r} is not running: launch it before submitting a batch for it")
        for uid, its in per_model.items():
            size = sum(len(json.dumps(i.request)) + 200 for i in its)
            await store.check_room(uid, len(its), size)
        if req.input_file_id is None:
            await store.put_file(input_file_id, data)
        now = int(time.time())
        batch_id = new_batch_id()
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": req.endpoint or items[0].url,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": req.completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + _WINDOW,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(items), "completed": 0, "failed": 0},
            "metadata": req.metadata,
        }
        record: dict[str, Any] = {"batch": batch, "models": sorted(per_model), "default_model": req.model}
        await self._save(record)
        try:
            await self._queue(record, items)
        except ServiceError as exc:
            await self._fail(record, exc.message)
            raise
        self._track(batch_id)
        logger.info("batch %s: %d requests queued for %s", batch_id, len(items), ", ".join(per_model))
        return _public(record)

    async def _items_of(self, record: dict[str, Any]) -> list[BatchItem]:
        data = await self.store.get_file(record["batch"]["input_file_id"])
        endpoint = record["batch"]["endpoint"]
        return parse_batch_lines(
            parse_jsonl(data), endpoint=endpoint, model=record.get("default_model"), max_lines=10**9
        )

    async def _queue(self, record: dict[str, Any], items: list[BatchItem]) -> None:
        batch_id = record["batch"]["id"]
        store = self.store
        sem = asyncio.Semaphore(_PUBLISH_WINDOW)

        async def one(item: BatchItem) -> None:
            async with sem:
                await store.publish_request(
                    self.names.requests_subject(item.model, batch_id),
                    json.dumps(item.message(batch_id)).encode(),
                    self.names.msg_id(batch_id, item.custom_id),
                )

        results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for uid in record["models"]:
                with contextlib.suppress(Exception):
                    await store.purge_requests(uid, batch_id)
            first = errors[0]
            raise Unavailable(
                f"JetStream refused {len(errors)} of the {len(items)} requests of batch {batch_id} "
                f"({type(first).__name__}: {first}); nothing of it is queued"
            )
        record["batch"]["status"] = "in_progress"
        record["batch"]["in_progress_at"] = int(time.time())
        await self._save(record)

    async def _fail(self, record: dict[str, Any], message: str) -> None:
        batch = record["batch"]
        batch["status"] = "failed"
        batch["failed_at"] = int(time.time())
        batch["errors"] = {"object": "list", "data": [{"code": "queue_failed", "message": message}]}
        with contextlib.suppress(Exception):
            await self._save(record)

    # -- progress and the end

    async def _progress(self, record: dict[str, Any], tracker: _Tracker) -> None:
        batch = record["batch"]
        batch["request_counts"] = tracker.counts(batch["request_counts"]["total"])
        await self._save(record)

    async def _finish(self, record: dict[str, Any], tracker: _Tracker, status: str) -> None:
        batch = record["batch"]
        batch_id = batch["id"]
        batch["request_counts"] = tracker.counts(batch["request_counts"]["total"])
        if status == "completed":
            batch["status"] = "finalizing"
            batch["finalizing_at"] = int(time.time())
            await self._save(record)
        out, err = tracker.contents()
        hexpart = batch_id.removeprefix("batch_")
        if out:
            batch["output_file_id"] = f"file-{hexpart}-output"
            await self.store.put_file(batch["output_file_id"], out)
        if err:
            batch["error_file_id"] = f"file-{hexpart}-errors"
            await self.store.put_file(batch["error_file_id"], err)
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        await self._save(record)
        with contextlib.suppress(Exception):
            await self.store.purge_results(batch_id)
        logger.info("batch %s %s: %s", batch_id, status, batch["request_counts"])

    async def _stop_requests(self, record: dict[str, Any], why: str) -> None:
        """Purge the requests not taken yet; the tracker writes the rest once quiet."""
        batch = record["batch"]
        for uid in record["models"]:
            await self.store.purge_requests(uid, batch["id"])
        now = int(time.time())
        if why == "expired":
            batch["status"] = "expiring"
        else:
            batch["status"] = "cancelling"
            batch["cancelling_at"] = now
        await self._save(record)

    # -- the other operations

    async def get(self, batch_id: str) -> dict[str, Any]:
        await self._ready()
        record = await self.store.get_job(batch_id)
        if record is None:
            raise NotFound(f"batch {batch_id!r} does not exist")
        tracker = self._trackers.get(batch_id)
        batch = _public(record)
        if tracker is not None and batch["status"] not in FINISHED:
            batch["request_counts"] = tracker.counts(batch["request_counts"]["total"])
        return batch

    async def list(self, limit: int, after: str | None) -> dict[str, Any]:
        store = await self._ready()
        records = [r for r in [await store.get_job(i) for i in await store.job_ids()] if r is not None]
        batches = sorted((_public(r) for r in records), key=lambda b: (-b["created_at"], b["id"]))
        if after is not None:
            ids = [b["id"] for b in batches]
            if after not in ids:
                raise NotFound(f"after {after!r}: no such batch")
            batches = batches[ids.index(after) + 1 :]
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        await self._ready()
        # The cached record when there is one: the tracker saves that same object.
        record = await self._record(batch_id)
        if record is None:
            raise NotFound(f"batch {batch_id!r} does not exist")
        status = record["batch"]["status"]
        if status in ("validating", "in_progress"):
            await self._stop_requests(record, "cancelled")
            self._track(batch_id)
        return await self.get(batch_id)

    async def file_content(self, file_id: str) -> bytes:
        store = await self._ready()
        return await store.get_file(file_id, "file_id")

    async def put_file(self, data: bytes) -> str:
        store = await self._ready()
        if len(data) > self.limits.max_input_bytes:
            raise BadRequest(f"the file is {len(data)} bytes; at most {self.limits.max_input_bytes}")
        file_id = new_file_id()
        await store.put_file(file_id, data)
        return file_id
