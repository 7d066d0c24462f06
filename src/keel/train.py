"""`keel train`: candidates against baselines under the spec's split, then calibrate, threshold and hand off.

The flow, every step recorded in the returned :class:`TrainOutcome`::

    read (contract, fingerprint) -> features (point in time) -> split (gap = label delay)
    -> leakage checks -> baselines (prior, rule, best single feature, logistic)
    -> candidates (timeboxed search on validation only) -> best by the headline metric on validation
    -> calibration (validation) -> threshold (costs / capacity, validation) -> test metrics with intervals
    -> slices and costliest errors -> DecisionModel artifact

The test window is touched once, after every choice is made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import expressions
from keel.artifact import DecisionModel, Ensemble, encode_categories, unweighted_mean
from keel.data.contracts import check_contract
from keel.data.fingerprint import fingerprint_source
from keel.data.sources import Source, source_from_spec
from keel.errors import TrainingError
from keel.evaluate import metrics as M
from keel.evaluate.calibration import choose_calibration
from keel.evaluate.leakage import raise_on_severe
from keel.evaluate.split import PrequentialSplit, TimeSplit, Window, split_from_spec
from keel.evaluate.threshold import choose_threshold
from keel.spec import Spec

Progress = Callable[[str], None]

LOWER_IS_BETTER = {"expected_cost", "log_loss", "brier", "ece"}


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Dataset:
    """The modelling table: features X, labels y, and the columns evaluation needs beside them."""

    frame: pd.DataFrame
    X: pd.DataFrame
    y: np.ndarray
    times: np.ndarray | None
    entity: np.ndarray | None
    costs: M.RowCosts
    feature_names: list[str]
    categories: dict[str, list[str]]
    source: Source
    fingerprint: str
    definitions_hash: str | None


def _model_columns(spec: Spec, frame: pd.DataFrame) -> list[str]:
    """Columns used as model inputs when the spec declares no features: everything but roles and exclusions."""
    data = spec.data
    roles = {data.label, data.timestamp, data.id_column, *data.entity_keys, *data.exclude}
    out = []
    for col in frame.columns:
        if col in roles:
            continue
        dtype = frame[col].dtype
        if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype) or col in data.categorical:
            out.append(col)
    return out


def _has_features(spec: Spec) -> bool:
    f = spec.features
    return bool(f.raw or f.row or f.windows or f.ratios)


def load_dataset(spec: Spec, source: Source | None = None, progress: Progress | None = None, *,
                 fingerprint: str | None = None) -> Dataset:
    """Read the source, check its contract, compute point-in-time features and per-row costs.

    ``fingerprint``: the source's fingerprint when the caller just computed it (``keel pipeline`` keys its steps
    on it), which saves streaming the whole source once more.
    """
    say = progress or (lambda _m: None)
    src = source or source_from_spec(spec)
    contract = check_contract(spec, src)
    contract.raise_for_findings()
    fingerprint = fingerprint or fingerprint_source(src)
    data = spec.data
    order = [data.timestamp] if data.timestamp else None
    if order and data.id_column:
        order.append(data.id_column)
    frame = src.read(order_by=order)
    say(f"read {len(frame):,} rows from {src.describe()} (fingerprint {fingerprint[:12]})")
    if data.timestamp and not pd.api.types.is_datetime64_any_dtype(frame[data.timestamp]):
        frame[data.timestamp] = pd.to_datetime(frame[data.timestamp])
    definitions_hash = None
    if _has_features(spec):
        from keel.features.definitions import definitions_hash as defs_hash
        from keel.features.definitions import feature_names, resolve_definitions
        from keel.features.offline import compute_features

        defs = resolve_definitions(spec.features, spec.data)
        names = feature_names(defs)
        computed = compute_features(frame, defs, timestamp=data.timestamp, label=data.label)
        for name in names:
            frame[name] = computed[name].to_numpy()
        definitions_hash = defs_hash(defs)
        say(f"computed {len(names)} point-in-time features")
    else:
        names = _model_columns(spec, frame)
    if not names:
        raise TrainingError(
            "No model inputs: every column is a role (label, id, timestamp, entity key) or excluded.",
            hint="List input columns in features.raw or declare window features in keel.toml.",
        )
    categories: dict[str, list[str]] = {}
    X = pd.DataFrame(index=frame.index)
    for name in names:
        col = frame[name]
        if name in data.categorical or not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            values = col.astype("string")
            cats = [str(v) for v in values.value_counts(dropna=True).index]
            categories[name] = cats
            X[name] = encode_categories(values, cats)
        else:
            X[name] = col.astype("float64")
    y_raw = frame[data.label]
    if y_raw.isna().any():
        raise TrainingError(
            f"The label column {data.label!r} has {int(y_raw.isna().sum()):,} missing values.",
            hint="Drop unlabelled rows, or wait until their labels are known.",
        )
    y = _binary_labels(y_raw, data.positive_label)
    times = frame[data.timestamp].to_numpy() if data.timestamp else None
    k = spec.decision.precision_at_k
    entity = frame[k.entity].to_numpy() if k and k.entity else None
    costs = M.row_costs(spec.decision.costs, frame)
    return Dataset(frame=frame, X=X, y=y, times=times, entity=entity, costs=costs, feature_names=names,
                   categories=categories, source=src, fingerprint=fingerprint, definitions_hash=definitions_hash)


def _binary_labels(series: pd.Series, positive: object) -> np.ndarray:
    if pd.api.types.is_bool_dtype(series):
        return (series == bool(positive)).astype(np.int8).to_numpy()
    if isinstance(positive, bool):
        return (series.astype(str).str.lower().isin(["true", "1"]) == positive).astype(np.int8).to_numpy()
    if pd.api.types.is_numeric_dtype(series):
        try:
            return (series.astype(float) == float(positive)).astype(np.int8).to_numpy()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    return (series.astype(str) == str(positive)).astype(np.int8).to_numpy()


# ------------------------------------------------------------------------------------------ candidates
SEARCH_SPACES: dict[str, dict[str, list[Any]]] = {
    "lightgbm": {
        "n_estimators": [100, 200, 400, 600],
        "learning_rate": [0.02, 0.05, 0.1],
        "num_leaves": [7, 15, 31, 63],
        "min_child_samples": [20, 50, 100, 200],
        "colsample_bytree": [0.6, 0.8, 1.0],
        "subsample": [0.7, 0.9, 1.0],
        "reg_lambda": [0.0, 1.0, 10.0],
    },
    "hist_gradient_boosting": {
        "max_iter": [100, 200, 400],
        "learning_rate": [0.03, 0.05, 0.1],
        "max_leaf_nodes": [7, 15, 31, 63],
        "min_samples_leaf": [20, 50, 100, 200],
        "l2_regularization": [0.0, 1.0, 10.0],
    },
    "random_forest": {
        "n_estimators": [100, 200],
        "max_depth": [8, 12, 20],
        "min_samples_leaf": [1, 5, 20],
        "max_features": ["sqrt", 0.5],
    },
    "logistic_regression": {"C": [0.01, 0.1, 1.0, 10.0]},
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 50,
                 "colsample_bytree": 0.8, "subsample": 0.9, "reg_lambda": 1.0},
    "hist_gradient_boosting": {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 15,
                               "min_samples_leaf": 50, "l2_regularization": 1.0},
    "random_forest": {"n_estimators": 100, "max_depth": 12, "min_samples_leaf": 5, "max_features": "sqrt"},
    "logistic_regression": {"C": 1.0},
}


WEIGHT_MODES = ["none", "sqrt", "balanced"]


def _positive_weight(y: np.ndarray, mode: str) -> float:
    """Weight of a positive row: 1 ('none'), sqrt(n_neg/n_pos) ('sqrt') or n_neg/n_pos ('balanced')."""
    pos = max(int(y.sum()), 1)
    ratio = float((len(y) - pos) / pos)
    return {"none": 1.0, "sqrt": float(np.sqrt(ratio)), "balanced": ratio}[mode]


def fit_candidate(kind: str, params: dict[str, Any], X: np.ndarray, y: np.ndarray, *, seed: int,
                  class_weight: str, threads: int, feature_names: list[str] | None = None) -> Any:
    """Fit one model family with ``params``; class imbalance handled by weighting, never by resampling.

    A ``class_weight`` entry in ``params`` (searched when models.class_weight = 'auto') overrides the spec's.
    """
    w_pos = fitted_positive_weight(kind, params, y, class_weight=class_weight)
    params = dict(params)
    mode = params.pop("class_weight", class_weight)
    if kind == "lightgbm":
        import lightgbm as lgb

        p = dict(params)
        booster = lgb.train(
            {"objective": "binary", "verbose": -1, "seed": seed, "deterministic": True,
             "num_threads": threads, "learning_rate": p.pop("learning_rate"), "num_leaves": p.pop("num_leaves"),
             "min_child_samples": p.pop("min_child_samples"), "feature_fraction": p.pop("colsample_bytree"),
             "bagging_fraction": p.pop("subsample"), "bagging_freq": 1, "lambda_l2": p.pop("reg_lambda"),
             "scale_pos_weight": w_pos},
            lgb.Dataset(X, y, free_raw_data=True), num_boost_round=int(p.pop("n_estimators")),
        )
        return booster
    weights = np.where(y == 1, w_pos, 1.0)
    if kind == "hist_gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier
        from threadpoolctl import threadpool_limits

        model = HistGradientBoostingClassifier(random_state=seed, early_stopping=False, **params)
        with threadpool_limits(limits=threads or None, user_api="openmp"):  # OpenMP spins on a busy machine
            return model.fit(X, y, sample_weight=weights)
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        model = RandomForestClassifier(random_state=seed, n_jobs=threads or -1, **params)
        return model.fit(X, y, sample_weight=weights)
    if kind == "logistic_regression":
        from keel.evaluate.baselines import LogisticBaseline

        names = feature_names or [f"f{i}" for i in range(X.shape[1])]
        return LogisticBaseline(names, C=params["C"], class_weight=_sk_weight(mode)).fit(
            pd.DataFrame(X, columns=names), y)
    raise TrainingError(f"Unknown model family {kind!r}.")


def _sk_weight(mode: str) -> str | None:
    return "balanced" if mode in ("balanced", "auto") else None


def fitted_positive_weight(kind: str, params: dict[str, Any], y: np.ndarray, *, class_weight: str) -> float:
    """The weight of a positive row :func:`fit_candidate` gives ``kind`` with ``params`` on labels ``y`` (the
    logistic baseline knows only 'balanced' or none), which an ensemble undoes before averaging (see
    :func:`keel.artifact.unweighted`). A ``class_weight`` entry in ``params`` overrides the spec's."""
    mode = params.get("class_weight", class_weight)
    if kind == "logistic_regression":
        return _positive_weight(y, "balanced") if _sk_weight(mode) else 1.0
    return _positive_weight(y, "balanced" if mode == "auto" else mode)


