"""Where the replicas of a launch go (pure: no I/O).

Workers with a GPU come first, then the most free memory; replicas are dealt out round robin
over that order, so ``replica=3`` on two workers puts two on the best one. On a worker with
several GPUs its replicas are spread over its devices, again the freest first. ``n_gpu=0`` or
``None`` (Xinference's "no GPU") asks for the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker_client._errors import NotFound, Unavailable
from broker_client._messages import DeviceInfo, WorkerInfo

__all__ = ["Placement", "place_replicas"]


@dataclass(frozen=True)
class Placement:
    replica_index: int
    worker_id: str
    # None lets the worker pick its best device.
    device: str | None


def _gpus(info: WorkerInfo) -> list[DeviceInfo]:
    return sorted((d for d in info.devices if d.kind != "cpu"), key=lambda d: d.free_memory, reverse=True)


def _rank(info: WorkerInfo, want_gpu: bool) -> tuple[bool, int]:
    gpus = _gpus(info)
    if want_gpu and gpus:
        return True, gpus[0].free_memory
    return False, max((d.free_memory for d in info.devices), default=0)


def place_replicas(
    alive: Sequence[WorkerInfo],
    replica: int,
    *,
    worker_id: str | None = None,
    n_gpu: int | str | None = "auto",
    known: Sequence[str] = (),
) -> list[Placement]:
    """Choose a worker (and maybe a device) for each of ``replica`` replicas.

    ``alive`` are the live workers, ``known`` every worker id ever seen (to tell a pinned
    worker that is dead from one that never existed). Raises ``Unavailable`` when no live
    worker can take them and ``NotFound`` for a pinned worker never seen.
    """
    want_gpu = n_gpu not in (None, 0)
    if worker_id is not None:
        candidates = [w for w in alive if w.worker_id == worker_id]
        if not candidates:
            if worker_id in known:
                raise Unavailable(f"worker {worker_id!r} is not alive: it stopped sending heartbeats")
            raise NotFound(f"no worker {worker_id!r} is known to the registry")
    else:
        candidates = sorted(alive, key=lambda w: (*_rank(w, want_gpu), w.worker_id), reverse=True)
    if not candidates:
        raise Unavailable(
            f"no live worker to place {replica} replica(s) on: no worker has sent a heartbeat "
            "recently (start one with `natserve worker`)"
        )

    placements: list[Placement] = []
    per_worker: dict[str, int] = {}
    for index in range(replica):
        info = candidates[index % len(candidates)]
        nth = per_worker.get(info.worker_id, 0)
        per_worker[info.worker_id] = nth + 1
        device: str | None = None
        if not want_gpu:
            device = "cpu"
        else:
            gpus = _gpus(info)
            if len(gpus) > 1:
                device = gpus[nth % len(gpus)].name
        placements.append(Placement(index, info.worker_id, device))
    return placements
