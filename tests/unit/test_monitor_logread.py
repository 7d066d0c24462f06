"""The fast log reader gives exactly what decoding each logged row's JSON gives, whatever the rows look like."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import MonitorError
from keel.monitor.logread import features_pattern, read_log
from keel.serve.predlog import PredictionLog, read_predictions

FEATURES = ["amount", "night", "nb_tx"]
T0 = datetime(2018, 9, 1)


def _write(path: Path, n: int = 120, *, odd: bool = True) -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        feats: dict | None = {"amount": float(rng.gamma(2, 30)), "night": float(i % 2), "nb_tx": float(i % 7)}
        if odd and i == 5:
            feats = None                                            # a fallback row without features
        elif odd and i == 17:
            feats = {"nb_tx": 3.0, "amount": 1.5, "night": 0.0}     # another key order
        elif odd and i == 18:
            feats = {"amount": 2.5, "night": None, "nb_tx": 1.0, "new": 4.0}  # a null and an extra key
        elif odd and i == 60:
            feats = {"amount": 7.0, "night": 1.0}                   # a missing key
        score = None if odd and i == 9 else float(rng.random() * 1e-3 + 1 / 3)
        records.append({
            "request_id": f"r{i}", "time": T0 + timedelta(hours=i), "event_time": T0 + timedelta(hours=i),
            "event_id": str(i), "decision": "review" if i % 3 == 0 else 'say "no"',
            "inputs": {"customer_id": i % 4, "tx_amount": round(float(rng.gamma(2, 30)), 2),
                       "who": "a:b,c" if i % 11 == 0 else "x"},
            "features": feats, "score": score, "fallback": i == 5, "fallback_reason": "model_error" if i == 5 else None,
            "latency_ms": float(rng.gamma(2, 2)),
        })
    with PredictionLog(path) as log:
        log.append_many(records)
        log.add_labels([(str(i), float(i % 5 == 0), T0 + timedelta(hours=i, days=2)) for i in range(0, n, 2)])


def _expected(path: Path, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    return read_predictions(path, start, end)  # the serving module's own reader: json.loads per row


@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_read_log_equals_decoding_each_row(tmp_path: Path, batch_rows: int) -> None:
    path = tmp_path / "p.sqlite"
    _write(path)
    got = pd.concat(list(read_log(path, features=FEATURES, inputs=["customer_id", "tx_amount", "who"],
                                  batch_rows=batch_rows, columns=("seq", "event_time", "time", "score", "decision",
                                                                  "fallback", "fallback_reason", "latency_ms"))),
                    ignore_index=True)
    want = _expected(path)
    assert len(got) == len(want) == 120
    assert (got["seq"].to_numpy() == want["seq"].to_numpy()).all()
    for col in ("event_time", "time", "decision", "fallback", "fallback_reason"):
        assert got[col].tolist() == want[col].tolist(), col
    # Reals round-trip exactly (17 significant digits), NULL stays missing.
    assert np.array_equal(got["score"].to_numpy(), want["score"].to_numpy(), equal_nan=True)
    assert np.array_equal(got["latency_ms"].to_numpy(), want["latency_ms"].to_numpy())
    for f in FEATURES:
        assert np.array_equal(got[f].to_numpy(dtype=float), want[f].to_numpy(dtype=float), equal_nan=True), f
    assert np.isnan(got.loc[5, "amount"]) and got.loc[17, "nb_tx"] == 3.0 and np.isnan(got.loc[18, "night"])
    assert np.isnan(got.loc[60, "nb_tx"])
    inputs = pd.DataFrame(want["inputs"].tolist())
    assert got["input.customer_id"].astype(str).tolist() == inputs["customer_id"].astype(str).tolist()
    assert np.array_equal(got["input.tx_amount"].to_numpy(dtype=float), inputs["tx_amount"].to_numpy(dtype=float))
    assert got["input.who"].tolist() == inputs["who"].tolist()


def test_string_features_fall_back_to_per_row_decoding(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    with PredictionLog(path) as log:
        for i in range(30):
            log.append({"request_id": f"r{i}", "event_time": T0 + timedelta(minutes=i), "decision": "approve",
                        "features": {"amount": float(i), "channel": "web:1" if i % 2 else "shop,2"}, "score": 0.5})
    got = pd.concat(list(read_log(path, features=["amount", "channel"], batch_rows=8)), ignore_index=True)
    assert got["amount"].tolist() == [float(i) for i in range(30)]
    assert got["channel"].tolist() == ["web:1" if i % 2 else "shop,2" for i in range(30)]


def test_time_range_labels_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    _write(path, odd=False)
    start, end = T0 + timedelta(hours=10), T0 + timedelta(hours=40)
    got = pd.concat(list(read_log(path, features=FEATURES, start=start, end=end, labels=True, batch_rows=9)),
                    ignore_index=True)
    assert got["event_time"].min() == start and got["event_time"].max() == end - timedelta(hours=1)
    assert len(got) == 30 and len(got) == len(_expected(path, start, end))
    labelled = got["label"].notna().to_numpy()
    assert labelled.tolist() == [i % 2 == 0 for i in range(10, 40)]
    assert (got.loc[labelled, "at"] == got.loc[labelled, "event_time"] + timedelta(days=2)).all()
    assert got.loc[labelled, "label"].tolist() == [float(i % 5 == 0) for i in range(10, 40, 2)]
    assert list(read_log(path, start=T0 + timedelta(days=30))) == []
    with pytest.raises(MonitorError, match="No prediction log"):
        list(read_log(tmp_path / "none.sqlite"))
    with pytest.raises(MonitorError, match="unknown log columns"):
        list(read_log(path, columns=("seq", "nope")))


def test_features_pattern_escapes_glob_characters() -> None:
    assert features_pattern(["a*", "b"]) == '{"a[*]":*,"b":*}'
