"""Baseline behaviour: beats the prior on signal, direction, invariance, JSON round-trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from keel.errors import TrainingError
from keel.evaluate.baselines import (
    LogisticBaseline,
    PriorBaseline,
    RuleBaseline,
    SingleFeatureRule,
    baseline_from_dict,
    fit_baselines,
)
from keel.evaluate.metrics import average_precision, roc_auc


def _table(n: int = 6000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    amount = rng.exponential(60, n)
    count = rng.poisson(3, n).astype(float)
    noise = rng.normal(size=n)
    logit = -5 + 0.02 * amount + 0.4 * count
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    amount[rng.random(n) < 0.05] = np.nan  # missing values must not break anything
    return pd.DataFrame({"tx_amount": amount, "count": count, "noise": noise}), y


@pytest.fixture(scope="module")
def data():
    X, y = _table(seed=0)
    Xt, yt = _table(seed=1)
    return X, y, Xt, yt


def test_logistic_beats_the_prior_on_a_known_signal_table(data):
    X, y, Xt, yt = data
    prior = PriorBaseline().fit(X, y)
    logistic = LogisticBaseline().fit(X, y)
    assert prior.predict_proba(Xt)[:, 1] == pytest.approx(np.full(len(Xt), y.mean()))
    assert logistic.score(Xt, yt) > 2 * prior.score(Xt, yt)
    assert roc_auc(yt, logistic.predict_proba(Xt)[:, 1]) > 0.75
    assert logistic.coef_[0] > 0 and logistic.coef_[1] > 0  # amount and count raise risk


def test_single_feature_rule_finds_the_signal_feature(data):
    X, y, Xt, yt = data
    rule = SingleFeatureRule().fit(X, y)
    assert rule.feature_ in {"tx_amount", "count"} and rule.operator_ == ">="
    assert rule.youden_ > 0.2
    assert rule.rate_fire_ > rule.rate_rest_
    assert average_precision(yt, rule.predict_proba(Xt)[:, 1]) > yt.mean()


def test_direction_a_larger_amount_scores_higher_under_the_amount_rule(data):
    X, y, _, _ = data
    rule = RuleBaseline("tx_amount > 220").fit(X, y)
    probe = pd.DataFrame({"tx_amount": [10.0, 219.0, 221.0, 5000.0], "count": 3.0, "noise": 0.0})
    p = rule.predict_proba(probe)[:, 1]
    assert rule.predict(probe).tolist() == [0, 0, 1, 1]
    assert p[2] > p[1] and np.all(np.diff(p) >= 0)
    lr = LogisticBaseline().fit(X, y)
    assert np.all(np.diff(lr.predict_proba(probe)[:, 1]) > 0)


def test_invariance_a_shuffled_irrelevant_column_changes_little(data):
    X, y, Xt, yt = data
    shuffled = X.assign(noise=np.random.default_rng(9).permutation(X["noise"].to_numpy()))
    a = LogisticBaseline().fit(X, y).predict_proba(Xt)[:, 1]
    b = LogisticBaseline().fit(shuffled, y).predict_proba(Xt)[:, 1]
    assert np.median(np.abs(a - b)) < 0.01
    assert abs(roc_auc(yt, a) - roc_auc(yt, b)) < 0.005
    r1 = SingleFeatureRule().fit(X, y)
    r2 = SingleFeatureRule().fit(shuffled, y)
    assert r1.to_dict() == r2.to_dict()


@pytest.mark.parametrize("make", [
    PriorBaseline, lambda: RuleBaseline("tx_amount > 220"), SingleFeatureRule, LogisticBaseline,
])
def test_json_round_trip_scores_identically(data, make):
    X, y, Xt, _ = data
    fitted = make().fit(X, y)
    loaded = baseline_from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert type(loaded) is type(fitted)
    assert np.array_equal(loaded.predict_proba(Xt), fitted.predict_proba(Xt))


def test_fit_baselines_returns_the_standard_set(data):
    X, y, _, _ = data
    fitted = fit_baselines(X, y, rule="tx_amount > 220")
    assert set(fitted) == {"prior", "single_feature_rule", "logistic_regression", "rule"}


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (lambda X, y: LogisticBaseline().fit(X, np.zeros(len(X))), "both classes"),
        (lambda X, y: SingleFeatureRule().fit(X, np.ones(len(X))), "both classes"),
        (lambda X, y: PriorBaseline().predict_proba(X), "not fitted"),
        (lambda X, y: RuleBaseline("nope > 1").fit(X, y), "nope"),
        (lambda X, y: LogisticBaseline().fit(X, y[:10]), "rows"),
        (lambda X, y: LogisticBaseline(["tx_amount", "city"]).fit(X.assign(city="x"), y), "not numeric"),
        (lambda X, y: LogisticBaseline().fit(X.to_numpy(), y), "DataFrame"),
        (lambda X, y: baseline_from_dict({"kind": "magic"}), "Unknown baseline"),
    ],
)
def test_impossible_input_raises(data, action, match):
    X, y, _, _ = data
    with pytest.raises(TrainingError, match=match):
        action(X, y)


def test_tiny_table_still_fits():
    X = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0, np.nan], "b": [0.0, 0.0, 0.0, 0.0, 0.0]})
    y = np.array([0, 0, 1, 1, 0])
    p = LogisticBaseline().fit(X, y).predict_proba(X)[:, 1]
    assert np.isfinite(p).all() and p[3] > p[0]
