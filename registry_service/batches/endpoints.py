"""The ``batches.*`` endpoints: decode the request, call :class:`BatchJobs`, write the reply.

batches.create   OpenAI's batch body (``input_file_id``, ``endpoint``, ``completion_window``,
                 ``metadata``) or natserve's inline ``requests``; ``model`` for lines naming
                 none -> the batch object
batches.get      ``{batch_id}`` -> the batch object
batches.list     ``{limit?, after?}`` -> ``{object: "list", data, first_id, last_id, has_more}``
batches.cancel   ``{batch_id}`` -> the batch object (``cancelling``, then ``cancelled``)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from broker_client import (
    BatchCancelRequest,
    BatchCreateRequest,
    BatchGetRequest,
    BatchListRequest,
    Subjects,
)
from broker_client.runtime import Responder

from .service import BatchJobs

__all__ = ["BatchEndpoints"]

Handler = Callable[[Responder], Awaitable[None]]


class BatchEndpoints:
    def __init__(self, jobs: BatchJobs) -> None:
        self.jobs = jobs

    def routes(self, subjects: Subjects) -> list[tuple[str, str, Handler]]:
        return [
            ("batches_create", subjects.batches_create, self.create),
            ("batches_get", subjects.batches_get, self.get),
            ("batches_list", subjects.batches_list, self.list),
            ("batches_cancel", subjects.batches_cancel, self.cancel),
        ]

    async def create(self, resp: Responder) -> None:
        await resp.respond(await self.jobs.create(resp.parse(BatchCreateRequest)))

    async def get(self, resp: Responder) -> None:
        await resp.respond(await self.jobs.get(resp.parse(BatchGetRequest).batch_id))

    async def list(self, resp: Responder) -> None:
        req = resp.parse(BatchListRequest)
        await resp.respond(await self.jobs.list(req.limit, req.after))

    async def cancel(self, resp: Responder) -> None:
        await resp.respond(await self.jobs.cancel(resp.parse(BatchCancelRequest).batch_id))
