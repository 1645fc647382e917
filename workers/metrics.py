"""A worker's Prometheus metrics and its recent errors.

Every :class:`~workers.service.Worker` has a :class:`WorkerMetrics` on a ``CollectorRegistry`` of
its own (never prometheus_client's global one, so several workers can live in one process, as in
the tests); ``natserve worker --metrics-port`` serves it over HTTP (see
:mod:`natserve.observability`). Two kinds of series:

* counted as requests end (``ServiceHost.observer``) or as tokens come out:
  ``natserve_worker_requests_total{model_uid, endpoint, code}``,
  ``natserve_worker_request_duration_seconds{model_uid, endpoint}``,
  ``natserve_worker_time_to_first_token_seconds{model_uid}``,
  ``natserve_worker_launches_total{outcome}``, ``natserve_worker_launch_duration_seconds{outcome}``;
* read from the replicas and devices at scrape time: ``natserve_replica_generated_tokens_total``,
  ``natserve_replica_requests_total`` / ``_errors_total`` / ``_cancelled_total``,
  ``natserve_replica_running`` (the batch), ``natserve_replica_waiting`` (the queue),
  ``natserve_replica_in_flight``, ``natserve_replica_memory_bytes``, ``natserve_replica_info``
  (labels ``model_uid, replica``), and ``natserve_device_memory_total_bytes`` /
  ``natserve_device_memory_free_bytes{device}`` plus ``natserve_cuda_memory_allocated_bytes`` /
  ``natserve_cuda_memory_reserved_bytes{device}`` when CUDA is in use. Process memory (RSS) comes
  from prometheus_client's process collector, which ``natserve.observability`` adds once per
  process.

``model_uid`` is empty for the worker's own endpoints (launch, terminate, info).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker_client.runtime import EndpointInfo, RequestOutcome

from . import devices
from .served import ServedModel

__all__ = ["RECENT_ERRORS", "ServedModels", "WorkerMetrics"]

logger = logging.getLogger(__name__)

RECENT_ERRORS = 20
# Request latencies of an LLM worker span milliseconds (echo, embeddings) to minutes.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_LAUNCH_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServedModels(Protocol):
    """What the scrape reads the replica gauges from: the worker's served models by uid."""

    @property
    def models(self) -> Mapping[str, ServedModel]: ...


