"""Prometheus metrics for one app, in its own ``CollectorRegistry`` (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = (*tuple(round(0.05 * i, 2) for i in range(1, 20)), 1.0)


class ServiceMetrics:
    """Request counts by endpoint and outcome, latency, fallbacks by reason, scores, decisions, reloads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("keel_requests", "HTTP requests by endpoint and outcome "
                                "(ok, fallback, invalid, too_large, unauthorized, unavailable, not_found, error).",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("keel_request_latency_seconds", "Request latency in the service, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter("keel_events", "Events scored (single and batch).", registry=r)
        self.fallbacks = Counter("keel_fallbacks", "Events answered by the fallback rule, by reason.", ["reason"],
                                 registry=r)
        self.scores = Histogram("keel_score", "Calibrated model scores.", buckets=SCORE_BUCKETS, registry=r)
        self.decisions = Counter("keel_decisions", "Decisions returned, by action.", ["decision"], registry=r)
        self.stale = Counter("keel_stale_events", "Events whose entity state was older than features.freshness.",
                             registry=r)
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


__all__ = ["ServiceMetrics"]
