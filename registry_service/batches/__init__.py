"""Batch jobs on JetStream: the registry's side (OpenAI's Batch API over ``batches.*``).

    store.py       the JetStream side: job records (key-value), files (object store), streams
    service.py     create, track, finalize, cancel, resume (``BatchJobs``)
    endpoints.py   the ``batches.*`` endpoints

The workers' side is ``workers/batches.py``; the shapes and names are ``broker_client``'s.
"""

from .endpoints import BatchEndpoints
from .service import FINISHED, BatchJobs
from .store import BatchLimits, BatchStore

__all__ = ["FINISHED", "BatchEndpoints", "BatchJobs", "BatchLimits", "BatchStore"]
