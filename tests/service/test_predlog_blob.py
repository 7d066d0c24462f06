"""The service's log writer fills the binary feature column that monitoring reads instead of the JSON text."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from keel.logformat import read_feature_sets
from keel.monitor.logread import read_log
from keel.serve import PredictionLog, read_predictions


def _record(i: int, features: dict[str, object]) -> dict[str, object]:
    t0 = datetime(2018, 4, 1)
    return {"request_id": f"r{i}", "time": t0, "event_time": t0 + timedelta(minutes=i), "event_id": i,
            "endpoint": "predict", "inputs": {"tx_amount": float(i)}, "features": features, "score": i / 100,
            "decision": "approve", "model_version": "v1", "fallback": False, "latency_ms": 1.0}


def test_numeric_features_are_written_as_float64_blobs_in_one_feature_set(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with PredictionLog(path) as log:
        for i in range(40):
            log.append(_record(i, {"tx_amount": i * 1.1, "is_night": i % 2 == 0, "mean_1d": None if i % 3 else 0.1}))
        log.append(_record(40, {"tx_amount": 1.0, "kind": "card"}))  # a string value: JSON text only
    with sqlite3.connect(path) as db:
        rows = db.execute("select event_id, features_f64, feature_set from predictions order by seq").fetchall()
        sets = read_feature_sets(db)
    assert len(sets) == 1 and next(iter(sets.values())) == ["tx_amount", "is_night", "mean_1d"]
    for event_id, blob, fs in rows[:40]:
        i = int(event_id)
        values = np.frombuffer(blob, dtype="<f8")
        expected = [i * 1.1, float(i % 2 == 0), np.nan if i % 3 else 0.1]
        np.testing.assert_array_equal(values, expected)
        assert fs == next(iter(sets))
    assert rows[40][1] is None and rows[40][2] is None


def test_monitoring_reads_the_same_values_from_blobs_as_from_the_json_text(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    rng = np.random.default_rng(3)
    with PredictionLog(path) as log:
        for i in range(300):
            log.append(_record(i, {"a": float(rng.normal()), "b": float(rng.integers(0, 5))}))
    fast = pd.concat(list(read_log(path, features=["a", "b"], batch_rows=64)), ignore_index=True)
    slow = read_predictions(path)  # the JSON text, decoded row by row
    with sqlite3.connect(path) as db:
        assert db.execute("select count(*) from predictions where features_f64 is null").fetchone()[0] == 0
        # Wipe the JSON text: the reader must now get every value from the blobs alone.
        db.execute("update predictions set features = '{}'")
    blob_only = pd.concat(list(read_log(path, features=["a", "b"], batch_rows=64)), ignore_index=True)
    for column in ("a", "b"):
        np.testing.assert_array_equal(blob_only[column].to_numpy(), fast[column].to_numpy())
    np.testing.assert_array_equal(fast["a"].to_numpy(), slow["a"].to_numpy())
