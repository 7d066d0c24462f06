"""Calibration: methods fit what they claim, the choice is honest, and calibrators round-trip as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from keel.errors import TrainingError
from keel.evaluate.calibration import Calibrator, choose_calibration, fit_calibrator
from keel.evaluate.metrics import brier


def _overconfident(n: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    true_p = rng.uniform(0.02, 0.6, n)
    y = (rng.random(n) < true_p).astype(int)
    logit = np.log(true_p / (1 - true_p))
    raw = 1 / (1 + np.exp(-3 * logit - 1.5))  # too extreme and shifted
    return y, raw, true_p


def test_sigmoid_recovers_the_distortion():
    y, raw, _ = _overconfident(20000)
    cal = fit_calibrator(y, raw, "sigmoid")
    assert cal.a == pytest.approx(1 / 3, abs=0.05)
    assert cal.b == pytest.approx(-0.5, abs=0.12)
    assert brier(y, cal.transform(raw)) < brier(y, raw)


def test_isotonic_matches_sklearn():
    y, raw, _ = _overconfident(3000, seed=1)
    cal = fit_calibrator(y, raw, "isotonic")
    ref = IsotonicRegression(out_of_bounds="clip").fit(raw, y)
    grid = np.linspace(0, 1, 501)
    assert np.allclose(cal.transform(grid), ref.predict(grid), atol=1e-9)
    assert np.all(np.diff(cal.transform(grid)) >= 0)


def test_choice_prefers_a_correction_when_scores_are_miscalibrated():
    y, raw, _ = _overconfident(6000, seed=2)
    choice = choose_calibration(y, raw, seed=0)
    assert choice.calibrator.method in {"sigmoid", "isotonic"}
    assert choice.table.set_index("method").loc["none", "brier"] > choice.table["brier"].min()
    assert choice.table["chosen"].sum() == 1


def test_choice_keeps_none_for_calibrated_scores():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.01, 0.9, 6000)
    y = (rng.random(6000) < p).astype(int)
    choice = choose_calibration(y, p, methods=("none", "isotonic"), seed=0)
    # Cross-fitting stops isotonic from winning by memorising the validation rows.
    assert choice.calibrator.method == "none"


def test_none_is_skipped_with_a_reason_for_non_probability_scores():
    rng = np.random.default_rng(5)
    y = (rng.random(500) < 0.3).astype(int)
    s = rng.normal(y, 1.0)
    choice = choose_calibration(y, s, methods=("none", "isotonic"))
    assert choice.calibrator.method == "isotonic"
    assert "probabilities" in choice.table.set_index("method").loc["none", "error"]


@pytest.mark.parametrize("method", ["none", "sigmoid", "isotonic"])
def test_calibrators_round_trip_through_json(method):
    y, raw, _ = _overconfident(2000, seed=3)
    cal = fit_calibrator(y, raw, method)
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.array_equal(again.transform(raw), cal.transform(raw))


@pytest.mark.parametrize(
    ("data", "match"),
    [({"method": "magic"}, "Unknown calibration method"), ({"method": "sigmoid"}, "malformed"),
     ({"method": "isotonic", "x": [0.5, 0.1], "y": [0, 1]}, "malformed")],
)
def test_bad_descriptions_raise(data, match):
    with pytest.raises(TrainingError, match=match):
        Calibrator.from_dict(data)


def test_single_class_and_nan_raise():
    with pytest.raises(TrainingError, match="both classes"):
        choose_calibration(np.zeros(10), np.linspace(0, 1, 10))
    with pytest.raises(TrainingError, match="NaN"):
        fit_calibrator([0, 1], [0.2, np.nan], "sigmoid")
    with pytest.raises(TrainingError, match="NaN"):
        Calibrator("none").transform([np.nan])
