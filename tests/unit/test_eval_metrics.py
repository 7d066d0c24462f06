"""Metrics agree with scikit-learn; costs, Card Precision@k and the bootstrap behave as documented."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from keel.errors import TrainingError
from keel.evaluate.metrics import (
    average_precision,
    bootstrap,
    brier,
    card_precision_at_k,
    confusion,
    expected_calibration_error,
    expected_cost,
    log_loss,
    make_row_costs,
    period_index,
    reliability,
    roc_auc,
    row_costs,
    summary,
)
from keel.spec import Costs


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    n = 5000
    y = (rng.random(n) < 0.05).astype(int)
    s = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1), 2)  # rounded: many ties
    w = rng.integers(0, 4, n)
    return y, s, w


def test_ranking_metrics_match_sklearn(data):
    y, s, w = data
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert roc_auc(y, s, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert average_precision(y, s, w) == pytest.approx(skm.average_precision_score(y, s, sample_weight=w), abs=1e-12)


def test_probability_metrics_match_sklearn(data):
    y, s, _ = data
    assert brier(y, s) == pytest.approx(skm.brier_score_loss(y, s))
    p = np.clip(s, 0.01, 0.99)
    assert log_loss(y, p) == pytest.approx(skm.log_loss(y, p))
    cm = confusion(y, s, 0.5)
    tn, fp, fn, tp = skm.confusion_matrix(y, s >= 0.5).ravel()
    assert (cm.tp, cm.fp, cm.fn, cm.tn) == (tp, fp, fn, tn)
    assert cm.precision == pytest.approx(skm.precision_score(y, s >= 0.5))
    assert cm.recall == pytest.approx(skm.recall_score(y, s >= 0.5))
    assert cm.f1 == pytest.approx(skm.f1_score(y, s >= 0.5))


def test_ece_and_reliability():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9])
    table = reliability(y, p, bins=10)
    assert table["count"].tolist() == [4, 4]
    assert table["observed"].tolist() == [0.5, 0.75]
    assert expected_calibration_error(y, p, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.15)
    perfect = np.r_[np.zeros(90), np.ones(10)]
    assert expected_calibration_error(perfect, np.full(100, 0.1)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "only positives"),
        ([0, 0], [0.1, 0.2], "only negatives"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "must match"),
        ([], [], "empty"),
        ([0, 2], [0.1, 0.2], "0/1 or bool"),
    ],
)
def test_impossible_input_raises(y, s, match):
    with pytest.raises(TrainingError, match=match):
        roc_auc(y, s)


def test_brier_refuses_non_probabilities():
    with pytest.raises(TrainingError, match=r"\[0, 1\]"):
        brier([0, 1], [-1.0, 3.0])


def test_expected_cost_uses_per_row_costs():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.8, 0.2])
    frame = pd.DataFrame({"amount": [100.0, 50.0, 10.0, 5.0]})
    costs = row_costs(Costs(false_negative="amount", false_positive=2.0, true_positive=2.0), frame)
    assert costs.false_negative.tolist() == [100.0, 50.0, 10.0, 5.0]
    # TP (2) + FN (50) + FP (2) + TN (0) over 4 events
    assert expected_cost(y, s, 0.5, costs) == pytest.approx(54 / 4)
    assert expected_cost(y, s, 0.0, costs) == pytest.approx(8 / 4)


def test_row_costs_errors_name_the_key():
    with pytest.raises(TrainingError, match="false_negative"):
        row_costs(Costs(false_negative="missing_col"), pd.DataFrame({"a": [1.0]}))
    with pytest.raises(TrainingError, match="non-negative"):
        make_row_costs(2, false_negative=np.array([1.0, np.nan]))


def _handbook_cpk(df: pd.DataFrame, k: int) -> float:
    """The handbook's definition written the slow, obvious way (no ties in these scores)."""
    detected: list = []
    values = []
    for day in sorted(df.day.unique()):
        d = df[(df.day == day) & ~df.card.isin(detected)]
        g = d.groupby("card").max().sort_values("s", ascending=False).reset_index()
        top = g.head(k)
        hits = list(top[top.y == 1].card)
        values.append(len(hits) / k)
        detected.extend(hits)
    return float(np.mean(values))


