"""Prometheus metrics for one app, in its own ``CollectorRegistry`` (two apps in one process never collide).

The per-request metrics (requests, latency, events, fallbacks, scores, decisions, stale events) are plain Python
counters and bucket counts exposed by one collector when scraped: prometheus_client's own metrics take a lock per
increment and walk the buckets in Python per observation, several microseconds a request on the event loop's
thread. They are updated from the event loop's thread only (where the middleware and the answers run), so no
lock is needed; the exposition is the same (``keel_requests_total{...}``, ``keel_score_bucket{le=...}``, ...).
The rare ones (reloads, store errors, labels, model info, log gauges) stay prometheus_client metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = (*tuple(round(0.05 * i, 2) for i in range(1, 20)), 1.0)


class FastCounter:
    """A counter (or one labelled child): ``inc(amount)``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class FastHistogram:
    """A histogram (or one labelled child): ``observe(value)``, ``observe_many(array)``; buckets as Prometheus
    counts them (a value equal to a bound falls in that bound's bucket)."""

    __slots__ = ("_edges", "bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = [float(b) for b in bounds]
        self._edges = np.asarray(self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        if len(values):
            found = np.bincount(np.searchsorted(self._edges, values, side="left"), minlength=len(self.counts))
            self.counts = [a + int(b) for a, b in zip(self.counts, found.tolist(), strict=True)]
            self.sum += float(values.sum())


class _Family:
    """A metric with labels: ``labels(*values)`` gives (and keeps) the child for those values."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], kind: str,
                 buckets: Sequence[float] = ()) -> None:
        self.name, self.documentation, self.labelnames, self.kind = name, documentation, list(labelnames), kind
        self.buckets = tuple(buckets)
        self.children: dict[tuple[str, ...], Any] = {}
        self.single: Any = None if labelnames else self._new()

    def _new(self) -> Any:
        return FastCounter() if self.kind == "counter" else FastHistogram(self.buckets)

    def labels(self, *values: Any) -> Any:
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"The metric {self.name} takes labels {self.labelnames}. Got {list(key)} instead.")
            child = self.children[key] = self._new()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.single.inc(amount)

    def observe(self, value: float) -> None:
        self.single.observe(value)

    def observe_many(self, values: np.ndarray) -> None:
        self.single.observe_many(values)

    def metric(self) -> Metric:
        items = list(self.children.items()) if self.labelnames else [((), self.single)]
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, child in items:
                family.add_metric(list(key), child.value)
            return family
        hist = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [*(floatToGoString(b) for b in self.buckets), "+Inf"]
        for key, child in items:
            total, cumulative = 0, []
            for name, count in zip(names, child.counts, strict=True):
                total += count
                cumulative.append((name, total))
            hist.add_metric(list(key), cumulative, child.sum)
        return hist


class _FastCollector:
    def __init__(self, families: list[_Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric()


class ServiceMetrics:
    """Request counts by endpoint and outcome, latency, fallbacks by reason, scores, decisions, reloads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Family("keel_requests", "HTTP requests by endpoint and outcome "
                                "(ok, fallback, invalid, too_large, unauthorized, unavailable, not_found, error).",
                                ["endpoint", "outcome"], "counter")
        self.latency = _Family("keel_request_latency_seconds", "Request latency in the service, by endpoint.",
                               ["endpoint"], "histogram", LATENCY_BUCKETS)
        self.events = _Family("keel_events", "Events scored (single and batch).", [], "counter")
        self.fallbacks = _Family("keel_fallbacks", "Events answered by the fallback rule, by reason.", ["reason"],
                                 "counter")
        self.scores = _Family("keel_score", "Calibrated model scores.", [], "histogram", SCORE_BUCKETS)
        self.decisions = _Family("keel_decisions", "Decisions returned, by action.", ["decision"], "counter")
        self.stale = _Family("keel_stale_events", "Events whose entity state was older than features.freshness.",
                             [], "counter")
        r.register(_FastCollector([self.requests, self.latency, self.events, self.fallbacks, self.scores,
                                   self.decisions, self.stale]))  # type: ignore[arg-type]
        self.store_errors = Counter("keel_store_errors", "Online store reads or writes that failed.", ["op"],
                                    registry=r)
        self.reloads = Counter("keel_model_reloads", "Model reload attempts by outcome (swapped, unchanged, failed).",
                               ["outcome"], registry=r)
        self.model_info = Gauge("keel_model_info", "The model version being served (value 1).", ["version"],
                                registry=r)
        self.labels = Counter("keel_labels", "Labels received.", registry=r)
        self.log_pending = Gauge("keel_prediction_log_pending", "Records waiting for the prediction-log writer.",
                                 registry=r)
        self.log_dropped = Gauge("keel_prediction_log_dropped", "Records dropped because the log queue was full.",
                                 registry=r)


__all__ = ["LATENCY_BUCKETS", "SCORE_BUCKETS", "FastCounter", "FastHistogram", "ServiceMetrics"]