def member_mean(members: dict[str, Any], raws: dict[str, np.ndarray], y_train: np.ndarray, *,
                class_weight: str) -> np.ndarray:
    """An ensemble's raw score from its members' raw scores (``members``: family -> chosen params), each member
    brought back to the unweighted scale it would have had without its class weight on ``y_train``."""
    return unweighted_mean([raws[f] for f in members], [
        fitted_positive_weight(f, p, y_train, class_weight=class_weight) for f, p in members.items()])


def raw_scores(kind: str, model: Any, X: np.ndarray, threads: int = 0) -> np.ndarray:
    if kind == "ensemble":
        return model.mean([raw_scores(k, m, X, threads) for k, m in model.members])
    if kind == "lightgbm":
        return np.asarray(model.predict(X, num_threads=threads), dtype=float)
    if hasattr(model, "features_"):  # Keel baselines read named columns
        X = pd.DataFrame(X, columns=model.features_)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads or None, user_api="openmp"):
        return np.asarray(model.predict_proba(X)[:, 1], dtype=float)


def _trial_params(family: str, trial: int, class_weight: str, rng: np.random.Generator) -> dict[str, Any]:
    """Trial 0 is the family's sensible default; later trials draw from its search space."""
    space = dict(SEARCH_SPACES[family])
    if class_weight == "auto":
        space["class_weight"] = WEIGHT_MODES
    if trial == 0:
        params = dict(DEFAULTS[family])
        if class_weight == "auto":
            params["class_weight"] = "none"
        return params
    return {k: v[int(rng.integers(len(v)))] for k, v in space.items()}


# ----------------------------------------------------------------------------------------- evaluation
@dataclass
class Scorer:
    """The headline metric on a window, with what it needs (entities and periods for Card Precision@k)."""

    name: str
    k: int = 100
    per: timedelta = timedelta(days=1)

    def __call__(self, y: np.ndarray, s: np.ndarray, *, times: np.ndarray | None, entity: np.ndarray | None,
                 costs: M.RowCosts | None = None, threshold: float | None = None) -> float:
        if self.name == "card_precision_at_k":
            if times is None or entity is None:
                return M.average_precision(y, s)
            return M.card_precision_at_k(s, y, entity=entity, period=M.period_index(times, self.per), k=self.k).mean
        if self.name == "roc_auc":
            return M.roc_auc(y, s)
        if self.name == "expected_cost" and costs is not None and threshold is not None:
            return M.expected_cost(y, s, threshold, costs)
        if self.name == "log_loss":
            return M.log_loss(y, np.clip(s, 0, 1))
        if self.name == "brier":
            return M.brier(y, np.clip(s, 0, 1))
        return M.average_precision(y, s)

    @property
    def lower_is_better(self) -> bool:
        return self.name in LOWER_IS_BETTER

    def detail(self, y: np.ndarray, s: np.ndarray, *, times: np.ndarray | None,
               entity: np.ndarray | None) -> ValidationScore:
        """The headline on a window, with its per-period values (Card Precision@k) and average precision."""
        ap = M.average_precision(y, s)
        if self.name == "card_precision_at_k" and times is not None and entity is not None:
            cp = M.card_precision_at_k(s, y, entity=entity, period=M.period_index(times, self.per), k=self.k)
            return ValidationScore(float(cp.mean), np.asarray(cp.per_period, dtype=float), ap)
        return ValidationScore(self(y, s, times=times, entity=entity), None, ap)


