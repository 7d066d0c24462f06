"""Leakage checks: each finding names the column and says why it is suspicious.

:func:`check_leakage` runs every check that its inputs allow and returns a list of :class:`Finding`;
:func:`raise_on_severe` turns severe findings into a :class:`LeakageError` unless leakage is allowed
(``models.allow_leakage``).

Checks (``severe`` stops training, ``warning`` goes in the report):

- ``single_feature_auc`` (severe): one feature alone ranks the label with AUC >= ``auc_threshold``
  in either direction (categorical columns via out-of-fold target rates, so ids do not trip it).
- ``function_of_label`` (severe): the column is nonzero/non-null exactly when the label is positive
  (like ``tx_fraud_scenario``), or its few distinct values each map to one label.
- ``feature_after_event`` (severe): a feature's timestamp is later than the row's event time.
- ``same_row_in_train_and_test`` (severe): an id appears on both sides of the split.
- ``entity_in_train_and_test`` (warning): entities shared across splits (expected in time splits of
  recurring customers; a problem when rows of one entity are split at random).
- ``duplicate_rows_across_splits`` (warning; severe above ``duplicate_severe_share`` of test rows).
- ``unavailable_at_prediction`` (severe): the spec marks the feature unavailable when predicting.

Example::

    findings = check_leakage(X_train, y_train, test=X_test, id_column="transaction_id",
                             unavailable=spec.data.exclude)
    raise_on_severe(findings, allow=spec.models.allow_leakage)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from keel.errors import LeakageError, TrainingError
from keel.evaluate.metrics import _auc_sorted, _labels, _sorted


@dataclass(frozen=True)
class Finding:
    """One leakage finding: how bad, which check, which column, and why (with the number behind it)."""

    severity: Literal["severe", "warning"]
    check: str
    column: str | None
    reason: str
    value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"column {self.column!r}" if self.column else "the split"
        return f"[{self.severity}] {where}: {self.reason}"


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    _, ys, last = _sorted(y, s)
    return _auc_sorted(ys, None, last)


def _oof_target_rate(values: pd.Series, y: np.ndarray, seed: int) -> np.ndarray:
    """Out-of-fold positive rate of each row's category (2 folds), smoothed toward the prior."""
    codes = pd.factorize(values.astype("string").fillna("<NA>"))[0]
    fold = np.random.default_rng(seed).integers(0, 2, len(y))
    prior = y.mean()
    out = np.empty(len(y))
    for f in (0, 1):
        fit = fold != f
        pos = np.bincount(codes[fit], weights=y[fit], minlength=codes.max() + 1)
        cnt = np.bincount(codes[fit], minlength=codes.max() + 1)
        rate = (pos + 10 * prior) / (cnt + 10)
        out[fold == f] = rate[codes[fold == f]]
    return out


def single_feature_auc(
    X: pd.DataFrame, y: Any, *, columns: Sequence[str] | None = None, seed: int = 0
) -> pd.DataFrame:
    """AUC of each column used alone as a score (max of both directions), for leakage and the report.

    Numeric and bool columns score by value (missing values rank lowest); other columns by
    out-of-fold category positive rate. Returns columns ``column``, ``auc`` (in [0.5, 1]), ``direction``.
    """
    yy = _labels(y)
    if len(yy) != len(X):
        raise TrainingError(f"The labels have {len(yy)} rows but the features have {len(X)}.")
    if yy.min() == yy.max():
        raise TrainingError("Leakage checks need both classes in the labels; got one class only.")
    rows = []
    for column in columns if columns is not None else list(X.columns):
        v = X[column]
        if pd.api.types.is_bool_dtype(v) or pd.api.types.is_numeric_dtype(v):
            s = v.to_numpy(dtype=np.float64, na_value=np.nan)
            if np.isnan(s).all():
                continue
            s = np.where(np.isnan(s), np.nanmin(s) - 1, s)
        elif pd.api.types.is_datetime64_any_dtype(v):
            continue
        else:
            s = _oof_target_rate(v, yy, seed)
        auc = _auc(yy, s)
        rows.append({"column": column, "auc": max(auc, 1 - auc), "direction": "higher" if auc >= 0.5 else "lower"})
    return pd.DataFrame(rows, columns=["column", "auc", "direction"])


