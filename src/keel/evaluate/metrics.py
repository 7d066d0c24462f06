"""Metrics that match the decision, with bootstrap intervals.

Every function takes 1-D arrays of equal length ``n``: ``y`` (0/1 or bool labels), ``scores`` (floats,
higher = more likely positive) and optional ``sample_weight``. Ranking metrics agree with scikit-learn
(``roc_auc_score``, ``average_precision_score``, ``brier_score_loss``, ``log_loss``). Impossible input
(mismatched lengths, NaN scores, one class only for a ranking metric) raises :class:`TrainingError`.

Example::

    auc = roc_auc(y_test, p_test)
    cm = confusion(y_test, p_test, threshold=0.3)           # Confusion(tp, fp, fn, tn) with precision...
    costs = row_costs(spec.decision.costs, test_frame)       # per-row FP/FN/TP/TN costs
    cost = expected_cost(y_test, p_test, 0.3, costs)         # per event
    cp = card_precision_at_k(p_test, y_test, entity=cards, period=days, k=100)
    ci = bootstrap("average_precision", y_test, p_test, n=200, seed=42)   # Interval(estimate, low, high)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from keel import expressions
from keel.errors import TrainingError

if TYPE_CHECKING:
    from keel.spec import Costs

# --- input checks -------------------------------------------------------------------------------------


def _labels(y: Any, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise TrainingError(f"The labels '{name}' must be 1-D. Got shape {arr.shape} instead.")
    if arr.dtype == bool:
        return arr.astype(np.float64)
    try:
        out = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise TrainingError(f"The labels '{name}' must be 0/1 or bool. Got dtype {arr.dtype} instead.") from None
    bad = ~np.isin(out, (0.0, 1.0))
    if bad.any():
        raise TrainingError(
            f"The labels '{name}' must be 0/1 or bool. Got {int(bad.sum())} other values"
            f" (e.g. {out[bad][0]!r}); map the positive label to 1 first."
        )
    return out


def _scores(s: Any, n: int, name: str = "scores") -> np.ndarray:
    arr = np.asarray(s, dtype=np.float64)
    if arr.shape != (n,):
        raise TrainingError(f"'{name}' has shape {arr.shape} but the labels have {n} rows; they must match.")
    if np.isnan(arr).any():
        raise TrainingError(
            f"'{name}' holds {int(np.isnan(arr).sum())} NaN values; a model must score every row."
        )
    return arr


def _weights(w: Any, n: int) -> np.ndarray | None:
    if w is None:
        return None
    arr = np.asarray(w, dtype=np.float64)
    if arr.shape != (n,) or (arr < 0).any() or np.isnan(arr).any():
        raise TrainingError(f"sample_weight must be {n} non-negative numbers.")
    return arr


def _check(y: Any, s: Any, w: Any = None, *, both_classes: bool = False) -> tuple[np.ndarray, ...]:
    yy = _labels(y)
    if len(yy) == 0:
        raise TrainingError("A metric needs at least one row; the evaluation set is empty.")
    ss = _scores(s, len(yy))
    ww = _weights(w, len(yy))
    if both_classes:
        pos = yy.sum() if ww is None else (yy * ww).sum()
        neg = (1 - yy).sum() if ww is None else ((1 - yy) * ww).sum()
        if pos == 0 or neg == 0:
            raise TrainingError(
                f"This ranking metric needs both classes; the evaluation set has only"
                f" {'negatives' if pos == 0 else 'positives'} ({len(yy)} rows). Use a longer window."
            )
    return yy, ss, ww  # type: ignore[return-value]


# --- ranking metrics (fast, on rows pre-sorted by decreasing score) ----------------------------------


def _sorted(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # last index of each tie group
    return order, y[order], last


def _curve(ys: np.ndarray, w: np.ndarray | None, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if w is None:
        tps = np.cumsum(ys)[last]
        fps = (last + 1) - tps
    else:
        tps = np.cumsum(ys * w)[last]
        fps = np.cumsum(w)[last] - tps
    return tps, fps


def _auc_sorted(ys: np.ndarray, w: np.ndarray | None, last: np.ndarray) -> float:
    tps, fps = _curve(ys, w, last)
    p, n = tps[-1], fps[-1]
    if p <= 0 or n <= 0:
        return float("nan")
    # Trapezoids between consecutive thresholds; ties count half, as in scikit-learn.
    area = np.sum(np.diff(np.r_[0.0, fps]) * (tps + np.r_[0.0, tps[:-1]])) / 2
    return float(area / (p * n))


def _ap_sorted(ys: np.ndarray, w: np.ndarray | None, last: np.ndarray) -> float:
    tps, fps = _curve(ys, w, last)
    p = tps[-1]
    if p <= 0:
        return float("nan")
    denom = tps + fps
    precision = np.divide(tps, denom, out=np.zeros_like(tps, dtype=float), where=denom > 0)
    return float(np.sum(np.diff(np.r_[0.0, tps]) / p * precision))


def roc_auc(y: Any, scores: Any, sample_weight: Any = None) -> float:
    """Area under the ROC curve (ties count half); equals ``sklearn.metrics.roc_auc_score``."""
    yy, ss, ww = _check(y, scores, sample_weight, both_classes=True)
    order, ys, last = _sorted(yy, ss)
    return _auc_sorted(ys, None if ww is None else ww[order], last)


def average_precision(y: Any, scores: Any, sample_weight: Any = None) -> float:
    """Average precision (step-wise area under PR); equals ``sklearn.metrics.average_precision_score``."""
    yy, ss, ww = _check(y, scores, sample_weight, both_classes=True)
    order, ys, last = _sorted(yy, ss)
    return _ap_sorted(ys, None if ww is None else ww[order], last)


def _probabilities(p: np.ndarray) -> np.ndarray:
    if (p < 0).any() or (p > 1).any():
        raise TrainingError(
            f"Probabilities must lie in [0, 1]; got values from {p.min():.4g} to {p.max():.4g}."
            " Calibrate the scores first (keel.evaluate.calibration)."
        )
    return p


def brier(y: Any, proba: Any, sample_weight: Any = None) -> float:
    """Mean squared error of probabilities; equals ``sklearn.metrics.brier_score_loss``."""
    yy, pp, ww = _check(y, proba, sample_weight)
    return float(np.average((_probabilities(pp) - yy) ** 2, weights=ww))


def log_loss(y: Any, proba: Any, sample_weight: Any = None, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood, probabilities clipped to ``[eps, 1-eps]``."""
    yy, pp, ww = _check(y, proba, sample_weight)
    p = np.clip(_probabilities(pp), eps, 1 - eps)
    return float(np.average(-(yy * np.log(p) + (1 - yy) * np.log1p(-p)), weights=ww))