@dataclass(frozen=True)
class ValidationScore:
    """A model's validation headline, its per-period values (paired across models), and average precision."""

    headline: float
    per_period: np.ndarray | None
    average_precision: float

    @staticmethod
    def pooled(folds: list[ValidationScore]) -> ValidationScore:
        """Mean over validation folds; per-period values concatenated (every fold has the same periods)."""
        parts = [f.per_period for f in folds]
        per = np.concatenate(parts) if all(p is not None for p in parts) else None  # type: ignore[arg-type]
        return ValidationScore(float(np.mean([f.headline for f in folds])), per,
                               float(np.mean([f.average_precision for f in folds])))


def choose_on_validation(scores: dict[str, ValidationScore], *, lower_is_better: bool = False) -> tuple[str, str]:
    """The candidate to deploy, with the reason: best headline, average precision among statistical ties.

    A candidate ties with the headline leader when their mean difference is within one standard error of the
    paired per-period differences (Card Precision@k per day on the same days). Among ties the highest
    validation average precision wins: it ranks every row rather than the top k of each day, so it separates
    models with far less noise. Without per-period values (other headlines) the headline alone decides.
    """
    sign = -1.0 if lower_is_better else 1.0
    leader = max(scores, key=lambda n: sign * scores[n].headline)
    lead = scores[leader]
    if lead.per_period is None or len(lead.per_period) < 2:
        return leader, f"best validation {'headline' if lead.per_period is None else 'headline (one period)'}"
    tied: dict[str, float] = {}  # name -> standard error of its paired per-period difference with the leader
    for name, sc in scores.items():
        if sc.per_period is None or sc.per_period.shape != lead.per_period.shape:
            continue
        diff = lead.per_period - sc.per_period
        se = float(np.std(diff, ddof=1) / np.sqrt(len(diff)))
        if abs(lead.headline - sc.headline) <= se:
            tied[name] = se
    chosen = max(tied, key=lambda n: (scores[n].average_precision, n == leader))
    ties = ", ".join(f"{n} {scores[n].headline:.4f} (SE {se:.4f}, AP {scores[n].average_precision:.4f})"
                     for n, se in tied.items() if n != leader)
    if chosen == leader:
        return leader, "best validation headline" + (
            f" (ties: {ties}; it has the highest validation average precision among them)" if ties else "")
    return chosen, (f"validation headline within one paired standard error of {leader}'s "
                    f"{lead.headline:.4f} (ties: {ties}), and the highest validation average precision among the ties")


def scorer_for(spec: Spec) -> Scorer:
    k = spec.decision.precision_at_k
    name = spec.decision.headline_metric
    # Ranking is chosen on a ranking metric; expected cost depends on the threshold, chosen afterwards.
    select = "average_precision" if name in ("expected_cost", "log_loss", "brier") else name
    return Scorer(select, k=k.k if k else 100, per=k.per if k else timedelta(days=1))


@dataclass
class Evaluated:
    """One model (baseline or candidate) evaluated on validation and test."""

    name: str
    role: str  # "baseline" | "candidate"
    kind: str
    params: dict[str, Any]
    validation_score: float
    threshold: float
    test: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, M.Interval] = field(default_factory=dict)
    test_scores: np.ndarray | None = None
    fit_seconds: float = 0.0
    trials: int = 1


def evaluate_window(y: np.ndarray, s: np.ndarray, *, threshold: float, costs: M.RowCosts,
                    times: np.ndarray | None, entity: np.ndarray | None, k: int, per: timedelta,
                    bootstrap: int, seed: int) -> tuple[dict[str, float], dict[str, M.Interval]]:
    """Every metric of the decision on one window, with bootstrap intervals for the headline ones."""
    p = np.clip(s, 0.0, 1.0)
    if len(np.unique(y)) < 2:
        raise TrainingError(
            f"The test window holds a single class ({int(y.sum())} positives in {len(y):,} rows); "
            "no ranking metric is defined.",
            hint="Lengthen split.test or move split.test_end to a period with both classes.",
        )
    out = M.summary(y, p, threshold=threshold, costs=costs)
    cm = M.confusion(y, p, threshold)
    out.update(tp=float(cm.tp), fp=float(cm.fp), fn=float(cm.fn), tn=float(cm.tn))
    intervals: dict[str, M.Interval] = {}
    if bootstrap:
        intervals["average_precision"] = M.bootstrap("average_precision", y, p, n=bootstrap, seed=seed)
        intervals["roc_auc"] = M.bootstrap("roc_auc", y, p, n=bootstrap, seed=seed)
        per_row = costs.per_row(y, p >= threshold)
        intervals["expected_cost"] = M.bootstrap("mean", per_row, n=bootstrap, seed=seed)
    if times is not None and entity is not None:
        cp = M.card_precision_at_k(p, y, entity=entity, period=M.period_index(times, per), k=k)
        out["card_precision_at_k"] = cp.mean
        if bootstrap and len(cp.per_period) > 1:
            intervals["card_precision_at_k"] = M.bootstrap("mean", cp.per_period, n=bootstrap, seed=seed)
    return out, intervals


# ------------------------------------------------------------------------------------------- outcome
@dataclass
class ErrorAnalysis:
    """Slices of the test window for the chosen model: every segment, the worst ones, the costliest errors."""

    table: pd.DataFrame
    worst: pd.DataFrame
    costliest: pd.DataFrame