class WorkerMetrics:
    """The metrics of one worker, on ``registry`` (a new private one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, recent_errors: int = RECENT_ERRORS):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Per-request series: counted on the event loop, read by the scrape (_RequestSeries).
        self._series = _RequestSeries()
        r.register(self._series)
        self.launches = Counter(
            "natserve_worker_launches", "Replica launches on this worker, by outcome", ["outcome"], registry=r
        )
        self.launch_duration = Histogram(
            "natserve_worker_launch_duration_seconds",
            "Time to load a replica (download included), by outcome",
            ["outcome"],
            buckets=_LAUNCH_BUCKETS,
            registry=r,
        )
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent_errors)
        self._collector: _WorkerCollector | None = None

    # -- wiring

    def attach(self, worker: ServedModels) -> None:
        """Read ``worker``'s replicas (and this machine's devices) at every scrape."""
        if self._collector is None:
            self._collector = _WorkerCollector(worker)
            self.registry.register(self._collector)

    def detach(self) -> None:
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    # -- observations

    def observe_request(self, outcome: RequestOutcome) -> None:
        """``ServiceHost.observer``: count the request, time it, remember a server-side error."""
        info = outcome.info
        endpoint = info.observer_state
        if endpoint is None:
            endpoint = info.observer_state = self._series.endpoint(info)
        code = outcome.code
        counts = endpoint.counts
        counts[code] = counts.get(code, 0) + 1
        endpoint.duration.observe(outcome.seconds)
        # Client mistakes (4xx) are the client's to see; 5xx are the operator's.
        if code >= 500:
            self.note_error(
                code=code,
                message=outcome.message,
                model_uid=endpoint.model_uid or None,
                endpoint=endpoint.name,
                request_id=outcome.request_id,
            )

    def first_token_observer(self, model_uid: str) -> Callable[[float], None]:
        """What a replica of ``model_uid`` calls with each request's time to first token."""
        ttft = self._series.ttft.get(model_uid)
        if ttft is None:
            ttft = self._series.ttft[model_uid] = _Histogram(_TTFT_BUCKETS)
        return ttft.observe

    def observe_first_token(self, model_uid: str, seconds: float) -> None:
        self.first_token_observer(model_uid)(seconds)

    def observe_launch(self, seconds: float, error: BaseException | None) -> None:
        outcome = "ok" if error is None else type(error).__name__
        self.launches.labels(outcome).inc()
        self.launch_duration.labels(outcome).observe(seconds)

    def note_error(
        self,
        *,
        code: int,
        message: str,
        model_uid: str | None = None,
        endpoint: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self._recent.append(
            {
                "ts": time.time(),
                "model_uid": model_uid,
                "endpoint": endpoint,
                "code": code,
                "message": " ".join(message.split())[:500],
                "request_id": request_id,
            }
        )

    def recent_errors(self) -> list[dict[str, Any]]:
        """The last errors, oldest first."""
        return list(self._recent)


class _Histogram:
    """Bucket counts and a sum. Unlocked: only the worker's event loop observes."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "le": the first bound >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        counts = list(self.counts)
        total = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class _EndpointSeries:
    """One endpoint's requests by outcome code and their durations."""

    __slots__ = ("counts", "duration", "model_uid", "name")

    def __init__(self, model_uid: str, name: str) -> None:
        self.model_uid = model_uid
        self.name = name  # the label: the subject's last token (generate, chat, launch, ...)
        self.counts: dict[int, int] = {}  # 0: nothing was answered here
        self.duration = _Histogram(_REQUEST_BUCKETS)


class _RequestSeries(Collector):
    """The per-request series, counted in plain dicts on the event loop.

    prometheus_client's Counter and Histogram take a lock and validate labels on every call:
    five locked increments per request, a cost the echo benchmark showed on the hot path. Each
    endpoint's series is found by its ``EndpointInfo`` (one dict lookup per request) and its
    labels are made at scrape time. The scrape (on another thread) copies the dicts, which
    CPython does without yielding the GIL.
    """

    def __init__(self) -> None:
        # By labels (model uid, endpoint): a model's overflow subjects count with its main ones,
        # and a model launched again goes on where it left off (counters never go back).
        self.endpoints: dict[tuple[str, str], _EndpointSeries] = {}
        self.ttft: dict[str, _Histogram] = {}

    def endpoint(self, info: EndpointInfo) -> _EndpointSeries:
        uid = info.metadata.get("model_uid", "")
        name = info.subject.rsplit(".", 1)[-1]
        series = self.endpoints.get((uid, name))
        if series is None:
            series = self.endpoints[(uid, name)] = _EndpointSeries(uid, name)
        return series

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "natserve_worker_requests",
                "Requests this worker received, by model uid, endpoint and outcome code "
                "(200: answered, none: passed on or held elsewhere, else the error code)",
                labels=["model_uid", "endpoint", "code"],
            ),
            HistogramMetricFamily(
                "natserve_worker_request_duration_seconds",
                "Time from a request's arrival to its last reply",
                labels=["model_uid", "endpoint"],
            ),
            HistogramMetricFamily(
                "natserve_worker_time_to_first_token_seconds",
                "Time from a generate or chat request's admission to its first generated token",
                labels=["model_uid"],
            ),
        )

    def collect(self) -> Iterator[Metric]:
        requests, durations, ttft = self._families()
        for (uid, name), series in list(self.endpoints.items()):
            for code, count in list(series.counts.items()):
                requests.add_metric([uid, name, str(code) if code else "none"], count)
            durations.add_metric([uid, name], series.duration.cumulative(), series.duration.sum)
        for uid, histogram in list(self.ttft.items()):
            ttft.add_metric([uid], histogram.cumulative(), histogram.sum)
        yield from (requests, durations, ttft)


