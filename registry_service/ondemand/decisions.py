"""Which idle replicas stop, and which are evicted to make room for a launch (pure: no I/O).

* **Idle stops** (:func:`idle_stops`). A replica of a model launched with an idle timeout that
  has had no request for that long is stopped, the most idle first, down to the model's
  ``min_replicas``. How long a replica has been idle comes from its worker's last heartbeat
  (``ReplicaInfo.idle_for``) plus the time since that heartbeat came (:func:`idle_replicas`),
  which never overstates it: the worker checks again when told (``if_idle_for``).
* **Eviction** (:func:`choose_evictions`). When a launch does not fit, the idle replicas of
  such models beyond their ``min_replicas`` are candidates, least recently used (most idle)
  first. They are added one at a time, each counting its memory as free on its device, until
  the launch's placement fits; of those, only the ones on the devices the placement uses are
  evicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from broker_client import NotFound, Unavailable, WorkerInfo

from ..models import ModelRow
from ..placement import Placement

__all__ = ["IdleReplica", "choose_evictions", "eviction_candidates", "idle_replicas", "idle_stops"]


@dataclass(frozen=True)
class IdleReplica:
    """A ready replica as its worker reports it, and how long it has been idle."""

    model_uid: str
    replica_index: int
    worker_id: str
    device: str
    idle_for: float
    memory_bytes: int


def idle_replicas(
    reports: Iterable[tuple[WorkerInfo, float]], now: float
) -> dict[tuple[str, int], IdleReplica]:
    """``(uid, replica_index) -> IdleReplica`` of the ready replicas the live workers report
    idle; ``reports`` are each worker's last heartbeat with the (monotonic) time it came."""
    out: dict[tuple[str, int], IdleReplica] = {}
    for info, received in reports:
        for r in info.replicas:
            if r.status != "ready" or r.idle_for is None or r.idle_for <= 0 or r.active or r.waiting:
                continue
            out[(r.model_uid, r.replica_index)] = IdleReplica(
                r.model_uid,
                r.replica_index,
                info.worker_id,
                r.device,
                r.idle_for + max(0.0, now - received),
                r.memory_bytes,
            )
    return out


def _spare(row: ModelRow, idle: Mapping[tuple[str, int], IdleReplica]) -> list[IdleReplica]:
    """The idle replicas of ``row`` that may stop (those beyond its min_replicas), most idle first."""
    if row.idle_timeout is None or row.status != "ready":
        return []
    # Replicas that failed are not running: they do not count towards the minimum.
    running = [r for r in row.replicas if r.status != "failed"]
    spare = len(running) - (row.min_replicas or 0)
    if spare <= 0:
        return []
    found = [
        idle[(row.model_uid, r.replica_index)]
        for r in running
        if (row.model_uid, r.replica_index) in idle
        and idle[(row.model_uid, r.replica_index)].worker_id == r.worker_id
    ]
    found.sort(key=lambda x: (-x.idle_for, x.replica_index))
    return found[:spare]


def idle_stops(rows: Iterable[ModelRow], idle: Mapping[tuple[str, int], IdleReplica]) -> list[IdleReplica]:
    """The replicas idle past their model's idle timeout that stop now, most idle first."""
    out: list[IdleReplica] = []
    for row in rows:
        timeout = row.idle_timeout
        if timeout is None:
            continue
        out.extend(x for x in _spare(row, idle) if x.idle_for >= timeout)
    out.sort(key=lambda x: -x.idle_for)
    return out


def eviction_candidates(
    rows: Iterable[ModelRow],
    idle: Mapping[tuple[str, int], IdleReplica],
    *,
    exclude: Iterable[str] = (),
) -> list[IdleReplica]:
    """The idle on-demand replicas a launch may evict, least recently used first; none of the
    models in ``exclude`` (the one launching, the ones being started or stopped)."""
    skip = set(exclude)
    out = [x for row in rows if row.model_uid not in skip for x in _spare(row, idle)]
    out.sort(key=lambda x: (-x.idle_for, x.model_uid, x.replica_index))
    return out


Credit = Mapping[tuple[str, str], int]


def _credit(victims: Sequence[IdleReplica]) -> dict[tuple[str, str], int]:
    # Negative reservations: the memory the victims would give back, per (worker, device).
    out: dict[tuple[str, str], int] = {}
    for v in victims:
        key = (v.worker_id, v.device)
        out[key] = out.get(key, 0) - v.memory_bytes
    return out


def choose_evictions(
    place: Callable[[Credit], list[Placement]], candidates: Sequence[IdleReplica]
) -> tuple[list[Placement], list[IdleReplica]] | None:
    """The fewest least-recently-used candidates whose memory makes ``place`` succeed.

    ``place(credit)`` places the launch with ``credit`` (bytes per (worker, device), negative:
    memory given back) added to the memory reserved, raising ``Unavailable`` or ``NotFound``
    when it does not fit. Returns the placement and the replicas to evict, or None when even
    evicting every candidate is not enough."""
    chosen: list[IdleReplica] = []
    for candidate in candidates:
        if candidate.memory_bytes <= 0:
            continue  # gives nothing back
        chosen.append(candidate)
        try:
            placements = place(_credit(chosen))
        except (Unavailable, NotFound):
            continue
        used = {(p.worker_id, p.on) for p in placements}
        needed = [v for v in chosen if (v.worker_id, v.device) in used]
        if len(needed) < len(chosen):
            try:
                return place(_credit(needed)), needed
            except (Unavailable, NotFound):
                pass
        return placements, chosen
    return None