def expected_calibration_error(
    y: Any, proba: Any, bins: int = 10, strategy: str = "uniform", sample_weight: Any = None
) -> float:
    """ECE: sum over bins of (bin share) x |observed rate - mean probability|. See :func:`reliability`."""
    table = reliability(y, proba, bins=bins, strategy=strategy, sample_weight=sample_weight)
    total = table["weight"].sum()
    return float((table["weight"] / total * (table["observed"] - table["predicted"]).abs()).sum())


def reliability(
    y: Any, proba: Any, bins: int = 10, strategy: str = "uniform", sample_weight: Any = None
) -> pd.DataFrame:
    """Reliability-diagram data: one row per non-empty bin.

    Columns: ``bin``, ``lower``, ``upper``, ``predicted`` (mean probability), ``observed`` (positive
    rate), ``count`` (rows), ``weight``. ``strategy`` is 'uniform' (equal-width on [0, 1]) or 'quantile'.
    """
    yy, pp, ww = _check(y, proba, sample_weight)
    pp = _probabilities(pp)
    if bins < 1:
        raise TrainingError(f"bins must be at least 1. Got {bins} instead.")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, bins + 1)
    elif strategy == "quantile":
        edges = np.unique(np.quantile(pp, np.linspace(0, 1, bins + 1)))
        edges[0], edges[-1] = 0.0, 1.0
    else:
        raise TrainingError(f"strategy must be 'uniform' or 'quantile'. Got {strategy!r} instead.")
    idx = np.clip(np.searchsorted(edges, pp, side="right") - 1, 0, len(edges) - 2)
    w = np.ones_like(pp) if ww is None else ww
    k = len(edges) - 1
    weight = np.bincount(idx, weights=w, minlength=k)
    count = np.bincount(idx, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(idx, weights=w * pp, minlength=k) / weight
        observed = np.bincount(idx, weights=w * yy, minlength=k) / weight
    table = pd.DataFrame({
        "bin": np.arange(k), "lower": edges[:-1], "upper": edges[1:], "predicted": predicted,
        "observed": observed, "count": count, "weight": weight,
    })
    return table[table["weight"] > 0].reset_index(drop=True)


# --- threshold metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Confusion counts at a threshold (``score >= threshold`` is a positive decision)."""

    tp: float
    fp: float
    fn: float
    tn: float

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp > 0 else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn > 0 else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    @property
    def positive_rate(self) -> float:
        total = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.fp) / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn, "precision": self.precision,
            "recall": self.recall, "f1": self.f1, "positive_rate": self.positive_rate,
        }


