"""Probability calibration on validation scores: none, sigmoid (Platt) or isotonic, chosen honestly.

The :class:`Calibrator` is plain data (``to_dict`` / ``from_dict``, JSON-safe, no pickle): the sigmoid is
two numbers on the logit of the score, the isotonic map is a pair of threshold arrays applied with
``np.interp``. :func:`choose_calibration` compares methods by cross-fitting on the validation rows (each
method is scored on folds it was not fitted on, so isotonic cannot win by memorising), picks the lowest
Brier score (log loss breaks near-ties), then refits the winner on all validation rows.

Example::

    choice = choose_calibration(y_valid, raw_valid, methods=("none", "sigmoid", "isotonic"), seed=42)
    choice.calibrator.transform(raw_test)     # calibrated probabilities, shape (n,)
    choice.table                              # method, brier, log_loss per candidate
    json.dumps(choice.calibrator.to_dict())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from keel.errors import TrainingError
from keel.evaluate.metrics import _check, brier, log_loss

Method = Literal["none", "sigmoid", "isotonic"]
_EPS = 1e-12


def _logit(s: np.ndarray) -> np.ndarray:
    p = np.clip(s, 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _is_probability(s: np.ndarray) -> bool:
    return bool(s.min() >= 0 and s.max() <= 1)


def _fit_sigmoid(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling by damped Newton steps on (a, b), with Platt's smoothed targets against overfitting."""
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        z = a * x + b
        # log(1 + e^z) - t z, computed stably
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    a, b = 1.0, float(np.log((n_pos + 1) / (n_neg + 1)))
    current = loss(a, b)
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(a * x + b, -35, 35)))
        g = p - t
        h = p * (1 - p) + 1e-12
        ga, gb = float(np.dot(g, x)), float(g.sum())
        haa, hab, hbb = float(np.dot(h, x * x)) + 1e-9, float(np.dot(h, x)), float(h.sum()) + 1e-9
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        step = 1.0
        while step > 1e-6:  # halve the step until the loss goes down
            trial = loss(a - step * da, b - step * db)
            if trial <= current:
                break
            step /= 2
        else:
            break
        a, b, current = a - step * da, b - step * db, trial
        if abs(step * da) < 1e-10 and abs(step * db) < 1e-10:
            break
    return float(a), float(b)


