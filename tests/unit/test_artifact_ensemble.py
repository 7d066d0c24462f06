"""An ensemble artifact: members saved each in its own safe format, verified on load, scored as a calibrated mean."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from keel.artifact import DecisionModel, Ensemble, unweighted
from keel.errors import IntegrityError
from keel.evaluate.baselines import LogisticBaseline
from keel.evaluate.calibration import Calibrator

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=400) > 1).astype(int)
    return x, y


@pytest.fixture(scope="module")
def members(data) -> list[tuple[str, object]]:
    x, y = data
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": 1, "num_threads": 1},
                        lgb.Dataset(x, y), num_boost_round=20)
    hgb = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(x, y)
    logistic = LogisticBaseline(NAMES, class_weight=None).fit(pd.DataFrame(x, columns=NAMES), y)
    return [("lightgbm", booster), ("hist_gradient_boosting", hgb), ("logistic_regression", logistic)]


def ensemble_model(members, weights=None) -> DecisionModel:
    return DecisionModel(kind="ensemble", feature_names=NAMES, estimator=Ensemble(list(members), weights),
                         calibrator=Calibrator("sigmoid", a=1.3, b=-0.2), threshold=0.35,
                         metadata={"params": {"members": {k: {} for k, _ in members}}})


def test_scores_are_the_calibrated_mean_of_the_member_probabilities(data, members) -> None:
    x, _ = data
    booster, hgb, logistic = (m for _, m in members)
    mean = (booster.predict(x) + hgb.predict_proba(x)[:, 1]
            + logistic.predict_proba(pd.DataFrame(x, columns=NAMES))[:, 1]) / 3
    model = ensemble_model(members)
    np.testing.assert_allclose(model.raw_scores(x), mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.scores(x), Calibrator("sigmoid", a=1.3, b=-0.2).transform(mean), atol=1e-12)
    # Each member matters: dropping one changes the scores.
    two = DecisionModel(kind="ensemble", feature_names=NAMES, estimator=Ensemble(list(members[:2])))
    assert np.abs(two.raw_scores(x) - mean).max() > 1e-3


def test_round_trip_saves_each_member_safely_and_gives_identical_scores(tmp_path: Path, data, members) -> None:
    x, _ = data
    model = ensemble_model(members)
    folder = model.save(tmp_path / "ens")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "member-0.txt", "member-1.skops", "member-2.json", "pipeline.json"]
    pipeline = json.loads((folder / "pipeline.json").read_text())
    assert pipeline["members"] == [{"kind": "lightgbm", "file": "member-0.txt", "positive_weight": 1.0},
                                   {"kind": "hist_gradient_boosting", "file": "member-1.skops", "positive_weight": 1.0},
                                   {"kind": "logistic_regression", "file": "member-2.json", "positive_weight": 1.0}]
    assert set(json.loads((folder / "manifest.json").read_text())["files"]) == set(names) - {"manifest.json"}
    loaded = DecisionModel.load(folder)
    assert loaded.kind == "ensemble" and loaded.estimator.kinds == [k for k, _ in members]
    np.testing.assert_array_equal(loaded.scores(x), model.scores(x))
    np.testing.assert_array_equal(loaded.decide(loaded.scores(x)), model.decide(model.scores(x)))
    frame = pd.DataFrame(x, columns=NAMES)[["c", "a", "b"]]
    np.testing.assert_array_equal(loaded.scores(frame), model.scores(x))


def test_members_fitted_with_class_weights_are_averaged_on_the_unweighted_scale(tmp_path: Path, data) -> None:
    x, y = data
    frame = pd.DataFrame(x, columns=NAMES)
    plain = LogisticBaseline(NAMES, class_weight=None).fit(frame, y)
    balanced = LogisticBaseline(NAMES, class_weight="balanced").fit(frame, y)
    w = float((y == 0).sum() / (y == 1).sum())
    p_plain, p_balanced = plain.predict_proba(frame)[:, 1], balanced.predict_proba(frame)[:, 1]
    # Balanced weights inflate the probabilities (mean well above the base rate); undone, they are back near it.
    undone = unweighted(p_balanced, w)
    assert p_balanced.mean() - y.mean() > 0.06
    assert abs(undone.mean() - y.mean()) < 0.02 and abs(undone.mean() - p_plain.mean()) < 0.02
    members = [("logistic_regression", plain), ("logistic_regression", balanced)]
    model = ensemble_model(members, [1.0, w])
    np.testing.assert_allclose(model.raw_scores(x), (p_plain + undone) / 2, rtol=0, atol=1e-12)
    raw_mean = ensemble_model(members).raw_scores(x)
    assert np.abs(raw_mean - model.raw_scores(x)).max() > 0.05
    loaded = DecisionModel.load(model.save(tmp_path / "weighted"))
    assert loaded.estimator.positive_weights == [1.0, w]
    np.testing.assert_array_equal(loaded.raw_scores(x), model.raw_scores(x))


def test_an_ensemble_saved_before_member_weights_loads_as_unweighted(tmp_path: Path, data, members) -> None:
    x, _ = data
    folder = ensemble_model(members).save(tmp_path / "old")
    _rewrite_pipeline(folder, lambda p: [m.pop("positive_weight") for m in p["members"]])
    loaded = DecisionModel.load(folder)
    assert loaded.estimator.positive_weights == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(loaded.scores(x), ensemble_model(members).scores(x))


@pytest.mark.parametrize("weight", [0, -2.0, "balanced", None])
def test_a_member_weight_that_is_not_a_positive_number_is_refused(tmp_path: Path, members, weight) -> None:
    folder = ensemble_model(members).save(tmp_path / "bad")
    _rewrite_pipeline(folder, lambda p: p["members"][1].update(positive_weight=weight))
    with pytest.raises(IntegrityError, match=r"member 'member-1\.skops' the weight"):
        DecisionModel.load(folder)
    with pytest.raises(ValueError, match="one finite, positive weight"):
        Ensemble(list(members), [1.0, 1.0])


def test_lightgbm_members_score_through_the_compiled_trees(data, members) -> None:
    pytest.importorskip("llvmlite")
    x, _ = data
    model = ensemble_model(members)
    forests = model.member_forests()
    assert forests[0] is not None and forests[1] is None and forests[2] is None
    assert model.compiled() is None  # the single-model fast path (serving inline) is for a lone LightGBM only
    np.testing.assert_array_equal(forests[0].predict(x), members[0][1].predict(x))
    # Native code does not travel in a pickle (Spark, process pools); it is rebuilt on use with the same scores.
    clone = pickle.loads(pickle.dumps(model))
    assert clone._forests == [] and not clone._forest_built
    np.testing.assert_array_equal(clone.scores(x), model.scores(x))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: (d / "member-1.skops").unlink(), r"missing 'member-1\.skops'"),
        (lambda d: (d / "member-0.txt").write_text((d / "member-0.txt").read_text().replace("0.", "1.", 1)),
         r"does not match its SHA-256|has \d+ bytes"),
        (lambda d: (d / "member-9.json").write_text("{}"), r"files its manifest does not list: member-9\.json"),
    ],
)
def test_tampered_members_are_refused(tmp_path: Path, members, tamper, message: str) -> None:
    folder = ensemble_model(members).save(tmp_path / "ens")
    tamper(folder)
    with pytest.raises(IntegrityError, match=message):
        DecisionModel.load(folder)


def _rewrite_pipeline(folder: Path, change) -> None:
    """Edit pipeline.json and re-sign the manifest, as someone who can write the folder could."""
    from keel.artifact import sha256_file

    pipeline = json.loads((folder / "pipeline.json").read_text())
    change(pipeline)
    (folder / "pipeline.json").write_text(json.dumps(pipeline))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["pipeline.json"] = {"sha256": sha256_file(folder / "pipeline.json"),
                                          "bytes": (folder / "pipeline.json").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(members=[]), r"lists no members"),
        (lambda p: p["members"].append({"kind": "lightgbm", "file": "other.txt"}), r"member file 'other\.txt'"),
        (lambda p: p.update(members=p["members"][:2]), r"files no member uses: member-2\.json"),
    ],
)
def test_a_pipeline_whose_members_disagree_with_the_files_is_refused(tmp_path: Path, members, change,
                                                                      message: str) -> None:
    folder = ensemble_model(members).save(tmp_path / "ens")
    _rewrite_pipeline(folder, change)
    with pytest.raises(IntegrityError, match=message):
        DecisionModel.load(folder)


def test_an_ensemble_needs_members_and_cannot_nest(members) -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ValueError, match="cannot itself be an ensemble"):
        Ensemble([("ensemble", Ensemble(list(members)))])


def test_the_registry_logs_and_loads_an_ensemble(registry, spec, data, members) -> None:
    x, _ = data
    model = ensemble_model(members)
    info = registry.log_run(
        spec=spec, model=model, metrics={"average_precision": 0.7},
        params={"model": "ensemble", "model.members": {"lightgbm": {"num_leaves": 7}}}, data_source="data/tx.parquet",
        data_fingerprint="fp-ens", windows={"train": ("2024-01-01", "2024-01-08")})
    assert {"model/member-0.txt", "model/member-1.skops", "model/member-2.json"} <= set(registry.run(info.run_id).artifacts)
    version = registry.register(info.run_id, alias="challenger")
    loaded, _info = registry.load(version.version)
    assert loaded.kind == "ensemble" and loaded.estimator.kinds == [k for k, _ in members]
    np.testing.assert_array_equal(loaded.scores(x), model.scores(x))
