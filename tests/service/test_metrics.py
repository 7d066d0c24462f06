"""The per-request metrics are exposed exactly as prometheus_client's own counters and histograms would be."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from keel.serve.metrics import SCORE_BUCKETS, ServiceMetrics


def _samples(text: bytes, prefix: str) -> list[str]:
    return [line for line in text.decode().splitlines()
            if line.startswith(prefix) and "_created" not in line and not line.startswith("#")]


def test_fast_metrics_expose_the_same_samples_as_prometheus_client() -> None:
    values = [0.0, 0.05, 0.051, 0.5, 0.95, 0.999, 1.0, 0.3, 0.3, 1.5]  # bounds themselves included
    ours = ServiceMetrics()
    ref = CollectorRegistry()
    scores = Histogram("keel_score", "Calibrated model scores.", buckets=SCORE_BUCKETS, registry=ref)
    requests = Counter("keel_requests", "x", ["endpoint", "outcome"], registry=ref)
    for v in values[:4]:
        ours.scores.observe(v)
    ours.scores.observe_many(np.array(values[4:]))  # the batch path gives the same buckets as one by one
    for v in values:
        scores.observe(v)
    for endpoint, outcome in [("predict", "ok"), ("predict", "ok"), ("batch", "invalid")]:
        ours.requests.labels(endpoint, outcome).inc()
        requests.labels(endpoint, outcome).inc()
    got, want = generate_latest(ours.registry), generate_latest(ref)
    assert _samples(got, "keel_score") == _samples(want, "keel_score")
    assert _samples(got, "keel_requests") == _samples(want, "keel_requests")
    assert 'keel_score_bucket{le="0.05"} 2.0' in got.decode()