@dataclass
class TrainOutcome:
    """Everything `keel train` decided and measured; the report and the registry read it."""

    spec: Spec
    model: DecisionModel
    best: Evaluated
    evaluated: list[Evaluated]
    windows: dict[str, Window]
    split_warning: str | None
    removed_known_positives: dict[str, int]
    calibration_table: pd.DataFrame
    threshold_choice: Any
    leakage: list[Any]
    slices: ErrorAnalysis
    dataset: Dataset
    test_mask: np.ndarray
    validation_mask: np.ndarray
    test_scores: np.ndarray
    seconds: dict[str, float]
    search_budget: dict[str, Any]
    beats_baselines: dict[str, dict[str, bool]]
    prequential: pd.DataFrame | None = None
    registered: Any = None

    @property
    def baselines(self) -> list[Evaluated]:
        return [e for e in self.evaluated if e.role == "baseline"]

    @property
    def candidates(self) -> list[Evaluated]:
        return [e for e in self.evaluated if e.role == "candidate"]

    def comparison(self) -> pd.DataFrame:
        """One row per model: validation score, test metrics, intervals — the table `keel train` prints."""
        rows = []
        for e in self.evaluated:
            row: dict[str, Any] = {"model": e.name, "role": e.role, "validation": e.validation_score,
                                   "threshold": e.threshold}
            row.update({k: e.test.get(k) for k in ("roc_auc", "average_precision", "card_precision_at_k",
                                                   "brier", "expected_cost", "precision", "recall")})
            for k, iv in e.intervals.items():
                row[f"{k}_low"], row[f"{k}_high"] = iv.low, iv.high
            row["chosen"] = e is self.best
            rows.append(row)
        return pd.DataFrame(rows)

    def metrics(self) -> dict[str, float]:
        """Flat metric dict for tracking: test.<metric> of the chosen model, baselines namespaced."""
        out: dict[str, float] = {}
        for e in self.evaluated:
            prefix = "test" if e is self.best else f"{e.role}.{e.kind}"  # kinds are slugs; names are prose
            for k, v in e.test.items():
                if v is not None and np.isfinite(v):
                    out[f"{prefix}.{k}"] = float(v)
            for k, iv in e.intervals.items():
                out[f"{prefix}.{k}.low"], out[f"{prefix}.{k}.high"] = iv.low, iv.high
            out[f"{prefix}.validation_score"] = float(e.validation_score)
        return out


