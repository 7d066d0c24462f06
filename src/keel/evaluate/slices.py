"""Error analysis by slices: where the model is weak, with support, and which errors cost most.

Example::

    table = slice_metrics(test_frame, y_test, p_test, features=["tx_amount", "city"], threshold=0.4,
                          costs=row_costs(spec.decision.costs, test_frame), time=test_frame.tx_datetime)
    worst_slices(table, metric="average_precision", min_support=100, n=5)
    costliest_errors(test_frame, y_test, p_test, threshold=0.4, costs=costs, n=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import TrainingError
from keel.evaluate.metrics import RowCosts, _ap_sorted, _auc_sorted, _check, _sorted

COLUMNS = [
    "dimension", "segment", "rows", "positives", "prevalence", "roc_auc", "average_precision",
    "precision", "recall", "positive_rate", "expected_cost", "cost_share",
]


def _segments(values: pd.Series, bins: int, max_levels: int) -> pd.Series:
    """A label per row: quantile bin for numbers, top categories (+ 'other') otherwise, 'missing' for NaN."""
    if (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            and values.nunique() > max(bins, 2)):
        binned = pd.qcut(values, q=bins, duplicates="drop")
        out = binned.astype("string")
    else:
        out = values.astype("string")
        top = out.value_counts().index[:max_levels]
        out = out.where(out.isin(top) | out.isna(), "other")
    return out.fillna("missing")


def _row(dimension: str, segment: str, y: np.ndarray, s: np.ndarray, threshold: float,
         cost: np.ndarray | None, total_cost: float) -> dict[str, Any]:
    pos = int(y.sum())
    auc = ap = float("nan")
    if 0 < pos < len(y):
        _, ys, last = _sorted(y, s)
        auc, ap = _auc_sorted(ys, None, last), _ap_sorted(ys, None, last)
    act = s >= threshold
    tp = int((act & (y == 1)).sum())
    return {
        "dimension": dimension, "segment": segment, "rows": len(y), "positives": pos,
        "prevalence": pos / len(y), "roc_auc": auc, "average_precision": ap,
        "precision": tp / act.sum() if act.any() else float("nan"),
        "recall": tp / pos if pos else float("nan"), "positive_rate": float(act.mean()),
        "expected_cost": float(cost.mean()) if cost is not None else float("nan"),
        "cost_share": float(cost.sum() / total_cost) if cost is not None and total_cost > 0 else float("nan"),
    }


def slice_metrics(
    frame: pd.DataFrame,
    y: Any,
    scores: Any,
    *,
    features: Sequence[str],
    threshold: float,
    costs: RowCosts | None = None,
    bins: int = 5,
    max_levels: int = 20,
    time: Any = None,
    per: timedelta | str = "D",
) -> pd.DataFrame:
    """Metrics per segment of each feature and, with ``time``, per period.

    Numeric features with more than ``bins`` distinct values are cut into ``bins`` quantile bins;
    others are categories (the ``max_levels`` most frequent, the rest 'other'); NaN is 'missing'.
    ``per`` is a pandas frequency or timedelta for the time dimension (dimension name 'period').
    Returns one row per (dimension, segment) with columns :data:`COLUMNS`; ``roc_auc`` /
    ``average_precision`` are NaN where a segment has one class; ``cost_share`` is the segment's share
    of total cost (needs ``costs``).
    """
    yy, ss, _ = _check(y, scores)
    if len(frame) != len(yy):
        raise TrainingError(f"The frame has {len(frame)} rows but there are {len(yy)} labels.")
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise TrainingError(f"Slices: the features {missing} are not in the frame.")
    cost = costs.per_row(yy, ss >= threshold) if costs is not None else None
    total = float(cost.sum()) if cost is not None else 0.0
    dims: list[tuple[str, pd.Series]] = [
        (f, _segments(frame[f].reset_index(drop=True), bins, max_levels)) for f in features
    ]
    if time is not None:
        t = pd.to_datetime(pd.Series(np.asarray(time)))
        if len(t) != len(yy):
            raise TrainingError("Slices: time must have one value per row.")
        freq = pd.Timedelta(per) if isinstance(per, timedelta) else per
        dims.append(("period", t.dt.floor(freq).dt.strftime("%Y-%m-%d %H:%M").str.replace(" 00:00", "")))
    rows = []
    for name, seg in dims:
        codes, labels = pd.factorize(seg, sort=True)
        for k, label in enumerate(labels):
            m = codes == k
            rows.append(_row(name, str(label), yy[m], ss[m], threshold, None if cost is None else cost[m], total))
    return pd.DataFrame(rows, columns=COLUMNS)


_HIGHER_IS_WORSE = {"expected_cost", "cost_share"}


def worst_slices(
    table: pd.DataFrame, metric: str = "average_precision", *, min_support: int = 30, n: int = 10,
    min_positives: int = 1,
) -> pd.DataFrame:
    """The ``n`` worst segments on ``metric`` among those with at least ``min_support`` rows and
    ``min_positives`` positives (cost metrics: highest first; others: lowest first). Periods included."""
    if metric not in table.columns:
        raise TrainingError(f"Unknown slice metric {metric!r}; use one of {COLUMNS[3:]}.")
    ok = table[(table["rows"] >= min_support) & (table["positives"] >= min_positives)].dropna(subset=[metric])
    return ok.sort_values(metric, ascending=metric not in _HIGHER_IS_WORSE).head(n).reset_index(drop=True)


def costliest_errors(
    frame: pd.DataFrame,
    y: Any,
    scores: Any,
    *,
    threshold: float,
    costs: RowCosts,
    n: int = 20,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The ``n`` wrong decisions (false positives and negatives) that cost most, costliest first.

    Returns the rows' ``columns`` (default: all) plus ``label``, ``score``, ``error`` ('false_negative' /
    'false_positive') and ``cost``.
    """
    yy, ss, _ = _check(y, scores)
    if len(frame) != len(yy) or len(costs) != len(yy):
        raise TrainingError("costliest_errors: frame, labels, scores and costs must have the same rows.")
    act = ss >= threshold
    cost = costs.per_row(yy, act)
    wrong = np.flatnonzero(act != (yy == 1))
    top = wrong[np.argsort(-cost[wrong], kind="stable")[:n]]
    out = frame.iloc[top][list(columns) if columns is not None else list(frame.columns)].copy()
    out["label"] = yy[top].astype(int)
    out["score"] = ss[top]
    out["error"] = np.where(act[top], "false_positive", "false_negative")
    out["cost"] = cost[top]
    return out.reset_index(drop=True)


__all__ = ["COLUMNS", "costliest_errors", "slice_metrics", "worst_slices"]
