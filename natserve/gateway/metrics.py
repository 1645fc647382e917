"""The gateway's Prometheus metrics.

    natserve_gateway_requests_total{route, code}           HTTP requests answered, by status
                                                            (499: the client left mid-stream)
    natserve_gateway_request_duration_seconds{route}       arrival to the last byte sent
    natserve_gateway_time_to_first_event_seconds{route}    arrival to a stream's first event
    natserve_gateway_streams{route}                        streams being sent now

They live on the ``CollectorRegistry`` they are given (``natserve up`` shares one with the
registry and the worker on ``--metrics-port``; ``natserve gateway --metrics-port`` serves its
own). As the worker does (``workers/metrics.py``), requests are counted in plain dicts on the
event loop and turned into families at scrape time: prometheus_client's Counter and Histogram
take a lock on every call, which the request path of a 10,000 requests/s gateway should not pay.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["GatewayMetrics", "RouteSeries"]

# From a cached echo answer (well under a millisecond) to a long generation.
_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
_FIRST_EVENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class _Histogram:
    """Bucket counts and a sum, observed on the event loop only (so without a lock)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), list(self.counts), strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class RouteSeries:
    """One route's series; the route's endpoint holds it, so counting is attribute access."""

    __slots__ = ("counts", "duration", "first_event", "name", "streams")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[int, int] = {}
        self.duration = _Histogram(_DURATION_BUCKETS)
        self.first_event = _Histogram(_FIRST_EVENT_BUCKETS)
        self.streams = 0

    def done(self, code: int, seconds: float) -> None:
        counts = self.counts
        counts[code] = counts.get(code, 0) + 1
        self.duration.observe(seconds)


class GatewayMetrics(Collector):
    """Every route's series, collected from ``registry`` when given (else only kept here)."""

    def __init__(self, registry: Any = None) -> None:
        self.routes: dict[str, RouteSeries] = {}
        if registry is not None:
            registry.register(self)

    def route(self, name: str) -> RouteSeries:
        series = self.routes.get(name)
        if series is None:
            series = self.routes[name] = RouteSeries(name)
        return series

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily, GaugeMetricFamily
    ]:
        return (
            CounterMetricFamily(
                "natserve_gateway_requests",
                "HTTP requests the gateway answered, by route and status (499: the client left mid-stream)",
                labels=["route", "code"],
            ),
            HistogramMetricFamily(
                "natserve_gateway_request_duration_seconds",
                "Time from a request's arrival to the last byte of its answer",
                labels=["route"],
            ),
            HistogramMetricFamily(
                "natserve_gateway_time_to_first_event_seconds",
                "Time from a streamed request's arrival to its first event",
                labels=["route"],
            ),
            GaugeMetricFamily("natserve_gateway_streams", "Streams being sent now", labels=["route"]),
        )

    def collect(self) -> Iterator[Metric]:
        requests, durations, first_events, streams = self._families()
        for name, series in list(self.routes.items()):
            for code, count in list(series.counts.items()):
                requests.add_metric([name, str(code)], count)
            durations.add_metric([name], series.duration.cumulative(), series.duration.sum)
            if series.first_event.sum or any(series.first_event.counts):
                first_events.add_metric([name], series.first_event.cumulative(), series.first_event.sum)
            streams.add_metric([name], series.streams)
        yield from (requests, durations, first_events, streams)
