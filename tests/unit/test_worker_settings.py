"""WorkerSettings without a server: its checks, and the one built for natserve up and natserve worker."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from broker_client import BadRequest, NatsAuth
from natserve.embedded import worker_limits, worker_settings
from natserve.settings import Settings
from workers import Worker, WorkerSettings
from workers.limits import WorkerLimits


def test_the_library_defaults() -> None:
    settings = WorkerSettings("nats://127.0.0.1:1")
    assert (settings.prefix, settings.worker_id, settings.device) == ("natserve", None, None)
    assert (settings.heartbeat_interval, settings.drain_timeout, settings.warm_up) == (2.0, 30.0, False)
    # The library confines nothing by default; natserve up and natserve worker always do.
    assert settings.limits == WorkerLimits() and settings.limits.model_roots is None
    assert settings.auth is None and settings.metrics_registry is None and settings.cache_dir is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.device = "cpu"  # type: ignore[misc]


def test_bad_values_are_refused_when_built() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval must be positive, got 0"):
        WorkerSettings("nats://127.0.0.1:1", heartbeat_interval=0)
    with pytest.raises(BadRequest, match=r"worker_id 'a\.b' is invalid"):
        WorkerSettings("nats://127.0.0.1:1", worker_id="a.b")


def test_a_worker_takes_its_configuration_from_them() -> None:
    limits = WorkerLimits(max_request_bytes=1000)
    worker = Worker(WorkerSettings("nats://127.0.0.1:1", prefix="p1", worker_id="w-1", limits=limits))
    assert (worker.worker_id, worker.subjects.prefix, worker.limits) == ("w-1", "p1", limits)
    # Without an id, each worker makes its own.
    a, b = (Worker(WorkerSettings("nats://127.0.0.1:1")) for _ in range(2))
    assert a.worker_id != b.worker_id


def test_natserve_builds_them_from_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NATSERVE_MODEL_ROOTS",
        "NATSERVE_ALLOW_REMOTE_CODE",
        "NATSERVE_RATE_LIMIT",
        "NATSERVE_WORKER_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(
        home=tmp_path,
        prefix="p2",
        device="cpu",
        worker_id="w-2",
        heartbeat_interval=0.5,
        drain_timeout=3,
        warm_up=False,
        max_tokens_limit=64,
    )
    auth = NatsAuth(user="u", password="pw")
    built = worker_settings(settings, nats_url="nats://127.0.0.1:2", auth=auth)
    assert built == WorkerSettings(
        "nats://127.0.0.1:2",
        prefix="p2",
        worker_id="w-2",
        device="cpu",
        heartbeat_interval=0.5,
        drain_timeout=3,
        auth=auth,
        limits=worker_limits(settings),
        warm_up=False,
    )
    assert built.limits.max_tokens_limit == 64 and built.limits.model_roots is not None
