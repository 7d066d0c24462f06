"""Slices find the weak segment, respect support, and rank the costliest errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keel.errors import TrainingError
from keel.evaluate.metrics import make_row_costs, roc_auc
from keel.evaluate.slices import costliest_errors, slice_metrics, worst_slices


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    n = 4000
    frame = pd.DataFrame({
        "channel": rng.choice(["web", "shop", "phone"], n, p=[0.45, 0.45, 0.1]),
        "amount": rng.exponential(50, n),
        "tiny": np.where(np.arange(n) < 12, "rare", "common"),
        "time": pd.date_range("2024-01-01", periods=n, freq="15min"),
    })
    frame.loc[::50, "amount"] = np.nan
    y = (rng.random(n) < 0.1).astype(int)
    signal = np.where(frame["channel"] == "phone", 0.0, 0.4)  # the model is blind on phone orders
    s = np.clip(rng.normal(0.3 + signal * y, 0.1), 0, 1)
    return frame, y, s


def test_segments_and_values(scored):
    frame, y, s = scored
    table = slice_metrics(frame, y, s, features=["channel", "amount"], threshold=0.5, time=frame["time"])
    ch = table[table.dimension == "channel"].set_index("segment")
    assert set(ch.index) == {"web", "shop", "phone"}
    phone = (frame["channel"] == "phone").to_numpy()
    assert ch.loc["phone", "roc_auc"] == pytest.approx(roc_auc(y[phone], s[phone]))
    assert ch["rows"].sum() == len(y)
    amount = table[table.dimension == "amount"]
    assert "missing" in set(amount.segment) and len(amount) == 6  # 5 quantile bins + missing
    assert (table.dimension == "period").sum() == frame["time"].dt.floor("D").nunique()


def test_worst_slice_is_the_blind_segment_and_support_filters(scored):
    frame, y, s = scored
    table = slice_metrics(frame, y, s, features=["channel", "tiny"], threshold=0.5)
    worst = worst_slices(table, "roc_auc", min_support=100, n=3)
    assert worst.iloc[0]["segment"] == "phone"
    assert "rare" not in set(worst_slices(table, "roc_auc", min_support=100, n=50).segment)
    with pytest.raises(TrainingError, match="Unknown slice metric"):
        worst_slices(table, "accuracy")


def test_costs_per_slice_and_costliest_errors(scored):
    frame, y, s = scored
    amount = frame["amount"].fillna(0).to_numpy()
    costs = make_row_costs(len(y), false_negative=amount, false_positive=2.0, true_positive=2.0)
    table = slice_metrics(frame, y, s, features=["channel"], threshold=0.5, costs=costs)
    assert table["cost_share"].sum() == pytest.approx(1.0)
    assert worst_slices(table, "expected_cost", n=1).iloc[0]["segment"] == "phone"
    top = costliest_errors(frame, y, s, threshold=0.5, costs=costs, n=5, columns=["channel", "amount"])
    assert len(top) == 5 and top["cost"].is_monotonic_decreasing
    missed = (y == 1) & (s < 0.5)
    assert top["cost"].iloc[0] == pytest.approx(amount[missed].max())
    assert set(top["error"]) <= {"false_negative", "false_positive"}


def test_slice_errors(scored):
    frame, y, s = scored
    with pytest.raises(TrainingError, match="not in the frame"):
        slice_metrics(frame, y, s, features=["nope"], threshold=0.5)
    with pytest.raises(TrainingError, match="rows"):
        slice_metrics(frame.iloc[:10], y, s, features=["channel"], threshold=0.5)
