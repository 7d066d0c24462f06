"""Baselines every model must beat, as small estimators that serialise to JSON (no pickle).

All follow the scikit-learn contract: ``__init__`` stores parameters, ``fit(X, y)`` returns ``self`` and
sets attributes ending in ``_``, ``predict_proba(X)`` returns shape (n, 2), ``predict(X)`` 0/1 and
``score(X, y)`` the average precision (accuracy is never a headline on imbalanced data). ``X`` is a
pandas DataFrame; ``to_dict()`` / ``from_dict()`` round-trip through JSON so the serving fallback can
load a fitted rule.

- :class:`PriorBaseline` — constant score: the training positive rate.
- :class:`RuleBaseline` — a spec expression such as ``tx_amount > 220``; scores are the training positive
  rate where the rule fires and where it does not.
- :class:`SingleFeatureRule` — the best one-feature threshold rule chosen on training data.
- :class:`LogisticBaseline` — median impute + standardise + L2 logistic regression (class_weight balanced).

Example::

    rule = RuleBaseline("tx_amount > 220").fit(X_train, y_train)
    rule.predict_proba(X_test)[:, 1]
    RuleBaseline.from_dict(json.loads(json.dumps(rule.to_dict())))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from keel import expressions
from keel.errors import TrainingError
from keel.evaluate.metrics import _labels, average_precision


def _frame(X: Any) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        return X
    if isinstance(X, dict):
        return pd.DataFrame(X)
    raise TrainingError(f"Baselines take a pandas DataFrame of features. Got {type(X).__name__} instead.")


def _target(y: Any, n: int) -> np.ndarray:
    yy = _labels(y)
    if len(yy) != n:
        raise TrainingError(f"The labels have {len(yy)} rows but the features have {n}.")
    if n == 0:
        raise TrainingError("Cannot fit a baseline on an empty training set.")
    return yy


def _need_two_classes(yy: np.ndarray, what: str) -> None:
    if yy.min() == yy.max():
        raise TrainingError(
            f"{what} needs both classes in the training labels; got only"
            f" {'positives' if yy[0] == 1 else 'negatives'} ({len(yy)} rows). Use a longer training window."
        )


def _numeric(X: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    missing = [c for c in columns if c not in X.columns]
    if missing:
        raise TrainingError(f"The features {missing} are missing from the data the model was fitted on.")
    try:
        return X[list(columns)].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])]
        raise TrainingError(
            f"The columns {bad} are not numeric; encode them before this baseline (or leave them out)."
        ) from None


class _Baseline:
    kind: ClassVar[str] = ""

    def _check_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise TrainingError(f"This {type(self).__name__} is not fitted yet; call fit(X, y) first.")

    def _scores(self, X: pd.DataFrame) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities, shape (n, 2): column 1 is the positive class."""
        self._check_fitted()
        p = self._scores(_frame(X))
        return np.column_stack([1 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """0/1 decisions at probability 0.5 (rules: where the rule fires)."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)

    def score(self, X: Any, y: Any) -> float:
        """Average precision of the positive-class probabilities."""
        return average_precision(y, self.predict_proba(X)[:, 1])


class PriorBaseline(_Baseline):
    """Scores every row with the training positive rate (the floor every model must clear)."""

    kind = "prior"

    def fit(self, X: Any, y: Any) -> PriorBaseline:
        yy = _target(y, len(_frame(X)))
        self.rate_ = float(yy.mean())
        return self

    def _scores(self, X: pd.DataFrame) -> np.ndarray:
        return np.full(len(X), self.rate_)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kind": self.kind, "rate": self.rate_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorBaseline:
        out = cls()
        out.rate_ = float(data["rate"])
        return out


class RuleBaseline(_Baseline):
    """A rule from the spec (``models.rule``), e.g. ``tx_amount > 220``.

    ``predict`` is where the rule fires; ``predict_proba`` gives the training positive rate among rows
    where it fires (``rate_fire_``) and where it does not (``rate_rest_``), so it can be ranked and
    calibrated like any model. Rows the rule cannot evaluate (NaN inputs) count as not firing.
    """

    kind = "rule"

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def _fires(self, X: pd.DataFrame) -> np.ndarray:
        try:
            cols = {c: X[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in expressions.columns(self.expression)
                    if c in X.columns}
            with np.errstate(invalid="ignore"):
                value = expressions.evaluate(self.expression, cols) if cols else expressions.evaluate(
                    self.expression, {"__n": np.zeros(len(X))})
        except expressions.ExpressionError as exc:
            raise TrainingError(f"The rule {exc}.", hint="Fix models.rule in keel.toml.") from None
        return np.nan_to_num(value, nan=0.0) != 0

    def fit(self, X: Any, y: Any) -> RuleBaseline:
        frame = _frame(X)
        yy = _target(y, len(frame))
        fires = self._fires(frame)
        prior = float(yy.mean())
        self.rate_fire_ = float(yy[fires].mean()) if fires.any() else prior
        self.rate_rest_ = float(yy[~fires].mean()) if (~fires).any() else prior
        self.fire_share_ = float(fires.mean())
        return self

    def _scores(self, X: pd.DataFrame) -> np.ndarray:
        return np.where(self._fires(X), self.rate_fire_, self.rate_rest_)

    def predict(self, X: Any) -> np.ndarray:
        """Where the rule fires (1) or not (0)."""
        return self._fires(_frame(X)).astype(int)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kind": self.kind, "expression": self.expression, "rate_fire": self.rate_fire_,
                "rate_rest": self.rate_rest_, "fire_share": self.fire_share_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuleBaseline:
        out = cls(str(data["expression"]))
        expressions.parse(out.expression)
        out.rate_fire_, out.rate_rest_ = float(data["rate_fire"]), float(data["rate_rest"])
        out.fire_share_ = float(data.get("fire_share", 0.0))
        return out


class SingleFeatureRule(_Baseline):
    """The best one-feature threshold rule, chosen on training data.

    For each numeric feature and both directions (``feature >= t`` or ``feature <= t``), candidate
    thresholds are up to ``max_thresholds`` quantiles; the rule with the largest Youden's J
    (recall - false-positive rate, insensitive to class imbalance) wins. Missing values never fire.
    Scores are training positive rates where it fires / does not, as in :class:`RuleBaseline`;
    ``expression`` gives the rule in spec syntax (e.g. ``tx_amount >= 221.5``).
    """

    kind = "single_feature_rule"

    def __init__(self, features: Sequence[str] | None = None, max_thresholds: int = 64) -> None:
        self.features = features
        self.max_thresholds = max_thresholds

    def fit(self, X: Any, y: Any) -> SingleFeatureRule:
        frame = _frame(X)
        yy = _target(y, len(frame))
        _need_two_classes(yy, "The single-feature rule")
        columns = list(self.features) if self.features is not None else [
            c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        if not columns:
            raise TrainingError("The single-feature rule needs at least one numeric feature.")
        values = _numeric(frame, columns)
        pos, neg = yy == 1, yy == 0
        best = (-np.inf, "", ">=", 0.0)
        for j, column in enumerate(columns):
            v = values[:, j]
            ok = ~np.isnan(v)
            if ok.sum() == 0:
                continue
            cands = np.unique(np.quantile(v[ok], np.linspace(0, 1, self.max_thresholds + 1)))
            ge = v[:, None] >= cands[None, :]  # NaN compares False: never fires
            le = v[:, None] <= cands[None, :]
            for op, fires in ((">=", ge), ("<=", le)):
                j_stat = fires[pos].mean(axis=0) - fires[neg].mean(axis=0)
                k = int(np.argmax(j_stat))
                if j_stat[k] > best[0] + 1e-12:
                    best = (float(j_stat[k]), column, op, float(cands[k]))
        if not best[1]:
            raise TrainingError("The single-feature rule found no usable feature (all values missing).")
        self.youden_, self.feature_, self.operator_, self.threshold_ = best
        fires = self._fires(frame)
        self.rate_fire_ = float(yy[fires].mean()) if fires.any() else float(yy.mean())
        self.rate_rest_ = float(yy[~fires].mean()) if (~fires).any() else float(yy.mean())
        return self

    @property
    def expression(self) -> str:
        self._check_fitted()
        return f"{self.feature_} {self.operator_} {self.threshold_!r}"

    def _fires(self, X: pd.DataFrame) -> np.ndarray:
        v = _numeric(X, [self.feature_])[:, 0]
        with np.errstate(invalid="ignore"):
            return v >= self.threshold_ if self.operator_ == ">=" else v <= self.threshold_

    def _scores(self, X: pd.DataFrame) -> np.ndarray:
        return np.where(self._fires(X), self.rate_fire_, self.rate_rest_)

    def predict(self, X: Any) -> np.ndarray:
        self._check_fitted()
        return self._fires(_frame(X)).astype(int)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kind": self.kind, "feature": self.feature_, "operator": self.operator_,
                "threshold": self.threshold_, "rate_fire": self.rate_fire_, "rate_rest": self.rate_rest_,
                "youden": self.youden_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SingleFeatureRule:
        out = cls(features=[str(data["feature"])])
        if data["operator"] not in (">=", "<="):
            raise TrainingError(f"Unknown operator {data['operator']!r} in a single-feature rule.")
        out.feature_, out.operator_ = str(data["feature"]), str(data["operator"])
        out.threshold_, out.youden_ = float(data["threshold"]), float(data.get("youden", 0.0))
        out.rate_fire_, out.rate_rest_ = float(data["rate_fire"]), float(data["rate_rest"])
        return out


class LogisticBaseline(_Baseline):
    """Regularised logistic regression on numeric features: median impute, standardise, L2 (``C``).

    ``class_weight='balanced'`` reweights classes (never resamples); probabilities are then not
    calibrated to the base rate — calibrate on validation. Constant columns get scale 1.
    """

    kind = "logistic_regression"

    def __init__(
        self, features: Sequence[str] | None = None, C: float = 1.0, class_weight: str | None = "balanced",
        max_iter: int = 1000,
    ) -> None:
        self.features = features
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def _design(self, X: pd.DataFrame) -> np.ndarray:
        v = _numeric(X, self.features_)
        v = np.where(np.isnan(v), self.medians_, v)
        return (v - self.means_) / self.scales_

    def fit(self, X: Any, y: Any) -> LogisticBaseline:
        from sklearn.linear_model import LogisticRegression

        frame = _frame(X)
        yy = _target(y, len(frame))
        _need_two_classes(yy, "Logistic regression")
        self.features_ = list(self.features) if self.features is not None else [
            c for c in frame.columns
            if pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])]
        if not self.features_:
            raise TrainingError("Logistic regression needs at least one numeric feature.")
        v = _numeric(frame, self.features_)
        with np.errstate(all="ignore"):
            medians = np.nanmedian(v, axis=0)
        self.medians_ = np.nan_to_num(medians, nan=0.0)  # an all-missing column becomes constant 0
        filled = np.where(np.isnan(v), self.medians_, v)
        self.means_ = filled.mean(axis=0)
        std = filled.std(axis=0)
        self.scales_ = np.where(std > 0, std, 1.0)
        model = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        model.fit((filled - self.means_) / self.scales_, yy.astype(int))
        self.coef_ = model.coef_[0].astype(float)
        self.intercept_ = float(model.intercept_[0])
        return self

    def _scores(self, X: pd.DataFrame) -> np.ndarray:
        z = self._design(X) @ self.coef_ + self.intercept_
        return 1 / (1 + np.exp(-np.clip(z, -35, 35)))

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kind": self.kind, "features": self.features_, "C": self.C, "class_weight": self.class_weight,
                "medians": self.medians_.tolist(), "means": self.means_.tolist(),
                "scales": self.scales_.tolist(), "coef": self.coef_.tolist(), "intercept": self.intercept_}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogisticBaseline:
        out = cls(features=list(data["features"]), C=float(data["C"]), class_weight=data.get("class_weight"))
        out.features_ = list(data["features"])
        out.medians_, out.means_, out.scales_, out.coef_ = (
            np.asarray(data[k], dtype=np.float64) for k in ("medians", "means", "scales", "coef"))
        if not (len(out.features_) == len(out.coef_) == len(out.means_) == len(out.scales_) == len(out.medians_)):
            raise TrainingError("The logistic baseline description is malformed (lengths differ).")
        out.intercept_ = float(data["intercept"])
        return out


_KINDS: dict[str, type[Any]] = {
    c.kind: c for c in (PriorBaseline, RuleBaseline, SingleFeatureRule, LogisticBaseline)
}


def baseline_from_dict(data: dict[str, Any]) -> PriorBaseline | RuleBaseline | SingleFeatureRule | LogisticBaseline:
    """Load any baseline from its ``to_dict()`` form (dispatch on ``kind``)."""
    cls = _KINDS.get(str(data.get("kind")))
    if cls is None:
        raise TrainingError(f"Unknown baseline kind {data.get('kind')!r}; expected one of {sorted(_KINDS)}.")
    try:
        return cls.from_dict(data)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError, expressions.ExpressionError) as exc:
        raise TrainingError(f"The {cls.kind} baseline description is malformed ({exc}).") from None


def fit_baselines(
    X: Any, y: Any, *, rule: str | None = None, features: Sequence[str] | None = None, seed: int = 0
) -> dict[str, _Baseline]:
    """Fit the standard set on training data: prior, single-feature rule, logistic, and the spec rule."""
    del seed  # every baseline here is deterministic; kept so callers pass the run seed uniformly
    out: dict[str, _Baseline] = {
        "prior": PriorBaseline().fit(X, y),
        "single_feature_rule": SingleFeatureRule(features).fit(X, y),
        "logistic_regression": LogisticBaseline(features).fit(X, y),
    }
    if rule:
        out["rule"] = RuleBaseline(rule).fit(X, y)
    return out


__all__ = [
    "LogisticBaseline",
    "PriorBaseline",
    "RuleBaseline",
    "SingleFeatureRule",
    "baseline_from_dict",
    "fit_baselines",
]
