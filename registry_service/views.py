"""What the registry's replies show of its rows and workers (pure: no I/O).

    registration_summary    one entry of ``registry.list``
    registration_view       the ``registry.get`` reply: the definition, with its type and persist
    model_description       ``models.describe``, and each entry of ``models.list``
    replica_view            one replica of a description
    worker_view             one entry of ``workers.list``: the last heartbeat, alive, dead window, state

Shapes follow Xinference where it has them; times are Unix seconds.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from .directory import WorkerDirectory, WorkerEntry
from .models import ModelRow, Registration, ReplicaRow

__all__ = [
    "model_description",
    "registration_summary",
    "registration_view",
    "replica_view",
    "worker_view",
]


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def registration_summary(row: Registration) -> dict[str, Any]:
    d = row.definition
    summary: dict[str, Any] = {
        "model_type": row.model_type,
        "model_name": row.model_name,
        "persist": row.persist,
        "is_builtin": False,
        "model_ability": d.get("model_ability", []),
        "model_description": d.get("model_description"),
        "model_lang": d.get("model_lang") or d.get("language"),
        "created_at": _ts(row.created_at),
    }
    if "context_length" in d:
        summary["context_length"] = d["context_length"]
    return summary


def registration_view(row: Registration) -> dict[str, Any]:
    return {**row.definition, "model_type": row.model_type, "persist": row.persist, "is_builtin": False}


def replica_view(r: ReplicaRow) -> dict[str, Any]:
    return {
        "replica_index": r.replica_index,
        "worker_id": r.worker_id,
        "device": r.device,
        "status": r.status,
        "memory_bytes": r.memory_bytes,
        "error": r.error,
    }


def model_description(
    row: ModelRow, directory: WorkerDirectory, scale_state: tuple[str, int] | None = None
) -> dict[str, Any]:
    """A running model, its replicas and whether their workers are alive now.

    A model that scales also shows ``min_replicas``, ``idle_timeout``, ``state``
    (``running``, ``scaled_to_zero``, ``backing_off``, ``starting``, ``stopping``) and
    ``held_requests``, from
    ``scale_state`` (the on-demand part's ``(state, held)`` while it answers the model's
    subjects), and each replica the ``idle_for`` of its worker's last heartbeat."""
    d, spec = row.definition, row.spec
    now = time.monotonic()
    workers = []
    for worker_id in sorted({r.worker_id for r in row.replicas}):
        entry = directory.get(worker_id)
        workers.append(
            {
                "worker_id": worker_id,
                "host": entry.info.host if entry else None,
                "alive": entry is not None and directory.is_alive(entry, now),
            }
        )
    description: dict[str, Any] = {
        "model_uid": row.model_uid,
        "model_name": row.model_name,
        "model_type": row.model_type,
        "model_ability": d.get("model_ability", []),
        "model_description": d.get("model_description"),
        "model_lang": d.get("model_lang") or d.get("language"),
        "model_format": spec.get("model_format"),
        "model_size_in_billions": spec.get("model_size_in_billions"),
        "model_id": spec.get("model_id"),
        "model_uri": spec.get("model_uri"),
        "quantization": row.quantization,
        "replica": row.replica,
        "status": row.status,
        "error": row.error,
        "request_limits": row.request_limits,
        "max_batch_size": row.max_batch_size,
        "context_length": d.get("context_length", d.get("max_tokens")),
        "replicas": [replica_view(r) for r in row.replicas],
        "workers": workers,
        "created_at": _ts(row.created_at),
        "updated_at": _ts(row.updated_at),
    }
    if row.idle_timeout is not None:
        description["min_replicas"] = row.min_replicas
        description["idle_timeout"] = row.idle_timeout
        if scale_state is not None:
            description["state"], description["held_requests"] = scale_state
        else:
            description["state"] = "running" if row.replicas else "scaled_to_zero"
            description["held_requests"] = 0
        idle = {
            (r.model_uid, r.replica_index, e.info.worker_id): r.idle_for
            for e in directory.entries()
            for r in e.info.replicas
            if r.model_uid == row.model_uid
        }
        for view, r in zip(description["replicas"], row.replicas, strict=True):
            view["idle_for"] = idle.get((row.model_uid, r.replica_index, r.worker_id))
    if row.model_type == "embedding":
        description["dimensions"] = d.get("dimensions")
        description["max_tokens"] = d.get("max_tokens")
    return description


def worker_view(entry: WorkerEntry, directory: WorkerDirectory, now: float) -> dict[str, Any]:
    view = entry.info.model_dump(mode="json")
    view["last_seen"] = entry.seen_at
    view["alive"] = directory.is_alive(entry, now)
    view["dead_after"] = directory.window(entry.info)
    view["state"] = directory.state_of(entry.info.worker_id, now)
    return view
