"""Spark backfill: the same definitions on local[2] give the local (DuckDB-read, NumPy) results exactly."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest

from keel.features.definitions import feature_names, resolve_definitions
from keel.features.offline import compute_features, compute_features_spark
from keel.spec import Data, Features

pytestmark = pytest.mark.spark
pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Java is not installed; Spark cannot start.", allow_module_level=True)

FEATURES = Features.model_validate(
    {
        "raw": ["amount"],
        "row": [{"name": "night", "kind": "is_night", "column": "ts"}],
        "windows": [
            {
                "entity": "card",
                "aggregates": ["count", "mean", "std"],
                "column": "amount",
                "windows": ["1h", "1d"],
            },
            {"entity": "shop", "aggregates": ["count", "label_rate"], "windows": ["6h"], "delay": "2h"},
        ],
        "ratios": [{"name": "amount_vs_mean", "numerator": "amount", "denominator": "card_mean_1d"}],
    }
)
DATA = Data.model_validate(
    {"source": "x", "timestamp": "ts", "label": "y", "label_delay": "2h", "id_column": "id"}
)
DEFS = resolve_definitions(FEATURES, DATA)


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    # Workers must run this interpreter (the venv with keel installed), not whatever `python3` is on PATH.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

    session = (
        SparkSession.builder.master("local[2]")
        .appName("keel-features-test")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    yield session
    session.stop()


def test_spark_equals_local(spark) -> None:
    rng = np.random.default_rng(4)
    n = 2000
    frame = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "ts": pd.Timestamp("2024-03-01")
            + pd.to_timedelta(np.sort(rng.integers(0, 4 * 86400, n)), unit="s"),
            "card": rng.integers(0, 20, n),
            "shop": rng.integers(0, 6, n),
            "amount": np.round(rng.gamma(2.0, 30.0, n), 2),
            "y": (rng.random(n) < 0.2).astype(np.int64),
        }
    )
    local = compute_features(frame, DEFS, timestamp="ts", label="y", id_column="id")
    remote = (
        compute_features_spark(spark.createDataFrame(frame), DEFS, timestamp="ts", label="y", id_column="id")
        .toPandas()
        .sort_values("id")
        .reset_index(drop=True)
    )
    assert list(remote.columns) == ["id", *feature_names(DEFS)]
    assert len(remote) == n
    for name in feature_names(DEFS):
        np.testing.assert_allclose(remote[name], local[name], rtol=0, atol=1e-9, equal_nan=True, err_msg=name)
