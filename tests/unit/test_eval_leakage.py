"""Leakage checks find what they claim, name the column, and stay quiet on honest data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keel.errors import LeakageError, TrainingError
from keel.evaluate.leakage import Finding, check_leakage, raise_on_severe, single_feature_auc


@pytest.fixture
def honest():
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.1).astype(int)
    frame = pd.DataFrame({
        "transaction_id": np.arange(n),
        "customer_id": rng.integers(0, 500, n),
        "amount": rng.exponential(50, n) + 30 * y,
        "weekend": rng.random(n) < 0.3,
        "city": rng.choice(["a", "b", "c"], n),
    })
    return frame, y


def _checks(findings):
    return {(f.check, f.column) for f in findings}


def test_honest_data_has_no_severe_findings(honest):
    frame, y = honest
    findings = check_leakage(frame, y, id_column="transaction_id", entity_columns=["customer_id"])
    assert not [f for f in findings if f.severity == "severe"]
    raise_on_severe(findings)  # does not raise


def test_label_copy_and_scenario_column_are_severe(honest):
    frame, y = honest
    rng = np.random.default_rng(1)
    leaky = frame.assign(
        scenario=np.where(y == 1, rng.integers(1, 4, len(y)), 0),  # like tx_fraud_scenario
        chargeback_amount=np.where(y == 1, frame["amount"], np.nan),
        status=np.where(y == 1, "disputed", "ok"),
        near_copy=y + rng.normal(0, 0.01, len(y)),
    )
    findings = check_leakage(leaky, y, id_column="transaction_id", entity_columns=["customer_id"])
    got = _checks(findings)
    assert ("function_of_label", "scenario") in got
    assert ("function_of_label", "chargeback_amount") in got
    assert ("function_of_label", "status") in got
    assert ("single_feature_auc", "near_copy") in got
    assert all(f.severity == "severe" for f in findings if f.column in {"scenario", "near_copy"})
    with pytest.raises(LeakageError, match="near_copy"):
        raise_on_severe(findings)
    raise_on_severe(findings, allow=True)


def test_single_feature_auc_both_directions_and_ids_do_not_trip(honest):
    frame, y = honest
    table = single_feature_auc(frame.assign(neg=-frame["amount"], row_code=frame["transaction_id"].astype(str)), y)
    by = table.set_index("column")
    assert by.loc["neg", "auc"] == pytest.approx(by.loc["amount", "auc"])
    assert by.loc["neg", "direction"] == "lower" and by.loc["amount", "direction"] == "higher"
    assert by.loc["row_code", "auc"] < 0.6  # a unique id encodes to the prior out of fold


def test_feature_after_event_is_severe():
    t = pd.Series(pd.date_range("2024-01-01", periods=100, freq="h"))
    ft = pd.DataFrame({"avg_7d": t - pd.Timedelta("1h"), "peek": t})
    ft.loc[5, "peek"] = t[5] + pd.Timedelta("2h")
    y = np.r_[np.ones(10), np.zeros(90)]
    frame = pd.DataFrame({"avg_7d": np.arange(100.0) % 7, "peek": np.arange(100.0) % 5})
    findings = check_leakage(frame, y, event_time=t, feature_times=ft)
    late = [f for f in findings if f.check == "feature_after_event"]
    assert [f.column for f in late] == ["peek"] and "1 rows" in late[0].reason


def test_split_checks(honest):
    frame, y = honest
    train, test = frame.iloc[:2000], frame.iloc[1990:]
    findings = check_leakage(train, y[:2000], test=test, id_column="transaction_id", entity_columns=["customer_id"])
    got = {f.check: f for f in findings}
    assert got["same_row_in_train_and_test"].value == 10 and got["same_row_in_train_and_test"].severity == "severe"
    assert got["entity_in_train_and_test"].severity == "warning"
    assert got["duplicate_rows_across_splits"].severity == "warning"  # 10 of 1010 rows < 5 %
    copied = pd.concat([train.iloc[:200], frame.iloc[2000:]]).assign(transaction_id=np.arange(1200) + 10_000)
    dup = {f.check: f for f in check_leakage(train, y[:2000], test=copied, id_column="transaction_id")}
    assert dup["duplicate_rows_across_splits"].severity == "severe"
    assert "same_row_in_train_and_test" not in dup


def test_unavailable_features_are_named(honest):
    frame, y = honest
    findings = check_leakage(frame, y, features=["amount", "city"], unavailable=["city", "other"])
    assert [str(f) for f in findings if f.check == "unavailable_at_prediction"] == [
        "[severe] column 'city': is used as a feature but the spec marks it unavailable at prediction time"
        " (data.exclude); drop it from the features."
    ]


def test_bad_input_raises(honest):
    frame, y = honest
    with pytest.raises(TrainingError, match="rows"):
        check_leakage(frame, y[:10])
    with pytest.raises(TrainingError, match="not in the training frame"):
        check_leakage(frame, y, features=["nope"])
    with pytest.raises(TrainingError, match="auc_threshold"):
        check_leakage(frame, y, auc_threshold=0.4)


def test_finding_is_plain_data():
    f = Finding("warning", "x", "col", "why", 0.5)
    assert f.as_dict() == {"severity": "warning", "check": "x", "column": "col", "reason": "why", "value": 0.5}
