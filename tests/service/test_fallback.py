"""The fallback rule answers, and the response says so, whenever the model cannot: never a 500."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import FixedProvider, make_spec
from keel.artifact import DecisionModel
from keel.errors import ServingError
from keel.serve import FallbackRule, PathProvider, create_app


class Switchable:
    """An estimator that scores like a real model, raises, or stalls, as the test says."""

    def __init__(self, inner: DecisionModel) -> None:
        self.inner = inner
        self.mode = "ok"

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "raise":
            raise RuntimeError("estimator exploded")
        if self.mode == "slow":
            time.sleep(0.3)
        if self.mode == "nan":
            return np.full((len(x), 2), np.nan)
        p = self.inner.raw_scores(x)
        return np.c_[1 - p, p]


@pytest.fixture
def switchable(model_dirs: dict[str, Path]) -> tuple[DecisionModel, Switchable]:
    inner = DecisionModel.load(model_dirs["a"], threads=1)
    est = Switchable(inner)
    model = DecisionModel(kind="switchable", feature_names=inner.feature_names, estimator=est,
                          threshold=inner.threshold)
    return model, est


@pytest.fixture
def broken_dir(tmp_path: Path, model_dirs: dict[str, Path]) -> Path:
    target = tmp_path / "broken"
    DecisionModel.load(model_dirs["a"]).save(target)
    text = (target / "pipeline.json").read_text()
    (target / "pipeline.json").write_text(text.replace('"threshold": 0.3', '"threshold": 0.9'))  # tampered
    return target


def answers(c: TestClient, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    big = c.post("/v1/predict", json={**event, "transaction_id": 1, "tx_amount": 300.0})
    small = c.post("/v1/predict", json={**event, "transaction_id": 2, "tx_amount": 12.0})
    assert big.status_code == 200 and small.status_code == 200, (big.text, small.text)
    return big.json(), small.json()


def test_broken_artifact_serves_the_rule_and_ready_says_degraded(tmp_path: Path, broken_dir: Path,
                                                                 event: dict[str, Any]) -> None:
    with TestClient(create_app(make_spec(tmp_path), PathProvider(broken_dir))) as c:
        big, small = answers(c, event)
        for body in (big, small):
            assert body["fallback"] is True and body["fallback_reason"] == "model_unavailable"
            assert body["score"] is None and body["model_version"] is None
        assert big["decision"] == "review" and small["decision"] == "approve"  # tx_amount > 220
        ready = c.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "degraded"
        assert "SHA-256" in ready.json()["reasons"][0]
        assert c.get("/v1/model").json()["version"] is None
        assert 'keel_fallbacks_total{reason="model_unavailable"} 2.0' in c.get("/metrics").text


def test_missing_artifact_folder_also_falls_back(tmp_path: Path, event: dict[str, Any]) -> None:
    with TestClient(create_app(make_spec(tmp_path), PathProvider(tmp_path / "nothing-here"))) as c:
        big, _ = answers(c, event)
        assert big["fallback_reason"] == "model_unavailable" and big["decision"] == "review"
        assert c.get("/ready").status_code == 503


def test_raising_model_falls_back_then_recovers(tmp_path: Path, switchable: Any, event: dict[str, Any]) -> None:
    model, est = switchable
    with TestClient(create_app(make_spec(tmp_path), FixedProvider(model))) as c:
        assert c.post("/v1/predict", json=event).json()["fallback"] is False
        est.mode = "raise"
        big, small = answers(c, event)
        assert big["fallback_reason"] == "model_error" and big["decision"] == "review"
        assert small["fallback_reason"] == "model_error" and small["decision"] == "approve"
        assert big["model_version"] == "fixed-1" and big["score"] is None
        ready = c.get("/ready")
        assert ready.status_code == 503 and "estimator exploded" in ready.json()["reasons"][0]
        est.mode = "nan"
        assert c.post("/v1/predict", json={**event, "transaction_id": 3}).json()["fallback_reason"] == "model_error"
        est.mode = "ok"
        assert c.post("/v1/predict", json={**event, "transaction_id": 4}).json()["fallback"] is False
        assert c.get("/ready").status_code == 200


def test_slow_model_past_the_budget_falls_back(tmp_path: Path, switchable: Any, event: dict[str, Any]) -> None:
    model, est = switchable
    with TestClient(create_app(make_spec(tmp_path, serving={"timeout_ms": 20}), FixedProvider(model))) as c:
        est.mode = "slow"
        body = c.post("/v1/predict", json={**event, "tx_amount": 300.0}).json()
        assert body["fallback"] is True and body["fallback_reason"] == "model_timeout"
        assert body["decision"] == "review"
        batch = c.post("/v1/predict/batch", json={"events": [event, {**event, "transaction_id": 9}]}).json()
        assert [d["fallback_reason"] for d in batch["data"]] == ["model_timeout"] * 2
        assert "timeout_ms" in c.get("/ready").json()["reasons"][0]


def test_abstaining_model_hands_over_to_the_rule_but_keeps_its_score(tmp_path: Path, model_dirs: dict[str, Path],
                                                                     event: dict[str, Any]) -> None:
    with TestClient(create_app(make_spec(tmp_path), PathProvider(model_dirs["abstain"]))) as c:
        big, small = answers(c, event)
        assert big["fallback_reason"] == "abstain" and big["decision"] == "review" and big["score"] is not None
        assert small["decision"] == "approve"
        assert c.get("/ready").status_code == 200  # abstaining is by design, not a degradation


def test_without_a_rule_an_abstention_is_reported_as_such(tmp_path: Path, model_dirs: dict[str, Path],
                                                          event: dict[str, Any]) -> None:
    spec = make_spec(tmp_path)
    spec = spec.model_copy(update={"models": spec.models.model_copy(update={"rule": None})})
    with TestClient(create_app(spec, PathProvider(model_dirs["abstain"]))) as c:
        body = c.post("/v1/predict", json=event).json()
        assert body["decision"] == "abstain" and body["fallback"] is False


def _customer_history(event: dict[str, Any]) -> list[dict[str, Any]]:
    first = {**event, "transaction_id": 10, "tx_datetime": "2018-04-01T10:00:00"}
    later = {**event, "transaction_id": 11, "tx_datetime": "2018-04-05T10:00:00"}
    return [first, later]


@pytest.mark.parametrize(("action", "fallback"), [("flag", False), ("fallback", True)])
def test_stale_entity_state_is_flagged_or_falls_back(tmp_path: Path, model_dirs: dict[str, Path],
                                                     event: dict[str, Any], action: str, fallback: bool) -> None:
    spec = make_spec(tmp_path, features={"freshness": "1d", "stale_action": action})
    with TestClient(create_app(spec, PathProvider(model_dirs["a"]))) as c:
        first, later = _customer_history(event)
        fresh = c.post("/v1/predict", json=first).json()
        stale = c.post("/v1/predict", json=later).json()
    assert fresh["stale"] is False and fresh["fallback"] is False
    assert stale["stale"] is True and stale["fallback"] is fallback
    assert stale["fallback_reason"] == ("stale_features" if fallback else None)


class BrokenStore:
    def features(self, event: Any) -> Any:
        raise OSError("disk I/O error")

    def update(self, event: Any) -> None:
        raise OSError("disk I/O error")

    def add_label(self, *args: Any) -> bool:
        raise OSError("disk I/O error")

    def close(self) -> None:
        pass


def test_unreachable_store_falls_back_on_raw_fields(tmp_path: Path, model_dirs: dict[str, Path],
                                                    event: dict[str, Any]) -> None:
    app = create_app(make_spec(tmp_path), PathProvider(model_dirs["a"]), store=BrokenStore())
    with TestClient(app) as c:
        big, small = answers(c, event)
        assert big["fallback_reason"] == "features_unavailable" and big["decision"] == "review"
        assert small["decision"] == "approve"
        ready = c.get("/ready")
        assert ready.status_code == 503 and "disk I/O error" in json.dumps(ready.json())
        assert c.post("/v1/labels", json={"labels": [{"event_id": 1, "label": 1}]}).status_code == 200


def test_fallback_rule_reading_unknown_fields_is_refused_at_startup(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    spec = make_spec(tmp_path, serving={"fallback_rule": "merchant_risk > 0.5"})
    with pytest.raises(ServingError, match=r"reads \['merchant_risk'\], which is neither a request field"):
        create_app(spec, PathProvider(model_dirs["a"]))


def test_fallback_rule_unit() -> None:
    rule = FallbackRule("tx_amount > 220 and customer_id_nb_tx_1day_window >= 2",
                        positive_action="review", negative_action="approve")
    rows = [{"tx_amount": 300, "customer_id_nb_tx_1day_window": 2}, {"tx_amount": 300,
            "customer_id_nb_tx_1day_window": 1}, {"tx_amount": float("nan"), "customer_id_nb_tx_1day_window": 5}]
    assert rule.decide(rows) == ["review", "approve", "approve"]
    assert FallbackRule(None, negative_action="approve").decide([{}]) == ["approve"]


class SlowForest:
    """Stands in for compiled trees that have become slow: right scores, 80 ms per call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.n_features = inner.n_features
        self.calls = 0

    def predict(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        self.calls += 1
        time.sleep(0.08)
        return self.inner.predict(x, threads)


def test_inline_model_over_budget_falls_back_then_scores_in_the_pool(tmp_path: Path, model_dirs: dict[str, Path],
                                                                    event: dict[str, Any]) -> None:
    """A compiled model scores in the event loop (no thread hop), timed: over serving.timeout_ms its answer is
    dropped for the fallback's, and after 3 overruns in a row the version scores in the pool under a timeout."""
    model = DecisionModel.load(model_dirs["a"], threads=1)
    forest = model.compiled()
    assert forest is not None
    app = create_app(make_spec(tmp_path, serving={"timeout_ms": 50}), FixedProvider(model))
    with TestClient(app) as c:
        service = app.state.service
        assert service.loaded.inline
        fast = c.post("/v1/predict", json=event).json()
        assert fast["fallback"] is False and fast["score"] is not None
        slow = SlowForest(forest)
        model._forest, model._forests = slow, [slow]  # compiled() and the scoring path both see it
        for i in range(4):
            body = c.post("/v1/predict", json={**event, "transaction_id": 10 + i}).json()
            assert body["fallback_reason"] == "model_timeout" and body["score"] is None
            assert ("fixed-1" in service._pool_only) == (i >= 2)
        assert slow.calls == 4
        assert 'keel_fallbacks_total{reason="model_timeout"} 4.0' in c.get("/metrics").text
