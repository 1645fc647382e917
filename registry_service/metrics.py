"""The registry's Prometheus metrics and its recent launch failures.

On a ``CollectorRegistry`` of the service's own (never prometheus_client's global one), served
over HTTP by ``natserve registry --metrics-port`` (see :mod:`natserve.observability`):

* ``natserve_registry_requests_total{endpoint, code}`` and
  ``natserve_registry_request_duration_seconds{endpoint}``: every request on its subjects;
* ``natserve_registry_launches_total{outcome}`` and
  ``natserve_registry_launch_duration_seconds{outcome}``: whole launches, from placing to every
  replica ready (``ok``) or to the failure (the error's class, or ``cancelled``);
* ``natserve_registry_launches_in_flight``, ``natserve_registry_workers{state}`` (alive, dead)
  and ``natserve_registry_replicas{status}`` as the workers report them, read at scrape time.

The last launch failures (uid, message, time) are kept for ``natserve status``: the
``workers.list`` reply carries them as ``recent_failures``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker_client.runtime import RequestOutcome

from .directory import WorkerDirectory

__all__ = ["RECENT_FAILURES", "RegistryMetrics"]

RECENT_FAILURES = 20
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600)
_LAUNCH_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class RegistryMetrics:
    """The metrics of one registry service, on ``registry`` (a new private one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, recent: int = RECENT_FAILURES):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "natserve_registry_requests",
            "Requests answered by the registry, by endpoint and outcome code (200: no error)",
            ["endpoint", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "natserve_registry_request_duration_seconds",
            "Time the registry took to answer a request (a waiting launch: until ready)",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.launches = Counter(
            "natserve_registry_launches", "Model launches, by outcome", ["outcome"], registry=r
        )
        self.launch_duration = Histogram(
            "natserve_registry_launch_duration_seconds",
            "Time from placing a launch to every replica ready, or to its failure",
            ["outcome"],
            buckets=_LAUNCH_BUCKETS,
            registry=r,
        )
        self._failures: deque[dict[str, Any]] = deque(maxlen=recent)
        self._collector: _RegistryCollector | None = None

    def attach(self, directory: WorkerDirectory, launches_in_flight: Callable[[], int]) -> None:
        """Report the workers of ``directory`` and the launches in flight at scrape time."""
        if self._collector is None:
            self._collector = _RegistryCollector(directory, launches_in_flight)
            self.registry.register(self._collector)

    def observe_request(self, outcome: RequestOutcome) -> None:
        self.requests.labels(outcome.endpoint, str(outcome.code) if outcome.code else "none").inc()
        self.request_duration.labels(outcome.endpoint).observe(outcome.seconds)

    def track_launch(self, task: asyncio.Task[Any]) -> None:
        """Time a launch task (started now) and count its outcome when it ends."""
        started = time.monotonic()

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled():
                outcome = "cancelled"
            else:
                error = t.exception()
                outcome = "ok" if error is None else type(error).__name__
            self.launches.labels(outcome).inc()
            self.launch_duration.labels(outcome).observe(time.monotonic() - started)

        task.add_done_callback(done)

    def note_failure(self, model_uid: str, message: str) -> None:
        self._failures.append(
            {"ts": time.time(), "model_uid": model_uid, "message": " ".join(message.split())[:500]}
        )

    def recent_failures(self) -> list[dict[str, Any]]:
        """The last launch failures, oldest first."""
        return list(self._failures)


class _RegistryCollector(Collector):
    def __init__(self, directory: WorkerDirectory, launches_in_flight: Callable[[], int]) -> None:
        self._directory = directory
        self._launches_in_flight = launches_in_flight

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "in_flight": GaugeMetricFamily(
                "natserve_registry_launches_in_flight", "Launches placed and not yet ready or failed"
            ),
            "workers": GaugeMetricFamily(
                "natserve_registry_workers", "Workers the registry heard from, by state", labels=["state"]
            ),
            "replicas": GaugeMetricFamily(
                "natserve_registry_replicas",
                "Replicas the live workers report, by status",
                labels=["status"],
            ),
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        directory = self._directory
        f["in_flight"].add_metric([], self._launches_in_flight())
        now = time.monotonic()
        states = Tally({"alive": 0, "dead": 0})
        statuses: Tally[str] = Tally()
        for worker in directory.entries():
            alive = directory.is_alive(worker, now)
            states["alive" if alive else "dead"] += 1
            if alive:
                statuses.update(r.status for r in worker.info.replicas)
        for state, n in sorted(states.items()):
            f["workers"].add_metric([state], n)
        for status, n in sorted(statuses.items()):
            f["replicas"].add_metric([status], n)
        yield from f.values()
