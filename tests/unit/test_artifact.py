"""The decision model artifact: round trip, decisions, and refusal of anything tampered with."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from keel.artifact import DecisionModel
from keel.errors import IntegrityError
from keel.evaluate.calibration import Calibrator


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=400) > 1).astype(int)
    return x, y


def lightgbm_model(x: np.ndarray, y: np.ndarray) -> DecisionModel:
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": 1},
                        lgb.Dataset(x, y), num_boost_round=20)
    return DecisionModel(kind="lightgbm", feature_names=["a", "b", "c"], estimator=booster,
                         calibrator=Calibrator("sigmoid", a=1.2, b=-0.1), threshold=0.4,
                         abstain_band=(0.3, 0.4), metadata={"spec_hash": "abc"})


def test_lightgbm_round_trip_gives_identical_scores(tmp_path: Path, data) -> None:
    x, y = data
    model = lightgbm_model(x, y)
    model.save(tmp_path / "m")
    loaded = DecisionModel.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.scores(x), model.scores(x))
    assert loaded.threshold == 0.4 and loaded.abstain_band == (0.3, 0.4)
    assert loaded.metadata == {"spec_hash": "abc"}
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "m").iterdir())


def test_decide_applies_threshold_and_abstain_band(data) -> None:
    model = lightgbm_model(*data)
    actions = model.decide(np.array([0.1, 0.35, 0.4, 0.9]))
    assert list(actions) == ["approve", "abstain", "review", "review"]


def test_decide_on_one_score_agrees_with_many(data) -> None:
    model = lightgbm_model(*data)
    grid = np.array([0.0, 0.1, 0.3, np.nextafter(0.3, 0), 0.35, np.nextafter(0.4, 0), 0.4, 0.9, 1.0, np.nan])
    many = model.decide(grid)
    for i, value in enumerate(grid):
        for shape in ((1,), (1, 1), ()):
            one = model.decide(np.full(shape, value))
            assert one.shape == shape and one.dtype == object
            assert one.reshape(-1)[0] == many[i], (value, shape)


def test_sklearn_round_trip_through_skops(tmp_path: Path, data) -> None:
    x, y = data
    est = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
    model = DecisionModel(kind="hist_gradient_boosting", feature_names=["a", "b", "c"], estimator=est)
    model.save(tmp_path / "h")
    assert (tmp_path / "h" / "model.skops").exists()
    np.testing.assert_array_equal(DecisionModel.load(tmp_path / "h").scores(x), model.scores(x))


def test_dataframe_input_uses_feature_order(data) -> None:
    import pandas as pd

    x, y = data
    model = lightgbm_model(x, y)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])[["c", "a", "b"]]
    np.testing.assert_array_equal(model.scores(frame), model.scores(x))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: (d / "model.txt").write_text((d / "model.txt").read_text().replace("0.", "1.", 1)),
         r"does not match its SHA-256|has \d+ bytes"),
        (lambda d: (d / "model.txt").write_bytes((d / "model.txt").read_bytes()[:100]), r"truncated or replaced"),
        (lambda d: (d / "evil.pkl").write_bytes(b"\x80\x04cos\nsystem\n."), r"files its manifest does not list: evil\.pkl"),
        (lambda d: (d / "manifest.json").unlink(), r"has no manifest\.json"),
        (lambda d: (d / "pipeline.json").unlink(), r"missing 'pipeline\.json'"),
        (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest .* is unreadable"),
    ],
)
def test_tampered_artifacts_are_refused(tmp_path: Path, data, tamper, message: str) -> None:
    model = lightgbm_model(*data)
    folder = model.save(tmp_path / "m")
    tamper(folder)
    with pytest.raises(IntegrityError, match=message):
        DecisionModel.load(folder)


def test_swapped_manifest_is_refused(tmp_path: Path, data) -> None:
    x, y = data
    a = lightgbm_model(x, y).save(tmp_path / "a")
    b = lightgbm_model(x, 1 - y).save(tmp_path / "b")
    (a / "manifest.json").write_text((b / "manifest.json").read_text())
    with pytest.raises(IntegrityError, match=r"SHA-256|bytes"):
        DecisionModel.load(a)


def test_untrusted_skops_types_are_refused(tmp_path: Path, data) -> None:
    import skops.io as sio

    x, y = data
    est = HistGradientBoostingClassifier(max_iter=5).fit(x, y)
    folder = DecisionModel(kind="hist_gradient_boosting", feature_names=["a", "b", "c"], estimator=est).save(tmp_path / "h")
    # Replace the estimator with an object of a type outside the allow-list, and re-sign the manifest as an
    # attacker with write access would: the type check still refuses it.
    (folder / "model.skops").write_bytes(sio.dumps({"x": Path("/etc")}))
    manifest = json.loads((folder / "manifest.json").read_text())
    from keel.artifact import sha256_file

    manifest["files"]["model.skops"] = {"sha256": sha256_file(folder / "model.skops"),
                                        "bytes": (folder / "model.skops").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="types Keel does not trust"):
        DecisionModel.load(folder)


def test_save_is_atomic_on_failure(tmp_path: Path, data) -> None:
    model = lightgbm_model(*data)
    model.save(tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    broken = DecisionModel(kind="lightgbm", feature_names=["a"], estimator=object())
    with pytest.raises(AttributeError):
        broken.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
