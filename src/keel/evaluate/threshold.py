"""Decision threshold from the decision: minimum expected cost, within review capacity.

A row gets the positive action when ``score >= threshold``. :func:`choose_threshold` evaluates every
distinct validation score as a cut-off in one sorted pass (per-row costs allowed), keeps the cheapest, and
— when a capacity is given — raises it until every period (e.g. day) of validation stays within
``max_positives`` positive decisions (or the share ``coverage`` of periods, if set below 1). The returned
threshold sits midway between adjacent distinct validation scores, so it does not hinge on one row.

Example::

    costs = row_costs(spec.decision.costs, valid_frame)
    choice = choose_threshold(y_valid, p_valid, costs, capacity=100, period=day_of_row)
    choice.threshold, choice.bound          # 0.41, 'capacity'
    choice.curve                            # DataFrame: threshold, expected_cost, positives_per_period
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from keel.errors import TrainingError
from keel.evaluate.metrics import RowCosts, _check

ABSTAIN = -1


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen cut-off and the evidence behind it.

    ``bound`` is 'cost' (the cheapest threshold already fits capacity, or none was given) or 'capacity'
    (capacity forced a higher threshold). ``curve`` has columns ``threshold``, ``expected_cost`` (per
    event) and, with a capacity, ``max_positives_per_period``; at most ``curve_points`` rows.
    """

    threshold: float
    expected_cost: float
    bound: Literal["cost", "capacity"]
    cost_optimal_threshold: float
    cost_optimal_expected_cost: float
    capacity_threshold: float | None
    curve: pd.DataFrame