def test_card_precision_matches_the_handbook_definition():
    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame({"day": rng.integers(0, 5, n), "card": rng.integers(0, 300, n)})
    risky = df.card < 30
    df["y"] = (risky & (rng.random(n) < 0.5)).astype(int)
    df["s"] = rng.random(n) + risky * 0.5
    for k in (5, 20, 100):
        got = card_precision_at_k(df.s, df.y, entity=df.card, period=df.day, k=k)
        assert got.mean == pytest.approx(_handbook_cpk(df, k))
    got = card_precision_at_k(df.s, df.y, entity=df.card, period=df.day, k=20)
    assert len(got.per_period) == 5 and got.per_period.max() <= 1
    without = card_precision_at_k(df.s, df.y, entity=df.card, period=df.day, k=20, remove_detected=False)
    assert without.mean > got.mean  # the same compromised cards keep scoring on later days


def test_card_precision_divides_by_k_and_breaks_ties_by_seed():
    y = np.array([1, 0, 0, 0])
    got = card_precision_at_k(np.ones(4), y, entity=[1, 2, 3, 4], period=[0, 0, 0, 0], k=10)
    assert got.mean == pytest.approx(0.1)
    hits = [card_precision_at_k(np.ones(4), y, entity=[1, 2, 3, 4], period=[0] * 4, k=1, seed=i).mean
            for i in range(40)]
    assert 0 < np.mean(hits) < 1  # ties are not resolved by id order


def test_period_index_days():
    t = pd.Series(pd.to_datetime(["2018-01-01 05:00", "2018-01-01 23:59", "2018-01-02 00:00", "2018-01-09 00:00"]))
    assert period_index(t).tolist() == [0, 0, 1, 8]


def test_bootstrap_interval_brackets_estimate_and_is_seeded(data):
    y, s, _ = data
    a = bootstrap("average_precision", y, s, n=100, seed=7)
    b = bootstrap(average_precision, y, s, n=100, seed=7)
    assert a.low < a.estimate < a.high
    assert (a.low, a.high) == pytest.approx((b.low, b.high))  # fast path == generic path
    c = bootstrap("roc_auc", y, s, n=100, seed=8)
    assert c.low < roc_auc(y, s) < c.high and c.resamples == 100
    wide = bootstrap("roc_auc", y[:400], s[:400], n=100, seed=7)
    assert wide.high - wide.low > c.high - c.low


def test_bootstrap_by_groups_and_of_per_period_values():
    rng = np.random.default_rng(1)
    days = np.repeat(np.arange(10), 200)
    day_effect = rng.normal(0, 0.3, 10)[days]
    y = (rng.random(2000) < 0.2).astype(int)
    s = rng.random(2000) + y * 0.3 + day_effect
    rows = bootstrap("brier", y, np.clip(s / 2, 0, 1), n=100, seed=0)
    grouped = bootstrap("brier", y, np.clip(s / 2, 0, 1), n=100, seed=0, groups=days)
    assert grouped.high - grouped.low > rows.high - rows.low  # clustered days: wider, honestly
    m = bootstrap("mean", np.array([0.2, 0.3, 0.25, 0.4]), n=200, seed=0)
    assert m.estimate == pytest.approx(0.2875) and 0.2 <= m.low <= m.high <= 0.4


def test_bootstrap_fails_loudly_when_resamples_are_degenerate():
    y = np.r_[1, np.zeros(99)]
    s = np.linspace(0, 1, 100)

    def needs_two_resampled_positives(y, s, sample_weight=None):
        if sample_weight is not None and (sample_weight * y).sum() < 2:
            raise TrainingError("too few positives")
        return roc_auc(y, s, sample_weight)

    # About 74 % of resamples hold fewer than two copies of the single positive.
    with pytest.raises(TrainingError, match="failed on"):
        bootstrap(needs_two_resampled_positives, y, s, n=50, seed=0)
    ok = bootstrap("roc_auc", y, s, n=50, seed=0)  # about 37 % undefined: dropped and counted
    assert 0 < ok.failed < 25 and ok.resamples == 50 - ok.failed


def test_summary_has_headline_metrics(data):
    y, s, _ = data
    out = summary(y, s, threshold=0.5, costs=make_row_costs(len(y), false_negative=10.0, false_positive=1.0))
    assert set(out) >= {"roc_auc", "average_precision", "brier", "log_loss", "ece", "precision", "expected_cost"}
