"""`models.ensemble = "mean"`: the mean of the candidate families' best models is one more candidate, chosen only on
validation, and when chosen it is the artifact (members saved, calibrated, thresholded).

The table is the behaviour suite's known-signal table; models run single-threaded with one trial per family.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train_behaviour import _spec, _table

from keel.artifact import DecisionModel
from keel.evaluate import metrics as M
from keel.evaluate.report import build_report, render_markdown
from keel.train import TrainOutcome, ValidationScore, choose_on_validation, train

MEMBERS = ["lightgbm", "logistic_regression"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ensemble")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _table()


@pytest.fixture(scope="module")
def outcome(table: pd.DataFrame, folder: Path) -> TrainOutcome:
    return train(_spec(table, folder, "ens", models={"candidates": MEMBERS, "ensemble": "mean"}))


def test_the_ensemble_is_a_candidate_scored_on_validation_as_the_mean_of_the_members(outcome: TrainOutcome):
    names = [e.name for e in outcome.candidates]
    assert names == [*MEMBERS, "ensemble"]
    ens = next(e for e in outcome.candidates if e.name == "ensemble")
    assert ens.kind == "ensemble" and list(ens.params["members"]) == MEMBERS
    for family in MEMBERS:
        assert ens.params["members"][family] == next(e for e in outcome.candidates if e.name == family).params
    # On this table the mean ranks validation best (AP 0.646 vs 0.636 and 0.622), so it is chosen and deployed.
    assert outcome.best is ens and outcome.model.kind == "ensemble"
    assert outcome.model.estimator.kinds == MEMBERS
    # Both members were fitted with balanced weights (models.class_weight's default), n_neg / n_pos of the training
    # window; the ensemble averages their probabilities with the weights undone.
    window = outcome.windows["train"]
    ratio = (window.rows - window.positives) / window.positives
    assert outcome.model.estimator.positive_weights == [pytest.approx(ratio, rel=1e-12)] * 2 and ratio > 3
    va = outcome.validation_mask
    raw_va = outcome.model.raw_scores(outcome.dataset.X[va])
    assert ens.validation_score == pytest.approx(M.average_precision(outcome.dataset.y[va], raw_va), abs=1e-12)
    assert ens.validation_score > max(e.validation_score for e in outcome.candidates if e is not ens)
    # The test figures are the deployed artifact's: calibrated mean of the members, thresholded on validation.
    te = outcome.test_mask
    np.testing.assert_allclose(outcome.model.scores(outcome.dataset.X[te]), outcome.test_scores, atol=1e-12)
    assert outcome.model.threshold == ens.threshold
    table = outcome.comparison()
    assert table.loc[table["chosen"], "model"].tolist() == ["ensemble"]


def test_the_chosen_ensemble_round_trips_and_renders_in_the_report(outcome: TrainOutcome, tmp_path: Path):
    folder = outcome.model.save(tmp_path / "model")
    loaded = DecisionModel.load(folder)
    X = outcome.dataset.X[outcome.test_mask]
    np.testing.assert_array_equal(loaded.scores(X), outcome.model.scores(X))
    assert outcome.model.metadata["params"]["members"]["lightgbm"] == outcome.candidates[0].params
    text = render_markdown(build_report(outcome, figures=False))
    assert "| ensemble" in text
    assert "ensemble is the mean of the uncalibrated probabilities of lightgbm (" in text
    assert "each with its class weight undone" in text
    assert "ensemble was chosen over lightgbm, logistic_regression on validation" in text
    assert "rule: best validation headline." in text


def test_without_the_option_there_is_no_ensemble(table: pd.DataFrame, folder: Path):
    o = train(_spec(table, folder, "plain", models={"candidates": MEMBERS}))
    assert [e.name for e in o.candidates] == MEMBERS and o.model.kind in MEMBERS


def test_prequential_ensemble_uses_the_members_fold_scores(table: pd.DataFrame, folder: Path):
    split = {"protocol": "prequential", "train": "14d", "validation": "7d", "test": "7d", "folds": 2,
             "fold_step": "7d"}
    o = train(_spec(table, folder, "preq", models={"candidates": MEMBERS, "ensemble": "mean"}, split=split))
    assert [e.name for e in o.candidates] == [*MEMBERS, "ensemble"]
    assert o.prequential is not None
    per_fold = o.prequential[o.prequential["model"] == "ensemble"]
    assert len(per_fold) == 2
    ens = next(e for e in o.candidates if e.name == "ensemble")
    assert ens.test["average_precision"] == pytest.approx(per_fold["average_precision"].mean())
    # Averaging two different models gives a third ranking, not a copy of either member's.
    members = o.prequential[o.prequential["model"].isin(MEMBERS)]
    assert not np.isin(per_fold["average_precision"].round(12), members["average_precision"].round(12)).any()
    best = max(o.candidates, key=lambda e: e.validation_score)
    assert o.best is best and o.model.kind == best.kind
    if o.model.kind == "ensemble":
        assert o.model.estimator.kinds == MEMBERS


# ------------------------------------------------------------------------------------ selection rule
def _score(headline: float, per: list[float] | None, ap: float) -> ValidationScore:
    return ValidationScore(headline, None if per is None else np.asarray(per), ap)


def test_a_headline_tie_within_one_paired_standard_error_goes_to_average_precision():
    # b trails a by 0.01 with paired per-day differences [0.1, -0.1, 0.0, 0.04]: SE 0.043, a tie.
    scores = {"a": _score(0.31, [0.4, 0.2, 0.3, 0.34], 0.60), "b": _score(0.30, [0.3, 0.3, 0.3, 0.30], 0.66)}
    chosen, why = choose_on_validation(scores)
    assert chosen == "b" and "within one paired standard error of a" in why


def test_a_clear_headline_lead_is_kept_whatever_the_average_precision():
    scores = {"a": _score(0.40, [0.41, 0.39, 0.40, 0.40], 0.50), "b": _score(0.30, [0.30, 0.31, 0.29, 0.30], 0.70)}
    assert choose_on_validation(scores) == ("a", "best validation headline")


def test_without_per_period_values_the_headline_alone_decides():
    scores = {"a": _score(0.61, None, 0.61), "b": _score(0.60, None, 0.60)}
    assert choose_on_validation(scores)[0] == "a"
    assert choose_on_validation({"a": _score(0.2, None, 0.5), "b": _score(0.1, None, 0.4)},
                                lower_is_better=True)[0] == "b"