def _cost_curve(y: np.ndarray, s: np.ndarray, costs: RowCosts) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (distinct scores, descending, then +inf) and total cost of each."""
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    c = costs.take(order)
    # Acting on a row swaps its 'no action' cost for its 'action' cost.
    act = np.where(yy == 1, c.true_positive, c.false_positive)
    rest = np.where(yy == 1, c.false_negative, c.true_negative)
    base = rest.sum()
    delta = np.cumsum(act - rest)
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
    totals = np.r_[base, base + delta[last]]
    cutoffs = np.r_[np.inf, ss[last]]
    return cutoffs, totals


def _midpoint(cutoffs: np.ndarray, i: int) -> float:
    """Threshold between candidate ``i`` and the next lower distinct score (same decisions on validation)."""
    if i == 0:
        return float(np.nextafter(cutoffs[1], np.inf)) if len(cutoffs) > 1 else float("inf")
    if i + 1 < len(cutoffs):
        return float((cutoffs[i] + cutoffs[i + 1]) / 2)
    return float(cutoffs[i])


def capacity_threshold(
    scores: Any, period: Any, max_positives: int, coverage: float = 1.0
) -> float:
    """Lowest threshold keeping positive decisions per period within ``max_positives``.

    For each period the admissible thresholds are those above its (max_positives+1)-th highest score
    (any threshold if it has fewer rows); the result is the ``coverage`` quantile (highest, by default)
    of the per-period minima, placed midway to the next higher score of that period. ``coverage = 1``
    means every validation period stays within capacity — conservative, as a spike day binds.
    """
    s = np.asarray(scores, dtype=float)
    p = np.asarray(period)
    if s.shape != p.shape:
        raise TrainingError("scores and period must have one value per row.")
    if max_positives < 1:
        raise TrainingError(f"max_positives must be at least 1. Got {max_positives} instead.")
    if not 0 < coverage <= 1:
        raise TrainingError(f"coverage must be in (0, 1]. Got {coverage} instead.")
    mins = []
    for _, group in pd.Series(s).groupby(p, sort=True):
        v = np.sort(group.to_numpy())[::-1]
        if len(v) <= max_positives:
            mins.append(-np.inf)
            continue
        cut = v[max_positives]  # the (N+1)-th highest: the threshold must exceed it
        above = v[v > cut]
        mins.append((cut + above.min()) / 2 if len(above) else float(np.nextafter(cut, np.inf)))
    if not mins:
        raise TrainingError("capacity_threshold needs at least one period with rows.")
    return float(np.quantile(np.asarray(mins), coverage, method="higher"))


def choose_threshold(
    y: Any,
    scores: Any,
    costs: RowCosts,
    *,
    capacity: int | None = None,
    period: Any = None,
    coverage: float = 1.0,
    curve_points: int = 200,
) -> ThresholdChoice:
    """Choose the threshold on validation that minimises expected cost, subject to capacity.

    Args:
        y, scores: validation labels and (calibrated) scores, shape (n,).
        costs: per-row outcome costs (:func:`keel.evaluate.metrics.row_costs`).
        capacity, period: at most ``capacity`` positive decisions per period; ``period`` gives each
            row's period (e.g. :func:`keel.evaluate.metrics.period_index`). See :func:`capacity_threshold`.
        coverage: share of validation periods that must stay within capacity.
        curve_points: thin the returned cost curve to about this many rows (the optimum is kept).
    """
    yy, ss, _ = _check(y, scores)
    if len(costs) != len(yy):
        raise TrainingError(f"The costs cover {len(costs)} rows but there are {len(yy)} labels.")
    cutoffs, totals = _cost_curve(yy, ss, costs)
    n = len(yy)
    best = int(np.argmin(totals))  # first minimum: the highest threshold among equally cheap ones
    t_cost = _midpoint(cutoffs, best)
    threshold, bound, t_cap = t_cost, "cost", None
    if capacity is not None:
        if period is None:
            raise TrainingError("A capacity needs the period of each row (e.g. its day).")
        t_cap = capacity_threshold(ss, period, capacity, coverage)
        if t_cap > t_cost:
            threshold, bound = t_cap, "capacity"
    chosen_total = float(totals[np.searchsorted(-cutoffs, -threshold, side="right") - 1]) if np.isfinite(
        threshold) else float(totals[0])
    keep = np.unique(np.r_[np.linspace(0, len(cutoffs) - 1, min(curve_points, len(cutoffs))).astype(int), best])
    curve = pd.DataFrame({"threshold": cutoffs[keep], "expected_cost": totals[keep] / n})
    if capacity is not None and period is not None:
        codes = pd.factorize(np.asarray(period))[0]
        curve["max_positives_per_period"] = [
            int(np.bincount(codes[ss >= t], minlength=codes.max() + 1).max()) if np.isfinite(t) else 0
            for t in curve["threshold"]
        ]
    return ThresholdChoice(
        threshold=float(threshold), expected_cost=chosen_total / n, bound=bound,  # type: ignore[arg-type]
        cost_optimal_threshold=t_cost, cost_optimal_expected_cost=float(totals[best] / n),
        capacity_threshold=t_cap, curve=curve,
    )


def decide(scores: Any, threshold: float, abstain_band: tuple[float, float] | None = None) -> np.ndarray:
    """Decisions per row: 1 act, 0 do not act, -1 (``ABSTAIN``) for scores in ``[low, high)`` of the band.

    Abstained rows go to the fallback (e.g. the rule or a human) instead of the model's decision.
    """
    s = np.asarray(scores, dtype=float)
    if np.isnan(s).any():
        raise TrainingError("Cannot decide on NaN scores.")
    out = (s >= threshold).astype(np.int8)
    if abstain_band is not None:
        low, high = abstain_band
        if not 0 <= low < high <= 1:
            raise TrainingError(f"abstain_band must be [low, high] with 0 <= low < high <= 1. Got {abstain_band}.")
        out[(s >= low) & (s < high)] = ABSTAIN
    return out


def abstain_summary(y: Any, scores: Any, threshold: float, abstain_band: tuple[float, float]) -> dict[str, float]:
    """How an abstain band changes things: abstain rate, positives abstained, precision/recall on the rest."""
    yy, ss, _ = _check(y, scores)
    d = decide(ss, threshold, abstain_band)
    kept = d != ABSTAIN
    tp = float(((d == 1) & (yy == 1)).sum())
    fp = float(((d == 1) & (yy == 0)).sum())
    fn = float(((d == 0) & (yy == 1)).sum())
    return {
        "abstain_rate": float((~kept).mean()),
        "positives_abstained": float(yy[~kept].sum()),
        "precision_decided": tp / (tp + fp) if tp + fp else 0.0,
        "recall_decided": tp / (tp + fn) if tp + fn else 0.0,
    }


__all__ = ["ABSTAIN", "ThresholdChoice", "abstain_summary", "capacity_threshold", "choose_threshold", "decide"]
