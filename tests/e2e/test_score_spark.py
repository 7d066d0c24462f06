"""The Spark engine gives the local engine's rows, scores, decisions and rejects (one local[2] session)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from keel.artifact import DecisionModel
from keel.data.simulate import simulate
from keel.data.sources import open_source
from keel.features import compute_features, feature_names, resolve_definitions
from keel.score import score
from keel.spec import load_spec

pytest.importorskip("pyspark")
pytestmark = pytest.mark.spark

SPEC = load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")
DEFS = resolve_definitions(SPEC.features, SPEC.data)
NAMES = feature_names(DEFS)
NOW = datetime(2030, 1, 1)


@pytest.fixture(scope="module")
def spark():
    from keel.features.spark import spark_session

    session = spark_session("local[2]", **{"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("spark")
    tx = simulate(n_customers=300, n_terminals=600, n_days=40).transactions
    feats = compute_features(tx, DEFS, timestamp="tx_datetime", label="tx_fraud")
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 1},
        lgb.Dataset(feats[NAMES].to_numpy(), tx["tx_fraud"].to_numpy()),
        30,
    )
    model = DecisionModel(kind="lightgbm", feature_names=NAMES, estimator=booster, threshold=0.3)
    full = folder / "tx.parquet"
    tx.to_parquet(full, index=False)
    recent = tx[tx["tx_datetime"] >= tx["tx_datetime"].max().normalize() - pd.Timedelta(days=2)]
    recent = recent.drop(columns=["tx_fraud", "tx_fraud_scenario"]).reset_index(drop=True)
    recent.loc[4, "tx_amount"] = -1.0
    recent.loc[8, "tx_datetime"] = pd.Timestamp("2031-01-01")
    recent.loc[12, "customer_id"] = None  # becomes a float column with a null, as real exports do
    path = folder / "recent.parquet"
    recent.to_parquet(path, index=False)
    return {"model": model, "full": full, "recent": path, "folder": folder}


@pytest.fixture(scope="module")
def both(world: dict, spark) -> dict:
    """The same job on both engines: recent rows (3 bad ones) with the full table as history."""
    out = {}
    for engine in ("local", "spark"):
        target = world["folder"] / f"{engine}-scores" / ("scores.parquet" if engine == "local" else "scores")
        summary = score(
            SPEC, open_source(world["recent"]), target, model=world["model"], model_version="5", engine=engine,
            history=open_source(world["full"]), spark=spark, now=NOW,
        )
        frame = pd.read_parquet(target).sort_values("transaction_id").reset_index(drop=True)
        rejects = pd.read_parquet(summary.rejects).sort_values("transaction_id").reset_index(drop=True)
        out[engine] = (summary, frame, rejects, target)
    return out


def test_spark_scores_equal_local_scores(both: dict) -> None:
    (local_summary, local, _, _), (spark_summary, spark_frame, _, _) = both["local"], both["spark"]
    assert list(spark_frame.columns) == list(local.columns)
    assert spark_frame["transaction_id"].tolist() == local["transaction_id"].tolist()
    np.testing.assert_allclose(spark_frame["score"], local["score"], rtol=0, atol=1e-12)
    assert spark_frame["decision"].tolist() == local["decision"].tolist()
    assert (spark_frame["tx_datetime"].astype("datetime64[ns]") == local["tx_datetime"]).all()
    assert spark_frame["customer_id"].astype("int64").tolist() == local["customer_id"].astype("int64").tolist()
    assert set(spark_frame["model_version"]) == {"5"}
    assert spark_summary.rows == local_summary.rows > 1000
    assert spark_summary.history_rows == local_summary.history_rows > 0
    assert spark_summary.decisions == local_summary.decisions
    # Both engines bin scores the same way: the same quantiles, min and max; the mean up to summation order.
    assert spark_summary.score_quantiles == local_summary.score_quantiles
    assert (spark_summary.score_min, spark_summary.score_max) == (local_summary.score_min, local_summary.score_max)
    assert spark_summary.score_mean == pytest.approx(local_summary.score_mean, rel=1e-12)


def test_spark_rejects_equal_local_rejects(both: dict) -> None:
    local, spark_rejects = both["local"][2], both["spark"][2]
    assert len(local) == 3
    assert spark_rejects["transaction_id"].tolist() == local["transaction_id"].tolist()
    assert spark_rejects["reject_reason"].tolist() == local["reject_reason"].tolist()
    assert both["spark"][0].reject_reasons == both["local"][0].reject_reasons


def test_spark_output_is_moved_into_place_whole_and_partitions_by_day(world: dict, spark, tmp_path: Path) -> None:
    target = tmp_path / "scores"
    target.mkdir()
    (target / "old.parquet").write_bytes(b"stale")

    def stop(done: int, total: int) -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        score(SPEC, open_source(world["recent"]), target, model=world["model"], model_version="5", engine="spark",
              spark=spark, progress=stop, now=NOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]
    assert [p.name for p in target.iterdir()] == ["old.parquet"]

    summary = score(SPEC, open_source(world["recent"]), target, model=world["model"], model_version="5",
                    engine="spark", spark=spark, partition_by_day=True, history=open_source(world["full"]), now=NOW)
    days = sorted(p.name for p in target.glob("date=*"))
    assert summary.partitions == days and len(days) == 3
    parts = pd.concat([pd.read_parquet(target / d) for d in days]).sort_values("transaction_id")
    local = pd.read_parquet(world["folder"] / "local-scores" / "scores.parquet").sort_values("transaction_id")
    np.testing.assert_allclose(parts["score"].to_numpy(), local["score"].to_numpy(), rtol=0, atol=1e-12)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