def confusion(y: Any, scores: Any, threshold: float, sample_weight: Any = None) -> Confusion:
    """Counts of TP/FP/FN/TN when ``scores >= threshold`` means a positive decision."""
    yy, ss, ww = _check(y, scores, sample_weight)
    pred = ss >= threshold
    w = np.ones_like(yy) if ww is None else ww
    pos = yy == 1
    return Confusion(
        tp=float(w[pred & pos].sum()), fp=float(w[pred & ~pos].sum()),
        fn=float(w[~pred & pos].sum()), tn=float(w[~pred & ~pos].sum()),
    )


def precision_recall_f1(y: Any, scores: Any, threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) at ``threshold``; 0 when undefined (no positive decisions or labels)."""
    cm = confusion(y, scores, threshold)
    return cm.precision, cm.recall, cm.f1


# --- costs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCosts:
    """Per-row cost of each outcome, arrays of shape (n,) (scalars are broadcast by :func:`row_costs`)."""

    false_positive: np.ndarray
    false_negative: np.ndarray
    true_positive: np.ndarray
    true_negative: np.ndarray

    def __len__(self) -> int:
        return len(self.false_positive)

    def take(self, index: Any) -> RowCosts:
        """The costs of a subset of rows (boolean mask or index array)."""
        return RowCosts(*(np.asarray(a)[index] for a in self._arrays()))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.false_positive, self.false_negative, self.true_positive, self.true_negative)

    def per_row(self, y: np.ndarray, decision: np.ndarray) -> np.ndarray:
        """Cost each row incurs given labels and 0/1 decisions."""
        pos = np.asarray(y) == 1
        act = np.asarray(decision).astype(bool)
        return np.where(
            act, np.where(pos, self.true_positive, self.false_positive),
            np.where(pos, self.false_negative, self.true_negative),
        )


def make_row_costs(
    n: int, *, false_positive: Any = 0.0, false_negative: Any = 0.0, true_positive: Any = 0.0,
    true_negative: Any = 0.0,
) -> RowCosts:
    """Build :class:`RowCosts` from scalars or arrays of length ``n``; raise on NaN or negative costs."""
    out = []
    for name, value in (("false_positive", false_positive), ("false_negative", false_negative),
                        ("true_positive", true_positive), ("true_negative", true_negative)):
        arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)) if np.ndim(value) == 0 else (
            np.asarray(value, dtype=np.float64))
        if arr.shape != (n,):
            raise TrainingError(f"The {name} cost has {arr.shape[0]} values but there are {n} rows.")
        if np.isnan(arr).any() or (arr < 0).any():
            raise TrainingError(
                f"The {name} cost must be a non-negative number on every row; "
                f"{int(np.isnan(arr).sum() + (arr < 0).sum())} rows are NaN or negative."
            )
        out.append(np.array(arr))
    return RowCosts(*out)


def row_costs(costs: Costs, frame: Mapping[str, Any] | pd.DataFrame, n: int | None = None) -> RowCosts:
    """Evaluate the spec's ``decision.costs`` (numbers or column expressions) on each row of ``frame``."""
    if n is None:
        n = len(frame) if isinstance(frame, pd.DataFrame) else len(next(iter(frame.values())))
    values: dict[str, Any] = {}
    for name in ("false_positive", "false_negative", "true_positive", "true_negative"):
        value = getattr(costs, name)
        if isinstance(value, str):
            try:
                cols = {c: np.asarray(frame[c]) for c in expressions.columns(value) if c in frame}
                values[name] = expressions.evaluate(value, cols) if cols else expressions.evaluate(
                    value, {"__n": np.zeros(n)})
            except expressions.ExpressionError as exc:
                raise TrainingError(f"The 'decision.costs.{name}' expression {exc}.") from None
        else:
            values[name] = float(value)
    return make_row_costs(n, **values)


