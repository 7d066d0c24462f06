"""Batch scoring throughput, side by side in one run, on the default simulated data (about 1.78 M rows).

Measured (rows per second, wall clock; CPU seconds of this process alongside, since the 2 cores are shared):

* ``keel.score.score`` end to end, Parquet in -> Parquet out, point-in-time features included (local engine,
  default chunk size);
* the scoring stage alone: ``score_features`` (feature frame -> matrix -> predict -> decide) on the in-memory
  feature frame;
* the compute floor: bare ``booster.predict`` on a C-contiguous float64 array of the same features;
* MLflow ``pyfunc`` batch predict of the same booster (``mlflow.lightgbm.log_model`` to a temporary file store);
* with ``--spark``: the Spark engine on ``local[2]`` vs ``mlflow.pyfunc.spark_udf`` on the precomputed features.

Writes the ``## Batch scoring`` section of bench/RESULTS.md (``--no-write`` to only print). Run::

    python bench/bench_score.py            # about a minute on 2 cores
    python bench/bench_score.py --spark    # adds the Spark comparison (several minutes)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section

from keel.artifact import DecisionModel
from keel.data.simulate import simulate
from keel.data.sources import open_source
from keel.features import compute_features, feature_names, resolve_definitions
from keel.score import DEFAULT_CHUNK_ROWS, score, score_features
from keel.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = load_spec(ROOT / "examples" / "card-fraud" / "keel.toml")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, float, Any]:
    """Best wall seconds of ``repeat`` runs, the CPU seconds of that run, and its result."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeat):
        c0, t0 = cpu(), time.perf_counter()
        result = fn()
        wall, used = time.perf_counter() - t0, cpu() - c0
        if wall < best[0]:
            best = (wall, used, result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spark", action="store_true", help="also compare the Spark engine with spark_udf")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per measurement")
    args = parser.parse_args()
    load = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="keel-bench-score-"))
    tx = simulate().transactions
    source = work / "transactions.parquet"
    tx.to_parquet(source, index=False)
    n = len(tx)
    defs = resolve_definitions(SPEC.features, SPEC.data)
    names = feature_names(defs)
    features = compute_features(tx, defs, timestamp="tx_datetime", label="tx_fraud")

    import lightgbm as lgb

    train = tx["tx_datetime"] < tx["tx_datetime"].min() + pd.Timedelta(days=60)
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "verbose": -1, "seed": 0},
        lgb.Dataset(features.loc[train, names].to_numpy(), tx.loc[train, "tx_fraud"].to_numpy()),
        num_boost_round=100,
    )
    model = DecisionModel(kind="lightgbm", feature_names=names, estimator=booster, threshold=0.5)
    frame = features[names]
    matrix = np.ascontiguousarray(frame.to_numpy(dtype=np.float64))
    print(f"{n:,} rows, {len(names)} features, {booster.num_trees()} trees; load average {load:.1f}")

    rows: list[tuple[str, float, float]] = []

    def record(label: str, wall: float, used: float) -> float:
        rows.append((label, wall, used))
        print(f"{label:<70} {wall:7.2f} s  {n / wall:12,.0f} rows/s  (CPU {used:.2f} s)")
        return n / wall

    out = work / "scores.parquet"
    wall, used, summary = timed(
        lambda: score(SPEC, open_source(source), out, model=model, model_version="1"), args.repeat
    )
    assert summary.rows == n, summary
    e2e = record(f"`keel.score.score` end to end, Parquet -> Parquet (chunks of {DEFAULT_CHUNK_ROWS:,})", wall, used)
    wall, used, _ = timed(lambda: score_features(frame, model), args.repeat)
    stage = record("scoring stage: `score_features` (frame -> predict -> decide)", wall, used)
    wall, used, bare_scores = timed(lambda: booster.predict(matrix), args.repeat)
    bare = record("bare `booster.predict` on a float64 array (compute floor)", wall, used)
    assert np.array_equal(bare_scores, pd.read_parquet(out, columns=["score"])["score"].to_numpy())

    import mlflow
    import mlflow.lightgbm
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    # With a SQLite store MLflow's default artifact root is ./mlruns; keep everything in the bench's folder.
    experiment = mlflow.create_experiment("bench-score", artifact_location=(work / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.lightgbm.log_model(booster, name="model")
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    wall, used, py_scores = timed(lambda: pyfunc.predict(frame), args.repeat)
    assert np.allclose(np.asarray(py_scores, dtype=float), bare_scores)
    pyf = record("MLflow `pyfunc` batch predict (same booster, feature frame in memory)", wall, used)

    spark_lines: list[str] = []
    if args.spark:
        spark_lines = bench_spark(work, source, features, names, model, info.model_uri, n, record)

    lines = [
        "## Batch scoring",
        "",
        f"Default simulated data ({n:,} transactions, 183 days), the flagship spec's {len(names)} features, a "
        f"LightGBM of {booster.num_trees()} trees x 31 leaves. Reproduce with `python bench/bench_score.py"
        f"{' --spark' if args.spark else ''}`. {machine()} Best of {args.repeat}; "
        f"CPU s = this process's CPU time for that run; load average at start {load:.1f} (other jobs share the "
        "cores, so wall time is noisy).",
        "",
        "| what | wall s | CPU s | rows/s |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {wall:.2f} | {used:.2f} | {n / wall:,.0f} |" for label, wall, used in rows],
        "",
        f"Scoring stage = {stage / bare:.0%} of bare predict (goal >= 70 %); whole job {e2e:,.0f} rows/s "
        f"(goal >= 300,000); whole job vs MLflow pyfunc predict alone: {e2e / pyf:.1f}x, scoring stage vs "
        f"pyfunc: {stage / pyf:.1f}x (goal >= 3x).",
        f"By CPU time (less disturbed by other jobs): scoring stage {cpu_of(rows, 2) / cpu_of(rows, 1):.0%} of bare"
        f" predict; whole job {n / cpu_of(rows, 0):,.0f} rows per CPU second.",
        *spark_lines,
        "",
        "MLflow's LightGBM `pyfunc` calls `Booster.predict` on the frame, i.e. the same compute as the floor: "
        "a 3x margin over it is not reachable by any scorer that runs the same trees; the row compares our "
        "whole job (features included) with pyfunc's predict alone.",
        "",
        "The end-to-end figure includes reading and sorting the Parquet input in DuckDB, the contract checks "
        "(rejects), every point-in-time feature (with the trailing history carried between chunks), scoring, "
        "decisions and writing the Parquet output atomically; pyfunc and bare predict start from features "
        "already in memory.",
    ]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_write:
        write_section("score", body)
        print("Updated bench/RESULTS.md")


def cpu_of(rows: list[tuple[str, float, float]], index: int) -> float:
    return rows[index][2]


def bench_spark(
    work: Path, source: Path, features: pd.DataFrame, names: list[str], model: DecisionModel, uri: str, n: int,
    record: Callable[[str, float, float], float],
) -> list[str]:
    import mlflow.pyfunc

    from keel.features.spark import spark_session

    spark = spark_session("local[2]", **{"spark.sql.shuffle.partitions": "4"})
    wall, used, _ = timed(
        lambda: score(SPEC, open_source(source), work / "spark-scores", model=model, model_version="1",
                      engine="spark", spark=spark)
    )
    ours = record("Spark engine `local[2]`, Parquet -> Parquet, features included", wall, used)
    feature_file = work / "features.parquet"
    features[["transaction_id", *names]].to_parquet(feature_file, index=False)
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="double", env_manager="local")

    def run_udf() -> None:
        df = spark.read.parquet(str(feature_file))
        df.withColumn("score", udf(*[df[c] for c in names])).select("transaction_id", "score").write.mode(
            "overwrite"
        ).parquet(str(work / "udf-scores"))

    wall, used, _ = timed(run_udf)
    theirs = record("MLflow `spark_udf` `local[2]` on precomputed features (Parquet -> Parquet)", wall, used)
    spark.stop()
    return ["", f"Spark engine vs MLflow `spark_udf`: {ours / theirs:.1f}x (goal >= 5x)."]


if __name__ == "__main__":
    main()