class _WorkerCollector(Collector):
    """Replica and device gauges, read from the worker when scraped."""

    def __init__(self, worker: ServedModels) -> None:
        self._worker = worker

    def describe(self) -> Iterable[Metric]:
        # Describing without reading the worker: registration must not touch CUDA.
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, Metric]:
        labels = ["model_uid", "replica"]
        return {
            "tokens": CounterMetricFamily(
                "natserve_replica_generated_tokens", "Tokens generated by a replica", labels=labels
            ),
            "requests": CounterMetricFamily(
                "natserve_replica_requests", "Requests a replica admitted", labels=labels
            ),
            "errors": CounterMetricFamily(
                "natserve_replica_errors", "Admitted requests that ended in an error", labels=labels
            ),
            "cancelled": CounterMetricFamily(
                "natserve_replica_cancelled", "Requests cancelled (cancel, terminate)", labels=labels
            ),
            "running": GaugeMetricFamily(
                "natserve_replica_running", "Requests in the replica's running batch", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "natserve_replica_waiting", "Admitted requests waiting for a batch slot", labels=labels
            ),
            "in_flight": GaugeMetricFamily(
                "natserve_replica_in_flight", "Admitted requests not yet answered", labels=labels
            ),
            "memory": GaugeMetricFamily(
                "natserve_replica_memory_bytes", "Memory the replica's model takes", labels=labels
            ),
            "info": GaugeMetricFamily(
                "natserve_replica_info",
                "1 per replica, with its model name, type, device and status",
                labels=[*labels, "model_name", "model_type", "device", "status"],
            ),
            "dev_total": GaugeMetricFamily(
                "natserve_device_memory_total_bytes", "Device memory", labels=["device"]
            ),
            "dev_free": GaugeMetricFamily(
                "natserve_device_memory_free_bytes", "Device memory free now", labels=["device"]
            ),
            "cuda_alloc": GaugeMetricFamily(
                "natserve_cuda_memory_allocated_bytes",
                "CUDA memory held by this process's tensors",
                labels=["device"],
            ),
            "cuda_reserved": GaugeMetricFamily(
                "natserve_cuda_memory_reserved_bytes",
                "CUDA memory held by this process's caching allocator",
                labels=["device"],
            ),
        }

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        try:
            self._replicas(families)
            self._devices(families)
        except Exception:
            # A scrape must not fail on a replica closing under it; the next one sees it gone.
            logger.debug("collecting worker metrics failed", exc_info=True)
        yield from families.values()

    def _replicas(self, f: dict[str, Metric]) -> None:
        for uid, served in list(self._worker.models.items()):
            for index, replica in list(served.replicas.items()):
                labels = [uid, str(index)]
                running, waiting = replica.counts()
                engine = getattr(replica, "engine", None)
                stats = getattr(engine, "stats", None) if engine is not None else None
                tokens = getattr(stats, "generated_tokens", None)
                if tokens is None:
                    tokens = getattr(replica, "completion_tokens", 0)
                f["tokens"].add_metric(labels, tokens)  # type: ignore[attr-defined]
                f["requests"].add_metric(labels, replica.requests)  # type: ignore[attr-defined]
                f["errors"].add_metric(labels, replica.errors)  # type: ignore[attr-defined]
                f["cancelled"].add_metric(labels, replica.cancelled)  # type: ignore[attr-defined]
                f["running"].add_metric(labels, running)  # type: ignore[attr-defined]
                f["waiting"].add_metric(labels, waiting)  # type: ignore[attr-defined]
                f["in_flight"].add_metric(labels, replica.load)  # type: ignore[attr-defined]
                f["memory"].add_metric(labels, replica.memory_bytes)  # type: ignore[attr-defined]
                f["info"].add_metric(  # type: ignore[attr-defined]
                    [*labels, replica.model_name, replica.model_type, replica.device, replica.status], 1
                )

    def _devices(self, f: dict[str, Metric]) -> None:
        for device in devices.list_devices():
            f["dev_total"].add_metric([device.name], device.total_memory)  # type: ignore[attr-defined]
            f["dev_free"].add_metric([device.name], device.free_memory)  # type: ignore[attr-defined]
            if device.kind != "cuda":
                continue
            import torch

            if not torch.cuda.is_initialized():
                continue
            index = int(device.name.partition(":")[2] or 0)
            f["cuda_alloc"].add_metric([device.name], torch.cuda.memory_allocated(index))  # type: ignore[attr-defined]
            f["cuda_reserved"].add_metric([device.name], torch.cuda.memory_reserved(index))  # type: ignore[attr-defined]