def expected_cost(y: Any, scores: Any, threshold: float, costs: RowCosts) -> float:
    """Mean cost per event when acting on ``scores >= threshold`` (per-row costs may differ)."""
    yy, ss, _ = _check(y, scores)
    if len(costs) != len(yy):
        raise TrainingError(f"The costs cover {len(costs)} rows but there are {len(yy)} labels.")
    return float(costs.per_row(yy, ss >= threshold).mean())


# --- Card Precision@k ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionAtK:
    """Card Precision@k: ``mean`` over periods of ``per_period`` (share of the top-k entities that were
    positive). ``positives_per_period`` counts positive entities left after removing earlier detections."""

    mean: float
    per_period: np.ndarray
    periods: np.ndarray
    positives_per_period: np.ndarray
    k: int


def period_index(
    times: Any, per: timedelta = timedelta(days=1), origin: datetime | None = None
) -> np.ndarray:
    """Integer period of each event: ``floor((t - origin) / per)``; origin defaults to midnight of the
    first event's day."""
    try:
        ts = pd.to_datetime(pd.Series(np.asarray(times)))
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"Event times cannot be read as timestamps: {exc}.") from None
    if ts.isna().any():
        raise TrainingError("Event times hold missing values; every row needs a time for per-period metrics.")
    ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    step = int(pd.Timedelta(per).value)
    start = int(pd.Timestamp(origin).value) if origin is not None else (ns.min() // 86_400_000_000_000) * 86_400_000_000_000
    return (ns - start) // step


def card_precision_at_k(
    scores: Any,
    y: Any,
    *,
    entity: Any,
    period: Any,
    k: int = 100,
    remove_detected: bool = True,
    seed: int = 0,
) -> PrecisionAtK:
    """Card Precision@k with the fraud handbook's semantics.

    Per period (e.g. day, ascending): each entity's max score and max label; the ``k`` entities with the
    highest scores; precision = positives among them / ``k`` (not / min(k, entities)). Positive entities
    found in the top-k are removed from later periods (``remove_detected``). The result is the mean over
    periods. Ties in score are broken in a random order fixed by ``seed``, so a constant scorer gets the
    chance level (about 0.017 on the handbook test week) rather than an id-order artefact.

    Args: ``scores``, ``y``, ``entity`` (e.g. card ids), ``period`` (e.g. :func:`period_index`), all (n,).
    """
    yy, ss, _ = _check(y, scores)
    if k < 1:
        raise TrainingError(f"k must be at least 1. Got {k} instead.")
    ent = np.asarray(entity)
    per = np.asarray(period)
    if ent.shape != yy.shape or per.shape != yy.shape:
        raise TrainingError("entity and period must have one value per row, like the labels.")
    frame = pd.DataFrame({"p": per, "e": ent, "s": ss, "y": yy})
    agg = frame.groupby(["p", "e"], sort=True).agg(s=("s", "max"), y=("y", "max")).reset_index()
    rng = np.random.default_rng(seed)
    detected: set[Any] = set()
    periods, values, positives = [], [], []
    for p, day in agg.groupby("p", sort=True):
        if remove_detected and detected:
            day = day[~day["e"].isin(detected)]
        order = np.lexsort((rng.random(len(day)), -day["s"].to_numpy()))
        top = day.iloc[order[:k]]
        hits = top.loc[top["y"] == 1, "e"]
        periods.append(p)
        values.append(len(hits) / k)
        positives.append(int((day["y"] == 1).sum()))
        if remove_detected:
            detected.update(hits.tolist())
    per_period = np.asarray(values, dtype=float)
    return PrecisionAtK(
        mean=float(per_period.mean()), per_period=per_period, periods=np.asarray(periods),
        positives_per_period=np.asarray(positives), k=k,
    )


# --- bootstrap ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    failed: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "resamples": self.resamples, "failed": self.failed}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _weighted_mean(values: Any, sample_weight: Any = None) -> float:
    return float(np.average(np.asarray(values, dtype=float), weights=sample_weight))


METRICS: dict[str, Callable[..., float]] = {
    "roc_auc": roc_auc,
    "average_precision": average_precision,
    "brier": brier,
    "log_loss": log_loss,
    "mean": _weighted_mean,
}


def bootstrap(
    metric: str | Callable[..., float],
    *arrays: Any,
    n: int = 200,
    seed: int = 0,
    level: float = 0.95,
    groups: Any = None,
) -> Interval:
    """Percentile bootstrap interval of ``metric(*arrays)``.

    ``metric`` is a name in :data:`METRICS` ('roc_auc', 'average_precision', 'brier', 'log_loss',
    'mean') or any callable ``metric(*arrays, sample_weight=w) -> float``. Rows are resampled with
    replacement (as integer weights, so ranking metrics sort once); with ``groups`` (e.g. the day of
    each row) whole groups are resampled instead. For a per-period metric such as Card Precision@k,
    bootstrap the per-period values over periods::

        cp = card_precision_at_k(p, y, entity=cards, period=days)
        bootstrap("mean", cp.per_period, n=200, seed=42)

    Resamples where the metric is undefined (e.g. one class only) are dropped and counted in
    ``failed``; if more than half fail, :class:`TrainingError`.
    """
    if not arrays:
        raise TrainingError("bootstrap needs the arrays the metric reads (e.g. y, scores).")
    if not 0 < level < 1:
        raise TrainingError(f"level must be between 0 and 1. Got {level} instead.")
    fn = METRICS.get(metric) if isinstance(metric, str) else metric
    if fn is None:
        raise TrainingError(f"Unknown metric {metric!r}; use one of {sorted(METRICS)} or a callable.")
    size = len(np.asarray(arrays[0]))
    if any(len(np.asarray(a)) != size for a in arrays):
        raise TrainingError("bootstrap: every array must have the same length.")
    estimate = float(fn(*arrays))
    rng = np.random.default_rng(seed)
    if groups is not None:
        codes, uniques = pd.factorize(np.asarray(groups), sort=True)
        if len(codes) != size:
            raise TrainingError("bootstrap: groups must have one value per row.")
        n_groups = len(uniques)

        def draw() -> np.ndarray:
            counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
            return counts[codes].astype(float)
    else:
        def draw() -> np.ndarray:
            return np.bincount(rng.integers(0, size, size), minlength=size).astype(float)

    fast = fn in (roc_auc, average_precision) and len(arrays) == 2
    if fast:
        yy, ss, _ = _check(arrays[0], arrays[1], both_classes=True)
        order, ys, last = _sorted(yy, ss)
        kernel = _auc_sorted if fn is roc_auc else _ap_sorted
    values = np.empty(n)
    for i in range(n):
        w = draw()
        if fast:
            values[i] = kernel(ys, w[order], last)
            continue
        try:
            values[i] = fn(*arrays, sample_weight=w)
        except (TrainingError, ZeroDivisionError, ValueError):
            values[i] = np.nan
    ok = values[~np.isnan(values)]
    failed = n - len(ok)
    if n and failed > n / 2:
        raise TrainingError(
            f"The bootstrap of {getattr(fn, '__name__', metric)} failed on {failed} of {n} resamples"
            " (too few positives or groups); report the point estimate without an interval."
        )
    if len(ok) == 0:
        return Interval(estimate, float("nan"), float("nan"), level, 0, failed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ok, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), level, len(ok), failed)


