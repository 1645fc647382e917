"""The replicas of one model uid on this worker, and which of them takes a request.

A :class:`ServedModel` is what the worker serves of one uid: its local replicas by index, the
choice of the least busy ready one for a request, the lookup of a request to cancel, and the
uid's endpoints (:class:`workers.endpoints.ModelEndpoints`), open while it has a replica.
"""

from __future__ import annotations

from typing import Protocol

from broker_client import Unavailable

from .replicas import Replica

__all__ = ["ServedModel", "UidEndpoints"]


class UidEndpoints(Protocol):
    """The subjects of one uid, as the served model opens and closes them."""

    async def open(self) -> None: ...

    async def stop_accepting(self) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


class ServedModel:
    """The replicas of one model uid on this worker, and the uid's endpoints."""

    def __init__(self, model_uid: str, worker_id: str) -> None:
        self.model_uid = model_uid
        self.worker_id = worker_id
        self.replicas: dict[int, Replica] = {}
        # Set by whoever serves the uid (the worker), before the first replica is added.
        self.endpoints: UidEndpoints | None = None
        # Requests passed on to other replicas because these were saturated.
        self.passed_on = 0

    async def add(self, replica: Replica) -> None:
        """Serve ``replica``: the uid's endpoints first, then (without an await in between the
        replica's registration and the caller's bookkeeping) the replica itself."""
        if self.endpoints is not None:
            await self.endpoints.open()
        self.replicas[replica.replica_index] = replica

    async def stop_accepting(self) -> None:
        """Take no new requests; cancels still reach the requests that are draining."""
        if self.endpoints is not None:
            await self.endpoints.stop_accepting()

    async def drain(self) -> None:
        """Take no new requests, but serve the ones already routed to this worker."""
        if self.endpoints is not None:
            await self.endpoints.drain()

    async def close_endpoints(self) -> None:
        if self.endpoints is not None:
            await self.endpoints.close()

    async def remove(self, replica_index: int, reason: str, *, grace: float = 5.0) -> Replica | None:
        """Stop one replica; the uid's endpoints go with the last one."""
        replica = self.replicas.pop(replica_index, None)
        if not self.replicas:
            await self.close_endpoints()
        if replica is not None:
            await replica.close(reason, grace=grace)
        return replica

    def pick(self, ability: str) -> Replica:
        """The ready replica with the lowest load for ``ability``; 429 when it is at its limit,
        400 for an ability the model lacks, 503 when no replica is ready."""
        if len(self.replicas) == 1:
            (only,) = self.replicas.values()
            if only.accepting and ability in only.abilities:
                only.check_capacity()
                return only
        replicas = list(self.replicas.values())
        if not replicas:
            raise Unavailable(f"model {self.model_uid!r} has no replica on worker {self.worker_id!r}")
        if ability not in replicas[0].abilities:
            raise replicas[0].wrong_ability(ability)
        ready = [r for r in replicas if r.accepting]
        if not ready:
            raise Unavailable(f"model {self.model_uid!r} has no ready replica on worker {self.worker_id!r}")
        best = min(ready, key=lambda r: r.load / r.request_limits)
        best.check_capacity()
        return best

    def cancel(self, request_id: str) -> Replica | None:
        """End the request ``request_id`` if one of these replicas holds it; the one that did."""
        reason = f"request {request_id!r} on model {self.model_uid!r} was cancelled"
        for replica in list(self.replicas.values()):
            if replica.cancel(request_id, reason):
                return replica
        return None
