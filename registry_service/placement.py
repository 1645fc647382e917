"""Where the replicas of a launch go (pure: no I/O).

Each replica goes to a device with room: its estimated need (``memory.py``) must fit in the
free memory the worker last reported for that device, less what this registry has already
promised to replicas still loading there. Among the devices with room, in order:

1. a worker holding fewer replicas of this model (``replica=N`` spreads over workers; a
   re-placed replica counts the siblings it already has, so it goes to a worker without one
   when there is such a worker with room, and shares one only when there is not),
2. a GPU (unless ``n_gpu`` is 0 or None, Xinference's "no GPU", which asks for the CPU),
3. a device holding fewer replicas of this launch (spread over a worker's GPUs),
4. the most free memory.

So ``replica=3`` on two GPU workers puts two on the one with more room. ``worker_id`` pins
every replica to that worker. A replica that fits nowhere fails the whole launch at once with
a 503 naming its need and the most free memory seen. Workers that said they are stopping are
never chosen.

:class:`MemoryReservations` keeps what this registry has promised to replicas still loading:
their workers' heartbeats do not show that memory as taken yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from broker_client import DeviceInfo, NotFound, Unavailable, WorkerInfo

from .memory import format_bytes

__all__ = ["MemoryReservations", "Placement", "place_replicas", "worker_state"]


@dataclass(frozen=True)
class Placement:
    replica_index: int
    worker_id: str
    # None lets the worker pick its best device.
    device: str | None
    # The estimated bytes it needs, and the device they were counted against.
    need: int = field(default=0, compare=False)
    on: str = field(default="", compare=False)


class MemoryReservations:
    """Bytes promised to replicas still loading, per (worker, device): the heartbeats do not
    show them yet, and two launches must not both count on the same free memory."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str], int] = {}

    def reserve(self, placements: Iterable[Placement]) -> None:
        for p in placements:
            key = (p.worker_id, p.on)
            self._bytes[key] = self._bytes.get(key, 0) + p.need

    def release(self, placements: Iterable[Placement]) -> None:
        for p in placements:
            key = (p.worker_id, p.on)
            left = self._bytes.get(key, 0) - p.need
            if left > 0:
                self._bytes[key] = left
            else:
                self._bytes.pop(key, None)

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self._bytes)


@dataclass
class _Slot:
    """A device a replica could go to, and its free bytes as placement goes on."""

    worker_id: str
    name: str
    gpu: bool
    free: int
    # What the Placement says: None lets a worker with one GPU pick it.
    device: str | None


def _gpus(info: WorkerInfo) -> list[DeviceInfo]:
    return [d for d in info.devices if d.kind != "cpu"]


def _cpu(info: WorkerInfo) -> DeviceInfo:
    for d in info.devices:
        if d.kind == "cpu":
            return d
    return DeviceInfo(name="cpu", kind="cpu", total_memory=0, free_memory=0)


def worker_state(info: WorkerInfo) -> str:
    """``running``, ``stopping`` or ``stopped``: what the worker's last heartbeat said."""
    return info.status or "running"


def place_replicas(
    alive: Sequence[WorkerInfo],
    replica: int,
    *,
    worker_id: str | None = None,
    n_gpu: int | str | None = "auto",
    known: Sequence[str] = (),
    need: Callable[[str], int] | None = None,
    reserved: Mapping[tuple[str, str], int] | None = None,
    exclude: Iterable[str] = (),
    what: str = "",
    first_index: int = 0,
    siblings: Mapping[str, int] | None = None,
) -> list[Placement]:
    """Choose a worker (and maybe a device) for each of ``replica`` replicas.

    ``alive`` are the live workers, ``known`` every worker id ever seen (to tell a pinned
    worker that is dead from one that never existed). ``need(kind)`` is a replica's estimated
    bytes on a ``cuda`` or ``cpu`` device, ``reserved`` the bytes already promised per
    ``(worker_id, device)``, ``exclude`` workers not to use, ``what`` the model as error
    messages name it, ``siblings`` the replicas of the model already placed, per worker
    (re-placement: the replicas that were not lost). Raises ``Unavailable`` when no live worker
    can take them (or has room)
    and ``NotFound`` for a pinned worker never seen.
    """
    want_gpu = n_gpu not in (None, 0)
    skip = set(exclude)
    if worker_id is not None:
        candidates = [w for w in alive if w.worker_id == worker_id]
        if not candidates:
            if worker_id in known:
                raise Unavailable(f"worker {worker_id!r} is not alive: it stopped sending heartbeats")
            raise NotFound(f"no worker {worker_id!r} is known to the registry")
        if worker_state(candidates[0]) != "running":
            raise Unavailable(f"worker {worker_id!r} is {worker_state(candidates[0])} and takes no launches")
    else:
        candidates = [w for w in alive if w.worker_id not in skip and worker_state(w) == "running"]
    if not candidates:
        raise Unavailable(
            f"no live worker to place {replica} replica(s) on: no worker has sent a heartbeat "
            "recently (start one with `natserve worker`)"
        )

    slots: list[_Slot] = []
    for info in candidates:
        gpus = _gpus(info) if want_gpu else []
        for gpu in gpus:
            slots.append(
                _Slot(info.worker_id, gpu.name, True, gpu.free_memory, gpu.name if len(gpus) > 1 else None)
            )
        if not gpus:
            cpu = _cpu(info)
            slots.append(_Slot(info.worker_id, cpu.name, False, cpu.free_memory, None if want_gpu else "cpu"))
    for slot in slots:
        slot.free -= (reserved or {}).get((slot.worker_id, slot.name), 0)

    def need_on(slot: _Slot) -> int:
        return need("cuda" if slot.gpu else "cpu") if need is not None else 0

    placements: list[Placement] = []
    per_worker: dict[str, int] = dict(siblings or {})
    per_device: dict[tuple[str, str], int] = {}
    for index in range(first_index, first_index + replica):
        fitting = [s for s in slots if s.free >= need_on(s)]
        if not fitting:
            best = max(slots, key=lambda s: s.free)
            which = f"replica {index} of {what}" if what else f"replica {index}"
            raise Unavailable(
                f"no live worker has room for {which}: it needs about {format_bytes(need_on(best))} "
                f"on {'a GPU' if best.gpu else 'the CPU'}; the most free memory seen is "
                f"{format_bytes(max(best.free, 0))} ({best.name} of worker {best.worker_id!r})"
            )
        chosen = max(
            fitting,
            key=lambda s: (
                -per_worker.get(s.worker_id, 0),
                s.gpu,
                -per_device.get((s.worker_id, s.name), 0),
                s.free,
                s.worker_id,
            ),
        )
        cost = need_on(chosen)
        chosen.free -= cost
        per_worker[chosen.worker_id] = per_worker.get(chosen.worker_id, 0) + 1
        key = (chosen.worker_id, chosen.name)
        per_device[key] = per_device.get(key, 0) + 1
        placements.append(Placement(index, chosen.worker_id, chosen.device, need=cost, on=chosen.name))
    return placements