def summary(
    y: Any,
    proba: Any,
    *,
    threshold: float | None = None,
    costs: RowCosts | None = None,
) -> dict[str, float]:
    """The headline metrics in one dict: roc_auc, average_precision, brier, log_loss, ece,
    prevalence, and at ``threshold`` precision/recall/f1/positive_rate (+ expected_cost with costs)."""
    yy, pp, _ = _check(y, proba, both_classes=True)
    out = {
        "rows": float(len(yy)), "prevalence": float(yy.mean()), "roc_auc": roc_auc(yy, pp),
        "average_precision": average_precision(yy, pp),
    }
    if pp.min() >= 0 and pp.max() <= 1:
        out.update(brier=brier(yy, pp), log_loss=log_loss(yy, pp), ece=expected_calibration_error(yy, pp))
    if threshold is not None:
        cm = confusion(yy, pp, threshold)
        out.update(precision=cm.precision, recall=cm.recall, f1=cm.f1, positive_rate=cm.positive_rate)
        if costs is not None:
            out["expected_cost"] = expected_cost(yy, pp, threshold, costs)
    return out


__all__ = [
    "METRICS",
    "Confusion",
    "Interval",
    "PrecisionAtK",
    "RowCosts",
    "average_precision",
    "bootstrap",
    "brier",
    "card_precision_at_k",
    "confusion",
    "expected_calibration_error",
    "expected_cost",
    "log_loss",
    "make_row_costs",
    "period_index",
    "precision_recall_f1",
    "reliability",
    "roc_auc",
    "row_costs",
    "summary",
]