def _function_of_label(X: pd.DataFrame, yy: np.ndarray, columns: Iterable[str], max_levels: int) -> list[Finding]:
    out = []
    pos = yy == 1
    for column in columns:
        v = X[column]
        if pd.api.types.is_datetime64_any_dtype(v):
            continue
        present = v.notna().to_numpy()
        if pd.api.types.is_numeric_dtype(v) or pd.api.types.is_bool_dtype(v):
            present &= v.fillna(0).to_numpy(dtype=np.float64) != 0
        if (present == pos).all() or (present == ~pos).all():
            which = "nonzero/present exactly when" if (present == pos).all() else "zero/missing exactly when"
            out.append(Finding("severe", "function_of_label", column,
                               f"is {which} the label is positive; it is written from the outcome."
                               " Exclude it (data.exclude).", 1.0))
            continue
        levels = v.nunique(dropna=False)
        # Purity by chance is likely on tiny tables: demand a few rows of each class.
        if 1 < levels <= max_levels and min(pos.sum(), (~pos).sum()) >= 10:
            per = pd.Series(yy).groupby(v.astype("string").fillna("<NA>").to_numpy()).agg(["min", "max"])
            if (per["min"] == per["max"]).all():
                out.append(Finding("severe", "function_of_label", column,
                                   f"each of its {levels} values maps to a single label value: it determines"
                                   " the label. Exclude it unless it is truly known before the event.", 1.0))
    return out


def _row_keys(frame: pd.DataFrame) -> pd.Series:
    return pd.util.hash_pandas_object(frame, index=False)


