"""The API through TestClient: happy path, every bad input, limits, admin key, docs, metrics and logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from conftest import make_spec
from keel.artifact import DecisionModel
from keel.serve import PathProvider, create_app


@pytest.fixture
def client(tmp_path: Path, model_dirs: dict[str, Path]) -> Iterator[TestClient]:
    spec = make_spec(tmp_path, serving={"max_batch": 50, "max_body_bytes": 20_000})
    with TestClient(create_app(spec, PathProvider(model_dirs["a"]))) as c:
        yield c


def test_predict_happy_path_scores_with_the_artifact_threshold(client: TestClient, event: dict[str, Any],
                                                               model_dirs: dict[str, Path]) -> None:
    r = client.post("/v1/predict", json=event, headers={"X-Request-ID": "req-123"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "req-123" and r.headers["x-request-id"] == "req-123"
    assert body["event_id"] == event["transaction_id"]
    assert 0.0 <= body["score"] <= 1.0
    model = DecisionModel.load(model_dirs["a"])
    assert body["decision"] == model.decide([body["score"]])[0]
    assert body["model_version"] == PathProvider(model_dirs["a"]).resolve()
    assert body["fallback"] is False and body["fallback_reason"] is None and body["stale"] is False
    assert body["latency_ms"] > 0


def test_decision_follows_threshold_for_a_risky_and_a_plain_event(client: TestClient, event: dict[str, Any],
                                                                  model_dirs: dict[str, Path]) -> None:
    threshold = DecisionModel.load(model_dirs["a"]).threshold
    seen = set()
    for amount in (5.0, 40.0, 250.0, 900.0):
        body = client.post("/v1/predict", json={**event, "transaction_id": int(amount), "tx_amount": amount}).json()
        assert (body["decision"] == "review") == (body["score"] >= threshold)
        seen.add(body["decision"])
    assert seen == {"review", "approve"}  # the simulator's amount rule makes > 220 fraud: the model learnt it


def test_batch_scores_in_order_with_item_ids(client: TestClient, events: Any) -> None:
    batch = events(200, 10)
    r = client.post("/v1/predict/batch", json={"events": batch})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 10 and [d["event_id"] for d in body["data"]] == [e["transaction_id"] for e in batch]
    assert [d["request_id"] for d in body["data"]] == [f"{body['request_id']}.{i}" for i in range(10)]
    # The same events one by one in a fresh service give the same scores (order-aware online features).
    assert all(not d["fallback"] for d in body["data"])


def test_batch_equals_single_predictions(tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    batch = events(300, 20)
    with TestClient(create_app(make_spec(tmp_path / "one"), PathProvider(model_dirs["a"]))) as c:
        singles = [c.post("/v1/predict", json=e).json()["score"] for e in batch]
    with TestClient(create_app(make_spec(tmp_path / "two"), PathProvider(model_dirs["a"]))) as c:
        batched = [d["score"] for d in c.post("/v1/predict/batch", json={"events": batch}).json()["data"]]
    assert batched == pytest.approx(singles, rel=1e-12)


FUTURE = (datetime.now(UTC) + timedelta(days=2)).isoformat()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"tx_amount": "abc"}, "tx_amount", "valid number"),
        ({"tx_amount": -5.0}, "tx_amount", "greater than or equal to 0"),
        ({"customer_id": "7"}, "customer_id", "valid integer"),
        ({"customer_id": 7.5}, "customer_id", "valid integer"),
        ({"terminal_id": True}, "terminal_id", "valid integer"),
        ({"tx_datetime": "yesterday"}, "tx_datetime", "datetime"),
        ({"tx_datetime": 1714550400}, "tx_datetime", "ISO-8601"),
        ({"tx_datetime": FUTURE}, "tx_datetime", "max_future_skew"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
        ({"tx_amount": None}, "tx_amount", "valid number"),
    ],
)
def test_bad_events_are_422_naming_the_field(client: TestClient, event: dict[str, Any], change: dict[str, Any],
                                             field: str, message: str) -> None:
    r = client.post("/v1/predict", json={**event, **change})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["detail"].startswith(f"{field}: ") and message in body["detail"]
    assert body["errors"][0]["field"] == field


@pytest.mark.parametrize("missing", ["transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount"])
def test_missing_fields_are_named(client: TestClient, event: dict[str, Any], missing: str) -> None:
    r = client.post("/v1/predict", json={k: v for k, v in event.items() if k != missing})
    assert r.status_code == 422 and r.json()["detail"] == f"{missing}: Field required"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_are_refused(client: TestClient, event: dict[str, Any], literal: str) -> None:
    text = json.dumps({**event, "tx_amount": 1.0}).replace("1.0", literal)
    r = client.post("/v1/predict", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "tx_amount: Input should be a finite number"


def test_bad_event_inside_a_batch_names_its_index(client: TestClient, events: Any) -> None:
    batch = events(0, 3)
    batch[2]["tx_amount"] = -1
    r = client.post("/v1/predict/batch", json={"events": batch})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "events[2].tx_amount"


def test_invalid_json_and_empty_body(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b'{"tx_amount": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    assert "not valid JSON" in r.json()["detail"]
    r = client.post("/v1/predict")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"


def test_batch_over_max_batch_is_refused(client: TestClient, events: Any) -> None:
    r = client.post("/v1/predict/batch", json={"events": events(0, 51)})
    assert r.status_code in (413, 422)
    assert r.json()["detail"].startswith("events: ") and "50" in r.json()["detail"]
    assert client.post("/v1/predict/batch", json={"events": []}).status_code == 422


def test_oversized_body_by_content_length_is_413(client: TestClient, event: dict[str, Any]) -> None:
    body = json.dumps({"events": [event] * 200}).encode()
    assert len(body) > 20_000
    r = client.post("/v1/predict/batch", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes (20000 bytes)" in r.json()["detail"]


def test_oversized_streamed_body_without_length_is_413(client: TestClient, event: dict[str, Any]) -> None:
    chunk = json.dumps(event).encode() + b","

    def stream() -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(200):
            yield chunk
        yield b"{}]}"

    r = client.post("/v1/predict/batch", content=stream(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_labels_are_accepted_and_validated(client: TestClient, event: dict[str, Any]) -> None:
    assert client.post("/v1/predict", json=event).status_code == 200
    r = client.post("/v1/labels", json={"labels": [{"event_id": event["transaction_id"], "label": 1,
                                                   "at": "2018-05-01T00:00:00"},
                                                  {"event_id": 999_999_999, "label": 0}]})
    assert r.status_code == 200 and r.json() == {"count": 2, "known": 1}
    bad = client.post("/v1/labels", json={"labels": [{"event_id": 1, "label": 2}]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "labels[0].label"


def test_health_ready_model_docs(client: TestClient, model_dirs: dict[str, Path]) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/model").json()
    assert info["version"] == PathProvider(model_dirs["a"]).resolve() and info["threshold"] == 0.3
    assert info["training_data"]["data_source"] == "simulate(300, 600, 40)"
    assert info["metrics"] == {"average_precision": 0.61} and info["fallback_rule"] == "tx_amount > 220"
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["PredictRequest"]
    assert set(request["required"]) == {"transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount"}
    assert request["additionalProperties"] is False
    assert {"/v1/predict", "/v1/predict/batch", "/v1/labels", "/ready", "/admin/reload"} <= set(schema["paths"])


def test_metrics_count_requests_by_outcome(client: TestClient, event: dict[str, Any]) -> None:
    client.post("/v1/predict", json=event)
    client.post("/v1/predict", json={**event, "tx_amount": -1})
    text = client.get("/metrics").text
    assert 'keel_requests_total{endpoint="predict",outcome="ok"} 1.0' in text
    assert 'keel_requests_total{endpoint="predict",outcome="invalid"} 1.0' in text
    assert 'keel_request_latency_seconds_count{endpoint="predict"} 2.0' in text
    assert "keel_score_count 1.0" in text
    assert 'keel_model_info{version="path:a@' in text


def test_two_apps_in_one_process_keep_separate_metrics(tmp_path: Path, model_dirs: dict[str, Path],
                                                       event: dict[str, Any]) -> None:
    with TestClient(create_app(make_spec(tmp_path / "x"), PathProvider(model_dirs["a"]))) as one, \
            TestClient(create_app(make_spec(tmp_path / "y"), PathProvider(model_dirs["a"]))) as two:
        one.post("/v1/predict", json=event)
        assert 'outcome="ok"} 1.0' in one.get("/metrics").text
        assert 'keel_requests_total{endpoint="predict"' not in two.get("/metrics").text


def test_admin_reload_needs_the_key(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_API_KEY", raising=False)
    assert client.post("/admin/reload").status_code == 503
    monkeypatch.setenv("KEEL_API_KEY", "right-key")
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"X-API-Key": "wrong-key"}).status_code == 401
    r = client.post("/admin/reload", headers={"X-API-Key": "right-key"})
    assert r.status_code == 200 and r.json()["changed"] is False


def test_one_json_log_line_per_request_with_id_and_never_the_key(
        client: TestClient, event: dict[str, Any], api_key: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="keel.serve"):
        client.post("/v1/predict", json=event, headers={"X-Request-ID": "abc-1"})
        client.post("/admin/reload", headers={"X-API-Key": api_key, "X-Request-ID": "abc-2"})
        client.post("/admin/reload", headers={"X-API-Key": "not-" + api_key, "X-Request-ID": "abc-3"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "keel.serve.access"]
    assert [(x["request_id"], x["status"]) for x in lines] == [("abc-1", 200), ("abc-2", 200), ("abc-3", 401)]
    assert lines[0]["path"] == "/v1/predict" and lines[0]["outcome"] == "ok" and lines[0]["latency_ms"] > 0
    assert api_key not in caplog.text


def test_malformed_request_id_is_replaced(client: TestClient, event: dict[str, Any]) -> None:
    r = client.post("/v1/predict", json=event, headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.status_code == 200 and len(r.json()["request_id"]) == 32
