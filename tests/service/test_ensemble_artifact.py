"""An ensemble artifact through the paths that load a DecisionModel: the API (single and batch) and `keel score`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.ensemble import HistGradientBoostingClassifier

from conftest import make_spec
from keel.artifact import DecisionModel, Ensemble
from keel.data.sources import open_source
from keel.evaluate.calibration import Calibrator
from keel.score import score
from keel.serve import PathProvider, create_app
from keel.serve.predlog import PREDICTION_COLUMNS, iter_rows
from keel.spec import Spec


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory, feature_table: pd.DataFrame,
                 transactions: pd.DataFrame) -> Path:
    names = [c for c in feature_table.columns if c not in ("transaction_id", "customer_id", "terminal_id",
                                                            "tx_datetime")]
    x, y = feature_table[names].to_numpy(), transactions["tx_fraud"].to_numpy()
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15, "seed": 1, "num_threads": 1},
                        lgb.Dataset(x, y), num_boost_round=20)
    hgb = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
    model = DecisionModel(kind="ensemble", feature_names=names,
                          estimator=Ensemble([("lightgbm", booster), ("hist_gradient_boosting", hgb)]),
                          calibrator=Calibrator("sigmoid", a=1.1, b=0.0), threshold=0.3, threads=1,
                          metadata={"spec_hash": "test", "test_metrics": {"average_precision": 0.6}})
    return model.save(tmp_path_factory.mktemp("ensemble") / "model")


def test_the_api_scores_single_and_batch_requests_with_an_ensemble(tmp_path: Path, ensemble_dir: Path,
                                                                   events: Any) -> None:
    spec = make_spec(tmp_path)
    model = DecisionModel.load(ensemble_dir)
    batch = events(200, 12)
    with TestClient(create_app(spec, PathProvider(ensemble_dir))) as client:
        single = client.post("/v1/predict", json=batch[0])
        assert single.status_code == 200, single.text
        many = client.post("/v1/predict/batch", json={"events": batch[1:]})
        assert many.status_code == 200, many.text
    bodies = [single.json(), *many.json()["data"]]
    assert all(b["fallback"] is False for b in bodies)
    scores = np.array([b["score"] for b in bodies])
    assert [b["decision"] for b in bodies] == model.decide(scores).tolist()
    # The scores are the ensemble's on the features the service computed for each event (its prediction log).
    # (read through iter_rows: a batch request's answers are stored only as a columnar segment)
    at = [1 + PREDICTION_COLUMNS.index(c) for c in ("event_id", "features", "score")]
    logged = [tuple(r[i] for i in at) for r in iter_rows(spec.state_dir / spec.serving.prediction_log)]
    assert len(logged) == len(batch)
    features = pd.DataFrame([json.loads(f) for _e, f, _s in logged])[model.feature_names]
    np.testing.assert_allclose([s for _e, _f, s in logged], model.scores(features), rtol=0, atol=1e-9)
    np.testing.assert_allclose(sorted(scores), sorted(s for _e, _f, s in logged), rtol=0, atol=1e-9)
    assert len(set(np.round(scores, 9))) > 1


def test_keel_score_writes_the_ensemble_scores(tmp_path: Path, ensemble_dir: Path, flagship_spec: Spec,
                                                transactions: pd.DataFrame, feature_table: pd.DataFrame) -> None:
    model = DecisionModel.load(ensemble_dir)
    source = tmp_path / "tx.parquet"
    transactions.to_parquet(source, index=False)
    out = tmp_path / "scores.parquet"
    summary = score(flagship_spec, open_source(source), out, model=model, model_version="ens-1",
                    now=pd.Timestamp("2030-01-01").to_pydatetime())
    got = pd.read_parquet(out)
    assert summary.rows == len(transactions) and summary.rejected == 0
    expected = model.scores(feature_table[model.feature_names])
    np.testing.assert_allclose(got["score"].to_numpy(), expected, rtol=0, atol=1e-12)
    assert got["decision"].tolist() == model.decide(expected).tolist()