# ---------------------------------------------------------------------------------------------- train
def _baselines(spec: Spec, ds: Dataset, train: np.ndarray) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(name, kind, fitted model, params) for every baseline the spec implies, fitted on the training window."""
    X, y = ds.X[train], ds.y[train]
    return [(name, kind, maker(X, y), params) for name, kind, maker, params in _baseline_makers(spec, ds)]


def _baseline_makers(spec: Spec, ds: Dataset) -> list[tuple[str, str, Callable[[pd.DataFrame, np.ndarray], Any],
                                                            dict[str, Any]]]:
    from keel.evaluate.baselines import LogisticBaseline, PriorBaseline, RuleBaseline, SingleFeatureRule

    # The baseline is not searched: it reweights only when the spec says 'balanced'. Under 'auto' it is the plain
    # fit, which ranks better on rare positives (handbook data: AP 0.623 plain vs 0.569 balanced).
    weight = "balanced" if spec.models.class_weight == "balanced" else None
    makers: list[tuple[str, str, Callable[[pd.DataFrame, np.ndarray], Any], dict[str, Any]]] = [
        ("prior", "prior", lambda X, y: PriorBaseline().fit(X, y), {}),
    ]
    rule = spec.models.rule
    if rule:
        unknown = sorted(expressions.columns(rule) - set(ds.feature_names))
        if unknown:
            raise TrainingError(
                f"The rule 'models.rule' = {rule!r} reads {unknown}, which are not model inputs.",
                hint="Add them to features.raw (or derive them as features), or change the rule.",
            )
        makers.append((f"rule: {rule}", "rule", lambda X, y: RuleBaseline(rule).fit(X, y), {"rule": rule}))
    makers.append(("best single feature", "single_feature", lambda X, y: SingleFeatureRule().fit(X, y), {}))
    makers.append(("logistic regression", "logistic_regression",
                   lambda X, y: LogisticBaseline(class_weight=weight).fit(X, y), {"C": 1.0}))
    return makers


def train(spec: Spec, *, source: Source | None = None, progress: Progress | None = None,
          dataset: Dataset | None = None, trials: dict[str, int] | None = None,
          fingerprint: str | None = None) -> TrainOutcome:
    """Train and evaluate under the spec; returns the outcome (artifact not yet registered).

    ``trials`` fixes the number of search trials per model family (ignoring the time budget), which is how
    ``keel reproduce`` replays a timeboxed search exactly. ``fingerprint``: see :func:`load_dataset`.
    """
    say = progress or (lambda _m: None)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = dataset or load_dataset(spec, source, progress=say, fingerprint=fingerprint)
    seconds["data_and_features"] = time.perf_counter() - t0
    models = spec.models
    threads = models.threads
    k_spec = spec.decision.precision_at_k
    k, per = (k_spec.k, k_spec.per) if k_spec else (100, timedelta(days=1))
    if len(ds.y) < 20:
        raise TrainingError(
            f"Only {len(ds.y)} rows: too few to train and evaluate honestly (train, validation and test each "
            "need both classes).",
            hint="Collect more data; Keel needs at least a few hundred rows with some positives.",
        )
    if ds.y.min() == ds.y.max():
        raise TrainingError(
            f"The label {spec.data.label!r} holds a single class ({int(ds.y[0])}) on all {len(ds.y):,} rows;"
            " there is nothing to learn.",
            hint=f"Check data.label and data.positive_label (now {spec.data.positive_label!r}).",
        )

    split = split_from_spec(spec.split, times=ds.times, y=ds.y, entity=ds.entity,
                            label_delay=spec.data.label_delay, per=per, seed=models.seed)
    prequential_table = None
    if isinstance(split, PrequentialSplit):
        return _train_prequential(spec, ds, split, say, seconds, trials)
    assert isinstance(split, TimeSplit)
    tr, va, te = split.train, split.validation, split.test
    for name, mask in (("train", tr), ("validation", va), ("test", te)):
        _require_classes(f"The {name} window {split.windows[name].label() if name in split.windows else ''}",
                         ds.y[mask])
    say(f"split by {split.strategy}: train {int(tr.sum()):,} / validation {int(va.sum()):,} / test "
        f"{int(te.sum()):,} rows (gap {split.gap})")

    # Leakage, before any model sees the data.
    leakage = _leakage(spec, ds, split)
    raise_on_severe(leakage, allow=models.allow_leakage)

    Xall = ds.X.to_numpy(dtype=np.float64)
    X_tr, y_tr = Xall[tr], ds.y[tr]
    X_va, y_va = Xall[va], ds.y[va]
    scorer = scorer_for(spec)
    va_times = ds.times[va] if ds.times is not None else None
    va_entity = ds.entity[va] if ds.entity is not None else None

    def val_score(s: np.ndarray) -> float:
        return scorer(y_va, s, times=va_times, entity=va_entity)

    # Baselines.
    t1 = time.perf_counter()
    fitted: list[tuple[str, str, str, Any, dict[str, Any], float, int]] = []
    for name, kind, model, params in _baselines(spec, ds, tr):
        fitted.append((name, "baseline", kind, model, params, val_score(model.predict_proba(ds.X[va])[:, 1]), 1))
    seconds["baselines"] = time.perf_counter() - t1

    # Candidates: timeboxed random search on validation.
    rng = np.random.default_rng(models.seed)
    budget_per_family = models.search_budget_seconds / max(len(models.candidates), 1)
    search_budget: dict[str, Any] = {"trials_per_family": models.search_trials,
                                     "seconds_per_family": budget_per_family, "families": {}}
    for family in models.candidates:
        t_family = time.perf_counter()
        best_params, best_score, best_model, tried = None, None, None, 0
        for trial in range(trials.get(family, models.search_trials) if trials else models.search_trials):
            if trials is None and trial > 0 and time.perf_counter() - t_family > budget_per_family:
                break
            params = _trial_params(family, trial, models.class_weight, rng)
            model = fit_candidate(family, params, X_tr, y_tr, seed=models.seed,
                                  class_weight=models.class_weight, threads=threads,
                                  feature_names=ds.feature_names)
            score = val_score(raw_scores(family, model, X_va, threads))
            tried += 1
            better = best_score is None or (score < best_score if scorer.lower_is_better else score > best_score)
            if better:
                best_params, best_score, best_model = params, score, model
        elapsed = time.perf_counter() - t_family
        search_budget["families"][family] = {"trials": tried, "seconds": round(elapsed, 2)}
        say(f"{family}: {tried} trial(s) in {elapsed:.1f} s, best validation {scorer.name} {best_score:.4f}")
        assert best_params is not None and best_score is not None
        fitted.append((family, "candidate", family, best_model, dict(best_params), best_score, tried))
    candidates = [f for f in fitted if f[1] == "candidate"]
    if not candidates:
        raise TrainingError("models.candidates is empty; list at least one model family.")
    if models.ensemble == "mean" and len(candidates) > 1:
        ensemble = Ensemble([(f[2], f[3]) for f in candidates], [
            fitted_positive_weight(f[2], f[4], y_tr, class_weight=models.class_weight) for f in candidates])
        ens_score = val_score(raw_scores("ensemble", ensemble, X_va, threads))
        say(f"ensemble (mean of {', '.join(ensemble.kinds)}): validation {scorer.name} {ens_score:.4f}")
        fitted.append(("ensemble", "candidate", "ensemble", ensemble,
                       {"members": {f[2]: f[4] for f in candidates}}, ens_score, 1))
        candidates = [f for f in fitted if f[1] == "candidate"]
    seconds["candidates"] = time.perf_counter() - t1 - seconds["baselines"]

    details = {f[0]: scorer.detail(y_va, raw_scores(f[2], f[3], X_va, threads), times=va_times, entity=va_entity)
               for f in candidates}
    chosen_name, why = choose_on_validation(details, lower_is_better=scorer.lower_is_better)
    say(f"chosen on validation: {chosen_name} ({why})")
    search_budget["selection"] = why
    chosen = next(f for f in candidates if f[0] == chosen_name)

    # Calibration and threshold for every model on validation (each baseline gets its fair threshold).
    capacity = spec.decision.capacity
    va_costs = ds.costs.take(va)
    va_period = M.period_index(ds.times[va], capacity.per) if capacity and ds.times is not None else None
    evaluated: list[Evaluated] = []
    chosen_calibration = None
    chosen_threshold = None
    te_times = ds.times[te] if ds.times is not None else None
    te_entity = ds.entity[te] if ds.entity is not None else None
    te_costs = ds.costs.take(te)
    test_scores_best = None
    for name, role, kind, model, params, vscore, tried in fitted:
        raw_va = model.predict_proba(ds.X[va])[:, 1] if role == "baseline" else raw_scores(kind, model, X_va, threads)
        calibrator = None
        if f_is(chosen, name):
            choice = choose_calibration(y_va, raw_va, models.calibration, seed=models.seed)
            calibrator = choice.calibrator
            chosen_calibration = choice
            s_va = calibrator.transform(raw_va)
        else:
            s_va = np.clip(raw_va, 0, 1)
        th = choose_threshold(y_va, s_va, va_costs,
                              capacity=capacity.max_positives if capacity and va_period is not None else None,
                              period=va_period)
        raw_te = (model.predict_proba(ds.X[te])[:, 1] if role == "baseline"
                  else raw_scores(kind, model, Xall[te], threads))
        s_te = calibrator.transform(raw_te) if calibrator is not None else np.clip(raw_te, 0, 1)
        test, intervals = evaluate_window(ds.y[te], s_te, threshold=th.threshold, costs=te_costs, times=te_times,
                                          entity=te_entity, k=k, per=per, bootstrap=models.bootstrap,
                                          seed=models.seed)
        ev = Evaluated(name=name, role=role, kind=kind, params=params, validation_score=vscore,
                       threshold=th.threshold, test=test, intervals=intervals, test_scores=s_te, trials=tried)
        evaluated.append(ev)
        if f_is(chosen, name):
            chosen_threshold = th
            test_scores_best = s_te
            best_model_obj, best_calibrator = model, calibrator
    best = next(e for e in evaluated if f_is(chosen, e.name))
    assert chosen_calibration is not None and chosen_threshold is not None and test_scores_best is not None

    beats = _beats(best, [e for e in evaluated if e.role == "baseline"])
    slices = _error_analysis(spec, ds, te, test_scores_best, chosen_threshold.threshold)

    artifact = _artifact(spec, ds, best, best_model_obj, best_calibrator, chosen_threshold.threshold,
                         split.windows)
    seconds["total"] = time.perf_counter() - t0
    return TrainOutcome(
        spec=spec, model=artifact, best=best, evaluated=evaluated, windows=split.windows,
        split_warning=split.warning, removed_known_positives=split.removed_known_positives,
        calibration_table=chosen_calibration.table, threshold_choice=chosen_threshold, leakage=leakage,
        slices=slices, dataset=ds, test_mask=te, validation_mask=va,
        test_scores=test_scores_best, seconds=seconds, search_budget=search_budget, beats_baselines=beats,
        prequential=prequential_table,
    )


def _artifact(spec: Spec, ds: Dataset, best: Evaluated, estimator: Any, calibrator: Any, threshold: float,
              windows: dict[str, Window], protocol: str | None = None) -> DecisionModel:
    """The deployable artifact of the chosen model, with the lineage the registry, serving and docs read."""
    metadata: dict[str, Any] = {
        "spec_hash": spec.spec_hash(),
        "project": spec.project.name,
        "data_source": ds.source.describe(),
        "data_fingerprint": ds.fingerprint,
        "definitions_hash": ds.definitions_hash,
        "windows": {k: {"start": str(w.start), "end": str(w.end), "rows": w.rows, "positives": w.positives}
                    for k, w in windows.items()},
        "params": best.params,
        "headline_metric": spec.decision.headline_metric,
        "test_metrics": {k: v for k, v in best.test.items() if np.isfinite(v)},
        "categories": ds.categories,
        "fallback_rule": spec.fallback_rule,
    }
    if protocol:
        metadata["protocol"] = protocol
    return DecisionModel(
        kind=best.kind, feature_names=ds.feature_names, estimator=estimator, calibrator=calibrator,
        threshold=threshold, abstain_band=spec.models.abstain_band, positive_action=spec.decision.positive_action,
        negative_action=spec.decision.negative_action, metadata=metadata, categories=ds.categories,
    )


MIN_CLASS_ROWS = 5


def _require_classes(what: str, y: np.ndarray) -> None:
    """Each window needs a few rows of each class: calibration cross-fits and every ranking metric need them."""
    pos = int(y.sum())
    neg = len(y) - pos
    if min(pos, neg) < MIN_CLASS_ROWS:
        raise TrainingError(
            f"{what} has {len(y):,} rows with {pos} positives and {neg} negatives; too few to train and evaluate "
            f"honestly (at least {MIN_CLASS_ROWS} of each class per window).",
            hint="Collect more data, widen the windows in [split], or check data.label and data.positive_label.",
        )


def f_is(fitted: tuple[Any, ...], name: str) -> bool:
    return fitted[0] == name


def _beats(best: Evaluated, baselines: list[Evaluated]) -> dict[str, dict[str, bool]]:
    """For each baseline and headline metric: does the best model win with non-overlapping intervals?"""
    out: dict[str, dict[str, bool]] = {}
    for b in baselines:
        row = {}
        for metric in ("average_precision", "card_precision_at_k"):
            mine, theirs = best.intervals.get(metric), b.intervals.get(metric)
            if mine is not None and theirs is not None:
                row[metric] = mine.low > theirs.high
        out[b.name] = row
    return out


@dataclass(frozen=True)
class _Masks:
    train: np.ndarray
    test: np.ndarray
    strategy: str


def _leakage(spec: Spec, ds: Dataset, split: TimeSplit | _Masks) -> list[Any]:
    """Leakage findings on the model inputs, plus (as warnings) what the excluded columns would have leaked."""
    from dataclasses import replace

    from keel.evaluate.leakage import check_leakage

    data = spec.data
    keys = [c for c in (data.id_column, *data.entity_keys) if c and c in ds.frame.columns]
    frame = ds.X.copy()
    for c in keys:
        if c not in frame.columns:
            frame[c] = ds.frame[c].to_numpy()
    tr, te = split.train, split.test
    findings = check_leakage(
        frame[tr], ds.y[tr], features=ds.feature_names, test=frame[te], id_column=data.id_column,
        # Shared entities across a time split are normal (a card keeps paying); only a random split leaks them.
        entity_columns=[c for c in data.entity_keys if c in frame.columns] if split.strategy == "random" else [],
        unavailable=[c for c in ds.feature_names if c in data.exclude],
        auc_threshold=spec.models.leakage_auc, seed=spec.models.seed,
    )
    excluded = [c for c in data.exclude if c in ds.frame.columns and c not in ds.feature_names
                and pd.api.types.is_numeric_dtype(ds.frame[c])]
    if excluded:
        side = ds.frame.loc[tr, excluded].reset_index(drop=True)
        for f in check_leakage(side, ds.y[tr], features=excluded, auc_threshold=spec.models.leakage_auc,
                               seed=spec.models.seed):
            if f.column in excluded:
                findings.append(replace(f, severity="warning",
                                        reason=f"excluded from the inputs by data.exclude, rightly: {f.reason}"))
    return findings


def _error_analysis(spec: Spec, ds: Dataset, te: np.ndarray, scores: np.ndarray,
                    threshold: float) -> ErrorAnalysis:
    from keel.evaluate import slices as S

    y = ds.y[te]
    costs = ds.costs.take(te)
    frame = ds.X[te].reset_index(drop=True)
    times = ds.times[te] if ds.times is not None else None
    table = S.slice_metrics(frame, y, scores, features=ds.feature_names, threshold=threshold, costs=costs,
                            time=times)
    worst = S.worst_slices(table, "average_precision", min_support=max(30, len(y) // 200), n=10)
    extra = [c for c in dict.fromkeys((spec.data.id_column, spec.data.timestamp, *spec.data.entity_keys)) if c]
    context = pd.concat([ds.frame.loc[te, extra].reset_index(drop=True), frame], axis=1) if extra else frame
    costliest = S.costliest_errors(context, y, scores, threshold=threshold, costs=costs, n=10)
    return ErrorAnalysis(table=table, worst=worst, costliest=costliest)


def _train_prequential(spec: Spec, ds: Dataset, split: PrequentialSplit, say: Progress,
                       seconds: dict[str, float], trials: dict[str, int] | None = None) -> TrainOutcome:
    """Rolling evaluation (handbook protocol): parameters chosen on validation folds, assessed on test folds.

    Every model family's hyper-parameters are chosen by its mean headline metric over the validation folds;
    the chosen parameters are then refit on each test fold's training window and assessed on its block, and
    the table reports mean and standard deviation across test folds. The deployed artifact is the chosen
    family refit on the most recent test fold's training window, calibrated and thresholded on that fold's
    block (the evaluation is complete by then; that block plays validation for the deployed model).
    """
    models = spec.models
    threads = models.threads
    scorer = scorer_for(spec)
    Xall = ds.X.to_numpy(dtype=np.float64)
    t0 = time.perf_counter()

    def fold_arrays(fold: Any) -> tuple[np.ndarray, ...]:
        tr, te = fold.train, fold.assess
        return Xall[tr], ds.y[tr], Xall[te], ds.y[te], tr, te

    for name, folds in (("validation", split.validation), ("test", split.test)):
        for i, fold in enumerate(folds):
            for part, mask in (("training", fold.train), ("assessment", fold.assess)):
                _require_classes(f"Prequential {name} fold {i}'s {part} window", ds.y[mask])

    def fold_detail(fold: Any, s: np.ndarray) -> ValidationScore:
        te = fold.assess
        return scorer.detail(ds.y[te], s, times=ds.times[te] if ds.times is not None else None,
                             entity=ds.entity[te] if ds.entity is not None else None)

    def fold_score(kind: str, params: dict[str, Any], fold: Any, baseline: Any = None) -> tuple[float, Any]:
        X_tr, y_tr, X_te, y_te, tr, te = fold_arrays(fold)
        if baseline is not None:
            model = baseline(ds.X[tr], y_tr)
            s = model.predict_proba(ds.X[te])[:, 1]
        else:
            model = fit_candidate(kind, params, X_tr, y_tr, seed=models.seed, class_weight=models.class_weight,
                                  threads=threads, feature_names=ds.feature_names)
            s = raw_scores(kind, model, X_te, threads)
        times = ds.times[te] if ds.times is not None else None
        entity = ds.entity[te] if ds.entity is not None else None
        return scorer(y_te, s, times=times, entity=entity), (model, s)

    def fit_member(kind: str, params: dict[str, Any], rows: np.ndarray) -> Any:
        """The chosen parameters of one family (every member of an ensemble) fitted on ``rows``."""
        if kind == "ensemble":
            return Ensemble([(k, fit_member(k, p, rows)) for k, p in params["members"].items()], [
                fitted_positive_weight(k, p, ds.y[rows], class_weight=models.class_weight)
                for k, p in params["members"].items()])
        return fit_candidate(kind, params, Xall[rows], ds.y[rows], seed=models.seed,
                             class_weight=models.class_weight, threads=threads, feature_names=ds.feature_names)

    baseline_makers = [(name, kind, maker) for name, kind, maker, _p in _baseline_makers(spec, ds)]

    rng = np.random.default_rng(models.seed)
    budget_per_family = models.search_budget_seconds / max(len(models.candidates), 1)
    chosen_params: dict[str, dict[str, Any]] = {}
    validation_means: dict[str, float] = {}
    validation_detail: dict[str, ValidationScore] = {}
    validation_raw: dict[str, list[np.ndarray]] = {}  # best trial's raw scores per validation fold
    search_budget: dict[str, Any] = {"trials_per_family": models.search_trials,
                                     "seconds_per_family": budget_per_family, "families": {}}
    for family in models.candidates:
        t_family = time.perf_counter()
        best: tuple[float, dict[str, Any]] | None = None
        tried = 0
        for trial in range(trials.get(family, models.search_trials) if trials else models.search_trials):
            if trials is None and trial > 0 and time.perf_counter() - t_family > budget_per_family:
                break
            params = _trial_params(family, trial, models.class_weight, rng)
            results = [fold_score(family, params, f) for f in split.validation]
            mean = float(np.mean([r[0] for r in results]))
            tried += 1
            if best is None or (mean < best[0] if scorer.lower_is_better else mean > best[0]):
                best = (mean, params)
                validation_raw[family] = [r[1][1] for r in results]
        assert best is not None
        chosen_params[family], validation_means[family] = dict(best[1]), best[0]
        validation_detail[family] = ValidationScore.pooled(
            [fold_detail(f, s) for f, s in zip(split.validation, validation_raw[family], strict=True)])
        elapsed = time.perf_counter() - t_family
        search_budget["families"][family] = {"trials": tried, "seconds": round(elapsed, 2)}
        say(f"{family}: {tried} trial(s) over {len(split.validation)} validation folds in {elapsed:.1f} s, "
            f"mean validation {scorer.name} {best[0]:.4f} (average precision "
            f"{validation_detail[family].average_precision:.4f})")
    candidates = list(models.candidates)
    if models.ensemble == "mean" and len(models.candidates) > 1:
        # No new fit: the members' validation scores are the ones their search already computed.
        chosen_params["ensemble"] = {"members": {f: dict(chosen_params[f]) for f in models.candidates}}
        members = chosen_params["ensemble"]["members"]
        ens_raw = [member_mean(members, {f: validation_raw[f][i] for f in members}, ds.y[fold.train],
                               class_weight=models.class_weight)
                   for i, fold in enumerate(split.validation)]
        validation_detail["ensemble"] = ValidationScore.pooled(
            [fold_detail(f, s) for f, s in zip(split.validation, ens_raw, strict=True)])
        validation_means["ensemble"] = validation_detail["ensemble"].headline
        candidates.append("ensemble")
        say(f"ensemble (mean of {', '.join(models.candidates)}): mean validation {scorer.name} "
            f"{validation_means['ensemble']:.4f} (average precision "
            f"{validation_detail['ensemble'].average_precision:.4f})")
    seconds["search"] = time.perf_counter() - t0

    k_spec = spec.decision.precision_at_k
    k, per = (k_spec.k, k_spec.per) if k_spec else (100, timedelta(days=1))
    rows: list[dict[str, Any]] = []
    entries: list[tuple[str, str, str, Any]] = [(n, "baseline", kind, mk) for n, kind, mk in baseline_makers]
    entries += [(family, "candidate", family, None) for family in candidates]
    test_raw: dict[str, list[np.ndarray]] = {}
    for name, role, kind, maker in entries:
        if role == "baseline":
            validation_means[name] = float(np.mean([fold_score(kind, {}, f, maker)[0] for f in split.validation]))
        for i, fold in enumerate(split.test):
            if kind == "ensemble":  # the members' test scores on this fold, already computed above
                members = chosen_params["ensemble"]["members"]
                s = member_mean(members, {f: test_raw[f][i] for f in members}, ds.y[fold.train],
                                class_weight=models.class_weight)
            else:
                _, (_model, s) = fold_score(kind, chosen_params.get(kind, {}), fold, maker)
            test_raw.setdefault(name, []).append(s)
            te = fold.assess
            p = np.clip(s, 0, 1)
            y_te = ds.y[te]
            row: dict[str, Any] = {"model": name, "role": role, "fold": i,
                                   "test_window": fold.assess_window.label(),
                                   "train_window": fold.train_window.label(),
                                   "roc_auc": M.roc_auc(y_te, p), "average_precision": M.average_precision(y_te, p)}
            if ds.times is not None and ds.entity is not None:
                row["card_precision_at_k"] = M.card_precision_at_k(
                    p, y_te, entity=ds.entity[te], period=M.period_index(ds.times[te], per), k=k).mean
            rows.append(row)
    table = pd.DataFrame(rows)
    seconds["assessment"] = time.perf_counter() - t0 - seconds["search"]

    chosen_family, why = choose_on_validation({c: validation_detail[c] for c in candidates},
                                              lower_is_better=scorer.lower_is_better)
    say(f"chosen on validation: {chosen_family} ({why})")
    search_budget["selection"] = why
    # The deployed model: the chosen family fitted on the latest validation fold's training window, calibrated
    # and thresholded on that fold's block, then assessed on the earliest test block (train | gap | validation |
    # gap | test, as in the single protocol), so no number below is in-sample.
    vfold, tfold = split.validation[0], split.test[-1]
    va, te = vfold.assess, tfold.assess
    model = fit_member(chosen_family, chosen_params[chosen_family], vfold.train)
    raw_va = raw_scores(chosen_family, model, Xall[va], threads)
    choice = choose_calibration(ds.y[va], raw_va, models.calibration, seed=models.seed)
    capacity = spec.decision.capacity
    period = M.period_index(ds.times[va], capacity.per) if capacity and ds.times is not None else None
    th = choose_threshold(ds.y[va], choice.calibrator.transform(raw_va), ds.costs.take(va),
                          capacity=capacity.max_positives if capacity and period is not None else None,
                          period=period)
    s_te = choice.calibrator.transform(raw_scores(chosen_family, model, Xall[te], threads))
    y_te = ds.y[te]
    deployed_test, _intervals = evaluate_window(
        y_te, s_te, threshold=th.threshold, costs=ds.costs.take(te),
        times=ds.times[te] if ds.times is not None else None,
        entity=ds.entity[te] if ds.entity is not None else None, k=k, per=per, bootstrap=models.bootstrap,
        seed=models.seed)
    leakage = _leakage(spec, ds, _Masks(train=vfold.train, test=te, strategy="time"))
    raise_on_severe(leakage, allow=models.allow_leakage)

    metric_names = [c for c in ("roc_auc", "average_precision", "card_precision_at_k") if c in table.columns]
    evaluated: list[Evaluated] = []
    for name, role, kind, _maker in entries:
        sub = table[table["model"] == name]
        test = {m: float(sub[m].mean()) for m in metric_names}
        test.update({f"{m}_std": float(sub[m].std(ddof=0)) for m in metric_names})
        evaluated.append(Evaluated(name=name, role=role, kind=kind, params=chosen_params.get(kind, {}),
                                   validation_score=validation_means[name], threshold=float("nan"), test=test,
                                   trials=search_budget["families"].get(kind, {}).get("trials", 1)))
    best_eval = next(e for e in evaluated if e.name == chosen_family)
    best_eval.threshold = th.threshold
    # Threshold-dependent figures of the deployed model (earliest test block); rank metrics stay prequential means.
    for key2, value in deployed_test.items():
        best_eval.test.setdefault(key2, value)
    best_eval.test_scores = s_te
    beats = {e.name: {m: best_eval.test[m] - best_eval.test[f"{m}_std"] > e.test[m] + e.test[f"{m}_std"]
                      for m in ("average_precision", "card_precision_at_k") if m in e.test}
             for e in evaluated if e.role == "baseline"}
    slices = _error_analysis(spec, ds, te, s_te, th.threshold)
    windows = {"train": vfold.train_window, "validation": vfold.assess_window, "test": tfold.assess_window}
    artifact = _artifact(spec, ds, best_eval, model, choice.calibrator, th.threshold, windows,
                         protocol="prequential")
    seconds["total"] = time.perf_counter() - t0 + seconds.get("data_and_features", 0.0)
    removed = {f"test fold {i}": f.removed_known_positives for i, f in enumerate(split.test)}
    return TrainOutcome(
        spec=spec, model=artifact, best=best_eval, evaluated=evaluated, windows=windows, split_warning=None,
        removed_known_positives=removed, calibration_table=choice.table, threshold_choice=th, leakage=leakage,
        slices=slices, dataset=ds, test_mask=te, validation_mask=va,
        test_scores=s_te, seconds=seconds, search_budget=search_budget, beats_baselines=beats,
        prequential=table,
    )


# ------------------------------------------------------------------------------------ registry hand-off
@dataclass(frozen=True)
class Registered:
    run_id: str
    version: int
    aliases: list[str]
    note: str


def record(outcome: TrainOutcome, registry: Any, *, artifacts: dict[str, Path] | None = None,
           actor: str = "keel train") -> Registered:
    """Log the run, register the model as challenger, and make it champion when there is none yet.

    The first model becomes champion only if it beats every baseline on the headline metric; otherwise it stays
    challenger and the note says why. Later models are promoted by `keel models promote` (which refuses a model
    that does not beat the champion).
    """
    spec = outcome.spec
    best = outcome.best
    params = {"model": best.kind, **{f"model.{k}": v for k, v in best.params.items()},
              "protocol": spec.split.protocol, "threshold": outcome.model.threshold,
              "calibration": outcome.model.calibrator.method if outcome.model.calibrator else "none",
              "search": {f: v["trials"] for f, v in outcome.search_budget["families"].items()},
              "search_seconds_per_family": outcome.search_budget["seconds_per_family"]}
    info = registry.log_run(
        spec=spec, model=outcome.model, metrics=outcome.metrics(), params=params,
        data_source=outcome.dataset.source.describe(), data_fingerprint=outcome.dataset.fingerprint,
        windows={k: (w.start, w.end) for k, w in outcome.windows.items()}, artifacts=artifacts or {},
        tags={"definitions_hash": outcome.dataset.definitions_hash or "", "deployment": spec.project.deployment},
    )
    version = registry.register(info.run_id, alias="challenger", actor=actor, reason="trained by keel train")
    from keel.monitor.profile import ensure_profile

    # The reference profile monitoring compares against, computed once from the frame already in memory.
    ensure_profile(spec, outcome.model, version.version, frame=outcome.dataset.frame)
    aliases = ["challenger"]
    note = "registered as challenger"
    if registry.resolve("champion") is None:
        metric = scorer_for(spec).name
        mine = best.test.get(metric)
        lower = metric in LOWER_IS_BETTER
        losing = [b.name for b in outcome.baselines if mine is None or b.test.get(metric) is None
                  or (mine >= b.test[metric] if lower else mine <= b.test[metric])]
        if losing:
            note = f"left as challenger: it does not beat {', '.join(losing)} on {metric}"
        else:
            registry.promote(version.version, actor=actor,
                             reason=f"first model; beats every baseline on test {metric} (point estimates)")
            aliases.append("champion")
            note = f"promoted to champion (first model; beats every baseline on test {metric}, point estimates)"
    return Registered(run_id=info.run_id, version=version.version, aliases=aliases, note=note)


def reproduce(registry: Any, run_id: str, *, progress: Progress | None = None,
              tolerance: float = 1e-9) -> tuple[TrainOutcome, list[tuple[str, float, float | None, bool]]]:
    """Re-train a recorded run from its spec and data reference; compare every recorded test metric."""
    from keel.errors import DataError

    rec = registry.recorded_inputs(run_id)
    spec = rec.spec()
    ds = load_dataset(spec, progress=progress)
    if ds.fingerprint != rec.data_fingerprint:
        raise DataError(
            f"The data at {ds.source.describe()} changed since run {run_id}: fingerprint {ds.fingerprint[:12]}, "
            f"recorded {rec.data_fingerprint[:12]}.",
            hint="Restore the recorded data to reproduce the run; a different table gives different numbers.",
        )
    recorded_trials = {k.removeprefix("search."): int(v) for k, v in rec.params.items()
                       if k.startswith("search.") and k != "search_seconds_per_family"}
    outcome = train(spec, dataset=ds, progress=progress, trials=recorded_trials or None)
    fresh = outcome.metrics()
    rows = []
    for name, old in sorted(rec.metrics.items()):
        key = name if name in fresh else None
        new = fresh.get(key) if key else None
        rows.append((name, old, new, new is not None and abs(new - old) <= tolerance * max(1.0, abs(old))))
    return outcome, rows


__all__ = ["Dataset", "Evaluated", "Registered", "TrainOutcome", "fit_candidate", "load_dataset", "record",
           "reproduce", "train"]