def _fit_isotonic(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators on scores sorted ascending; returns knots (x, y) for np.interp."""
    order = np.argsort(s, kind="stable")
    xs, ys = s[order], y[order].astype(float)
    # Merge tied scores first: one knot per distinct score.
    ux, start = np.unique(xs, return_index=True)
    sums = np.add.reduceat(ys, start)
    counts = np.diff(np.r_[start, len(xs)]).astype(float)
    vals: list[float] = []
    wts: list[float] = []
    lo: list[int] = []
    for i in range(len(ux)):
        vals.append(sums[i] / counts[i])
        wts.append(counts[i])
        lo.append(i)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            w = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            vals[-2:] = [v]
            wts[-2:] = [w]
            lo.pop()
    # Each block becomes two knots (its first and last score) so np.interp is flat inside blocks.
    starts = np.asarray(lo)
    ends = np.r_[starts[1:] - 1, len(ux) - 1]
    kx = np.ravel(np.column_stack([ux[starts], ux[ends]]))
    ky = np.repeat(np.asarray(vals), 2)
    keep = np.r_[True, np.diff(kx) > 0]
    return kx[keep], ky[keep]


@dataclass(frozen=True)
class Calibrator:
    """Maps raw model scores to probabilities. ``method`` 'none' passes probabilities through."""

    method: Method
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def transform(self, scores: Any) -> np.ndarray:
        """Calibrated probabilities for raw scores of shape (n,)."""
        s = np.asarray(scores, dtype=np.float64)
        if np.isnan(s).any():
            raise TrainingError(f"Cannot calibrate {int(np.isnan(s).sum())} NaN scores.")
        if self.method == "none":
            return np.clip(s, 0.0, 1.0)
        if self.method == "sigmoid":
            z = np.clip(self.a * _logit(s) + self.b, -35, 35)
            return 1 / (1 + np.exp(-z))
        return np.interp(s, np.asarray(self.x), np.asarray(self.y))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (floats and lists only)."""
        out: dict[str, Any] = {"method": self.method}
        if self.method == "sigmoid":
            out.update(a=self.a, b=self.b, input="logit")
        if self.method == "isotonic":
            out.update(x=list(self.x), y=list(self.y))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Inverse of :meth:`to_dict`; raises :class:`TrainingError` on a malformed description."""
        method = data.get("method")
        try:
            if method == "none":
                return cls("none")
            if method == "sigmoid":
                return cls("sigmoid", a=float(data["a"]), b=float(data["b"]))
            if method == "isotonic":
                x, y = tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"])
                if len(x) != len(y) or not x or any(np.diff(x) <= 0):
                    raise ValueError("x must be increasing and as long as y")
                return cls("isotonic", x=x, y=y)
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"The calibrator description is malformed ({exc}).") from None
        raise TrainingError(f"Unknown calibration method {method!r}; expected none, sigmoid or isotonic.")


def fit_calibrator(y: Any, scores: Any, method: Method) -> Calibrator:
    """Fit one calibration method on validation labels and raw scores (both shape (n,))."""
    yy, ss, _ = _check(y, scores, both_classes=True)
    if method == "none":
        if not _is_probability(ss):
            raise TrainingError("Calibration 'none' needs scores in [0, 1]; these are not probabilities.")
        return Calibrator("none")
    if method == "sigmoid":
        if not _is_probability(ss):
            raise TrainingError("Sigmoid calibration expects scores in [0, 1] (it works on their logit).")
        a, b = _fit_sigmoid(_logit(ss), yy)
        return Calibrator("sigmoid", a=a, b=b)
    if method == "isotonic":
        kx, ky = _fit_isotonic(ss, yy)
        return Calibrator("isotonic", x=tuple(map(float, kx)), y=tuple(map(float, ky)))
    raise TrainingError(f"Unknown calibration method {method!r}; expected none, sigmoid or isotonic.")


@dataclass(frozen=True)
class CalibrationChoice:
    """The chosen calibrator (refit on all validation rows) and the cross-fitted comparison table."""

    calibrator: Calibrator
    table: pd.DataFrame


def choose_calibration(
    y: Any,
    scores: Any,
    methods: Sequence[Method] = ("none", "sigmoid", "isotonic"),
    *,
    folds: int = 5,
    seed: int = 0,
    tolerance: float = 1e-3,
) -> CalibrationChoice:
    """Compare calibration methods on validation rows by stratified cross-fitting.

    Each method is fitted on ``folds - 1`` folds and scored on the held-out fold; pooled held-out
    probabilities give its Brier score and log loss. The lowest Brier wins; methods within
    ``tolerance`` (relative) of it are ordered by log loss. Methods that cannot apply (e.g. 'none' on
    scores outside [0, 1]) are listed with ``error``. The winner is refit on every validation row.
    """
    yy, ss, _ = _check(y, scores, both_classes=True)
    if not methods:
        raise TrainingError("models.calibration lists no method; use any of none, sigmoid, isotonic.")
    n_pos = int(yy.sum())
    k = max(2, min(folds, n_pos, len(yy) - n_pos))
    rng = np.random.default_rng(seed)
    fold = np.empty(len(yy), dtype=int)
    for cls in (0.0, 1.0):
        idx = np.flatnonzero(yy == cls)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(methods):
        try:
            pooled = np.empty(len(yy))
            for f in range(k):
                held = fold == f
                pooled[held] = fit_calibrator(yy[~held], ss[~held], method).transform(ss[held])
            rows.append({"method": method, "brier": brier(yy, pooled), "log_loss": log_loss(yy, pooled),
                         "error": None})
        except TrainingError as exc:
            rows.append({"method": method, "brier": np.nan, "log_loss": np.nan, "error": exc.message})
    table = pd.DataFrame(rows)
    ok = table.dropna(subset=["brier"])
    if ok.empty:
        raise TrainingError("No calibration method applies to these scores: " + "; ".join(table["error"]))
    best = ok["brier"].min()
    near = ok[ok["brier"] <= best * (1 + tolerance) + _EPS]
    winner = str(near.sort_values(["log_loss", "brier"]).iloc[0]["method"])
    table["chosen"] = table["method"] == winner
    return CalibrationChoice(fit_calibrator(yy, ss, winner), table)  # type: ignore[arg-type]


__all__ = ["CalibrationChoice", "Calibrator", "Method", "choose_calibration", "fit_calibrator"]