def check_leakage(
    train: pd.DataFrame,
    y: Any,
    *,
    features: Sequence[str] | None = None,
    test: pd.DataFrame | None = None,
    id_column: str | None = None,
    entity_columns: Sequence[str] = (),
    event_time: Any = None,
    feature_times: pd.DataFrame | None = None,
    unavailable: Iterable[str] = (),
    auc_threshold: float = 0.98,
    max_levels: int = 20,
    duplicate_severe_share: float = 0.05,
    seed: int = 0,
) -> list[Finding]:
    """Run the leakage checks the inputs allow; findings sorted severe first.

    Args:
        train: training rows (features, optionally the id/entity columns), with labels ``y`` (n,).
        features: the model inputs (default: every column except ``id_column`` and ``entity_columns``).
        test: test rows (same columns) for the split checks (ids, entities, duplicates).
        event_time, feature_times: each row's event time (n,) and a frame (n rows) of the time each
            feature value was computed from (columns named by feature); any later than the event is severe.
        unavailable: columns the spec says are not known at prediction time (e.g. ``data.exclude``).
        auc_threshold: a single feature at or above this AUC is severe (``models.leakage_auc``).
    """
    if not 0.5 < auc_threshold <= 1:
        raise TrainingError(f"auc_threshold must be in (0.5, 1]. Got {auc_threshold} instead.")
    yy = _labels(y)
    if len(yy) != len(train):
        raise TrainingError(f"The labels have {len(yy)} rows but the training frame has {len(train)}.")
    skip = {id_column, *entity_columns} - {None}
    feats = list(features) if features is not None else [c for c in train.columns if c not in skip]
    missing = [c for c in feats if c not in train.columns]
    if missing:
        raise TrainingError(f"Leakage check: the features {missing} are not in the training frame.")
    findings: list[Finding] = []

    for column in sorted(set(feats) & set(unavailable)):
        findings.append(Finding("severe", "unavailable_at_prediction", column,
                                "is used as a feature but the spec marks it unavailable at prediction time"
                                " (data.exclude); drop it from the features."))

    if yy.min() != yy.max():
        findings += _function_of_label(train, yy, feats, max_levels)
        flagged = {f.column for f in findings if f.check == "function_of_label"}
        for row in single_feature_auc(train, yy, columns=feats, seed=seed).itertuples():
            if row.auc >= auc_threshold and row.column not in flagged:
                findings.append(Finding("severe", "single_feature_auc", str(row.column),
                                        f"alone reaches AUC {row.auc:.3f} ({row.direction} values mean positive),"
                                        f" at or above {auc_threshold}; a single honest feature rarely does.",
                                        float(row.auc)))

    if feature_times is not None:
        if event_time is None:
            raise TrainingError("feature_times needs event_time (the event time of each row).")
        ev = pd.to_datetime(pd.Series(np.asarray(event_time))).to_numpy(dtype="datetime64[ns]")
        if len(ev) != len(feature_times):
            raise TrainingError("event_time and feature_times must have the same number of rows.")
        for column in feature_times.columns:
            ft = pd.to_datetime(feature_times[column]).to_numpy(dtype="datetime64[ns]")
            with np.errstate(invalid="ignore"):
                late = (ft > ev) & ~np.isnat(ft)
            if late.any():
                worst = pd.Timedelta((ft[late] - ev[late]).max())
                findings.append(Finding("severe", "feature_after_event", str(column),
                                        f"uses data from after the event on {int(late.sum())} rows (up to {worst}"
                                        " later); a prediction cannot see the future.", float(late.mean())))

    if test is not None:
        if id_column is not None and id_column in train.columns and id_column in test.columns:
            shared = np.intersect1d(train[id_column].dropna().unique(), test[id_column].dropna().unique())
            if len(shared):
                findings.append(Finding("severe", "same_row_in_train_and_test", id_column,
                                        f"{len(shared)} ids appear in both train and test (e.g. {shared[0]!r});"
                                        " the test is not unseen data.", float(len(shared))))
        for column in entity_columns:
            if column in train.columns and column in test.columns:
                seen = test[column].isin(set(train[column].dropna().unique())).mean()
                if seen > 0:
                    findings.append(Finding("warning", "entity_in_train_and_test", column,
                                            f"{seen:.0%} of test rows belong to entities also in train; fine for"
                                            " a time split, leakage if one entity's rows were split at random.",
                                            float(seen)))
        cols = [c for c in feats if c in test.columns]
        if cols and len(test):
            dup = _row_keys(test[cols]).isin(set(_row_keys(train[cols]))).to_numpy()
            share = float(dup.mean())
            if dup.any():
                severity: Literal["severe", "warning"] = "severe" if share >= duplicate_severe_share else "warning"
                findings.append(Finding(severity, "duplicate_rows_across_splits", None,
                                        f"{int(dup.sum())} test rows ({share:.1%}) repeat a training row's"
                                        " feature values exactly; deduplicate or split by entity.", share))
    order = {"severe": 0, "warning": 1}
    return sorted(findings, key=lambda f: (order[f.severity], f.check, f.column or ""))


def raise_on_severe(findings: Sequence[Finding], *, allow: bool = False) -> None:
    """Raise :class:`LeakageError` listing every severe finding, unless ``allow`` (models.allow_leakage)."""
    severe = [f for f in findings if f.severity == "severe"]
    if severe and not allow:
        lines = "\n  - ".join(str(f) for f in severe)
        raise LeakageError(
            f"Training stopped: {len(severe)} severe leakage finding{'s' if len(severe) > 1 else ''}:\n  - {lines}",
            hint="Fix the data or features, or set models.allow_leakage = true to proceed knowingly.",
        )


__all__ = ["Finding", "check_leakage", "raise_on_severe", "single_feature_auc"]
