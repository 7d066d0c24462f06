"""The prediction log: batched writes, nothing lost on clean shutdown, streaming reads, labels, feature parity."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from conftest import make_spec, to_event
from keel.errors import MonitorError
from keel.features.definitions import resolve_definitions
from keel.features.offline import compute_features
from keel.serve import (
    PathProvider,
    PredictionLog,
    create_app,
    iter_predictions,
    read_labels,
    read_predictions,
)


def record(i: int, t0: datetime) -> dict[str, Any]:
    return {"request_id": f"r{i}", "time": t0, "event_time": t0 + timedelta(hours=i), "event_id": i,
            "endpoint": "predict", "inputs": {"tx_amount": float(i), "tx_datetime": t0 + timedelta(hours=i)},
            "features": {"tx_amount": float(i), "mean_1d": float("nan")}, "score": i / 1000,
            "decision": "approve", "model_version": "v1", "fallback": i % 2 == 0, "latency_ms": 1.5}


def test_close_flushes_everything_even_below_the_flush_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    t0 = datetime(2018, 4, 1)
    log = PredictionLog(path, flush_rows=10_000, flush_ms=600_000).start()
    for i in range(500):
        log.append(record(i, t0))
    log.add_labels([(3, 1.0, t0), (4, 0.0, t0)])
    log.close()
    frame = read_predictions(path)
    assert len(frame) == 500 and list(frame["request_id"]) == [f"r{i}" for i in range(500)]
    assert frame["fallback"].tolist() == [i % 2 == 0 for i in range(500)]
    assert np.isnan(frame["mean_1d"]).all() and frame["tx_amount"].tolist() == [float(i) for i in range(500)]
    assert frame["inputs"][7]["tx_datetime"] == "2018-04-01T07:00:00.000000"
    labels = read_labels(path)
    assert labels["event_id"].tolist() == ["3", "4"] and labels["label"].tolist() == [1.0, 0.0]


def test_flush_rows_writes_while_running(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    with PredictionLog(path, flush_rows=10, flush_ms=600_000) as log:
        for i in range(25):
            log.append(record(i, datetime(2018, 4, 1)))
        log.flush()
        assert len(read_predictions(path)) == 25


def test_iter_predictions_streams_a_time_range_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    t0 = datetime(2018, 4, 1)
    with PredictionLog(path) as log:
        log.append_many([record(i, t0) for i in range(100)])
    chunks = list(iter_predictions(path, t0 + timedelta(hours=10), t0 + timedelta(hours=60), batch_rows=15))
    assert [len(c) for c in chunks] == [15, 15, 15, 5]
    ids = pd.concat(chunks)["event_id"].astype(int).tolist()
    assert ids == list(range(10, 60))
    assert len(read_predictions(path, on="time", end=t0)) == 0


def test_reading_a_missing_log_names_it(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match=r"No prediction log at .*nope\.sqlite"):
        read_labels(tmp_path / "nope.sqlite")


def test_every_request_is_logged_after_shutdown(tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    # A generous model budget: this test is about logging, and on a loaded CI machine a 50 ms budget can let the
    # fallback answer (no score), which is a different path than the one under test.
    spec = make_spec(tmp_path, serving={"log_flush_rows": 100_000, "log_flush_ms": 600_000, "timeout_ms": 10_000})
    singles, batch = events(0, 40), events(40, 25)
    with TestClient(create_app(spec, PathProvider(model_dirs["a"]))) as c:
        answers = [c.post("/v1/predict", json=e).json() for e in singles]
        answers += c.post("/v1/predict/batch", json={"events": batch}).json()["data"]
        c.post("/v1/labels", json={"labels": [{"event_id": singles[0]["transaction_id"], "label": 1}]})
    path = spec.store_path(spec.serving.prediction_log)
    logged = read_predictions(path)
    assert len(logged) == 65
    assert logged["request_id"].tolist() == [a["request_id"] for a in answers]
    assert not any(a["fallback"] for a in answers)  # the model answered every event: scores are logged
    assert logged["score"].tolist() == pytest.approx([a["score"] for a in answers])
    assert logged["decision"].tolist() == [a["decision"] for a in answers]
    assert logged["endpoint"].tolist() == ["predict"] * 40 + ["batch"] * 25
    assert logged["event_id"].tolist() == [str(e["transaction_id"]) for e in singles + batch]
    assert logged["event_time"].iloc[0] == pd.Timestamp(singles[0]["tx_datetime"])
    assert set(logged["model_version"]) == {PathProvider(model_dirs["a"]).resolve()}
    assert read_labels(path)["event_id"].tolist() == [str(singles[0]["transaction_id"])]


def test_served_features_equal_the_offline_table(tmp_path: Path, model_dirs: dict[str, Path],
                                                 transactions: pd.DataFrame, flagship_spec: Any) -> None:
    """Replay 12 days of a quarter of the customers day by day, posting each day's labels as known at event
    time: the features the API logged equal the offline point-in-time table, label-based terminal risk included."""
    start = transactions["tx_datetime"].min()
    days = transactions[(transactions["tx_datetime"] < start + pd.Timedelta(days=12))
                        & (transactions["customer_id"] < 75)]
    defs = resolve_definitions(flagship_spec.features, flagship_spec.data)
    expected = compute_features(days, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id")
    spec = make_spec(tmp_path, serving={"max_batch": 10_000})
    with TestClient(create_app(spec, PathProvider(model_dirs["a"]))) as c:
        for _, chunk in days.groupby(days["tx_datetime"].dt.floor("D")):
            r = c.post("/v1/predict/batch", json={"events": [to_event(r) for _, r in chunk.iterrows()]})
            assert r.status_code == 200
            labels = [{"event_id": int(r.transaction_id), "label": int(r.tx_fraud),
                       "at": pd.Timestamp(r.tx_datetime).isoformat()} for r in chunk.itertuples()]
            assert c.post("/v1/labels", json={"labels": labels}).status_code == 200
    logged = read_predictions(spec.store_path(spec.serving.prediction_log))
    names = list(expected.columns[4:])
    assert len(logged) == len(days)
    assert logged["event_id"].astype(int).tolist() == days["transaction_id"].tolist()
    np.testing.assert_allclose(logged[names].to_numpy(), expected[names].to_numpy(), rtol=1e-9, equal_nan=True)
    assert expected["terminal_id_risk_7day_window"].gt(0).any()  # the label path was exercised
