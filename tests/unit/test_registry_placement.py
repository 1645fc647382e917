"""Replica placement (pure): GPU workers first, most free memory first, round robin."""

from __future__ import annotations

import pytest

from broker_client import DeviceInfo, NotFound, Unavailable, WorkerInfo
from registry_service.placement import Placement, place_replicas

GIB = 1 << 30


def worker(worker_id: str, *gpus: int, cpu: int = 8 * GIB) -> WorkerInfo:
    devices = [
        DeviceInfo(name=f"cuda:{i}", kind="cuda", total_memory=80 * GIB, free_memory=free)
        for i, free in enumerate(gpus)
    ]
    devices.append(DeviceInfo(name="cpu", kind="cpu", total_memory=cpu, free_memory=cpu))
    return WorkerInfo(
        worker_id=worker_id,
        host="h",
        pid=1,
        version="0",
        devices=devices,
        started_at=0,
        last_seen=0,
        heartbeat_interval=2,
    )


def test_gpu_workers_with_most_free_memory_come_first() -> None:
    # The CPU-only worker has the most memory of all, but a GPU worker is preferred.
    alive = [worker("cpu-only", cpu=500 * GIB), worker("small", 10 * GIB), worker("big", 60 * GIB)]
    assert [p.worker_id for p in place_replicas(alive, 4)] == ["big", "small", "cpu-only", "big"]


def test_fewer_workers_than_replicas_doubles_up() -> None:
    placements = place_replicas([worker("only", 10 * GIB)], 3)
    assert placements == [Placement(0, "only", None), Placement(1, "only", None), Placement(2, "only", None)]


def test_replicas_on_one_worker_spread_over_its_gpus() -> None:
    placements = place_replicas([worker("multi", 5 * GIB, 30 * GIB)], 3)
    assert [p.device for p in placements] == ["cuda:1", "cuda:0", "cuda:1"]


@pytest.mark.parametrize("n_gpu", [0, None])
def test_no_gpu_asks_for_the_cpu(n_gpu: int | None) -> None:
    alive = [worker("gpu", 60 * GIB), worker("cpu-only", cpu=500 * GIB)]
    placements = place_replicas(alive, 1, n_gpu=n_gpu)
    assert placements == [Placement(0, "cpu-only", "cpu")]


def test_pinned_worker() -> None:
    alive = [worker("a", 60 * GIB), worker("b", 1 * GIB)]
    assert [p.worker_id for p in place_replicas(alive, 2, worker_id="b")] == ["b", "b"]


def test_pinned_worker_dead_or_unknown() -> None:
    with pytest.raises(Unavailable, match="worker 'gone' is not alive"):
        place_replicas([worker("a", GIB)], 1, worker_id="gone", known=["a", "gone"])
    with pytest.raises(NotFound, match="no worker 'never'"):
        place_replicas([worker("a", GIB)], 1, worker_id="never", known=["a"])


def test_no_live_worker() -> None:
    with pytest.raises(Unavailable, match="no live worker to place 2 replica"):
        place_replicas([], 2)
