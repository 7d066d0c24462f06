"""Threshold choice: cheapest on validation with per-row costs, capacity binds when it must."""

from __future__ import annotations

import numpy as np
import pytest

from keel.errors import TrainingError
from keel.evaluate.metrics import expected_cost, make_row_costs
from keel.evaluate.threshold import ABSTAIN, abstain_summary, capacity_threshold, choose_threshold, decide


def _brute_force(y, s, costs):
    cands = np.r_[np.unique(s), np.inf]
    totals = [expected_cost(y, s, t, costs) for t in cands]
    return min(totals)


def test_cost_optimum_matches_brute_force_with_row_costs():
    rng = np.random.default_rng(0)
    n = 800
    y = (rng.random(n) < 0.1).astype(int)
    s = np.round(np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1), 2)
    amount = rng.exponential(100, n)
    costs = make_row_costs(n, false_negative=amount, false_positive=5.0, true_positive=5.0)
    choice = choose_threshold(y, s, costs)
    assert choice.expected_cost == pytest.approx(_brute_force(y, s, costs))
    assert expected_cost(y, s, choice.threshold, costs) == pytest.approx(choice.expected_cost)
    assert choice.bound == "cost" and choice.capacity_threshold is None
    assert choice.curve["expected_cost"].min() == pytest.approx(choice.expected_cost)


def test_costs_move_the_threshold():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.2).astype(int)
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1)
    cheap_miss = choose_threshold(y, s, make_row_costs(2000, false_negative=1.0, false_positive=1.0))
    dear_miss = choose_threshold(y, s, make_row_costs(2000, false_negative=50.0, false_positive=1.0))
    assert dear_miss.threshold < cheap_miss.threshold


def test_capacity_binds_and_keeps_every_day_within_capacity():
    rng = np.random.default_rng(2)
    days = np.repeat(np.arange(7), 1000)
    y = (rng.random(7000) < 0.05).astype(int)
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1)
    costs = make_row_costs(7000, false_negative=100.0, false_positive=1.0)
    free = choose_threshold(y, s, costs)
    capped = choose_threshold(y, s, costs, capacity=20, period=days)
    assert capped.bound == "capacity" and capped.threshold > free.threshold
    per_day = np.bincount(days[s >= capped.threshold])
    assert per_day.max() <= 20 and per_day.max() >= 15
    assert capped.expected_cost >= free.expected_cost
    assert "max_positives_per_period" in capped.curve


def test_capacity_with_ties_never_exceeds():
    s = np.array([0.9, 0.8, 0.8, 0.8, 0.1])
    t = capacity_threshold(s, np.zeros(5), max_positives=2)
    assert (s >= t).sum() == 1  # the tie at 0.8 cannot be split
    assert capacity_threshold(s, np.zeros(5), max_positives=10) == -np.inf


def test_loose_capacity_leaves_the_cost_optimum():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    choice = choose_threshold(y, s, make_row_costs(4, false_negative=10.0, false_positive=1.0),
                              capacity=100, period=np.zeros(4))
    assert choice.bound == "cost" and choice.expected_cost == 0.0
    assert 0.2 < choice.threshold <= 0.8


def test_threshold_errors():
    with pytest.raises(TrainingError, match="period"):
        choose_threshold([0, 1], [0.1, 0.9], make_row_costs(2), capacity=5)
    with pytest.raises(TrainingError, match="costs cover"):
        choose_threshold([0, 1], [0.1, 0.9], make_row_costs(3))


def test_decide_and_abstain_band():
    s = np.array([0.05, 0.35, 0.5, 0.95])
    assert decide(s, 0.5).tolist() == [0, 0, 1, 1]
    assert decide(s, 0.5, (0.3, 0.6)).tolist() == [0, ABSTAIN, ABSTAIN, 1]
    out = abstain_summary([0, 1, 1, 1], s, 0.5, (0.3, 0.6))
    assert out["abstain_rate"] == 0.5 and out["positives_abstained"] == 2.0
    with pytest.raises(TrainingError, match="abstain_band"):
        decide(s, 0.5, (0.6, 0.3))
