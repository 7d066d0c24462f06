"""Point-in-time features and batch scoring on Apache Spark: the same rows, scores and decisions as the local engine.

**Why a grouped map and not Spark SQL window frames.** The features could be compiled to Spark SQL
(``RANGE BETWEEN`` frames over event-time seconds), but that would be a second implementation of the window
semantics and it would not give identical numbers: a ``RANGE`` frame counts every event sharing the current
timestamp (Keel counts only those earlier in event order when ``delay = 0``), and Spark sums doubles in frame
order while Keel sums on an exact integer grid (cents and 0/1 labels sum exactly), so means could differ in
the last bit and a score sitting on a tree split could flip its decision. Instead each entity's windows are
computed by a grouped map: rows are hashed by the entity into buckets, each bucket (every event of its
entities, so every window is complete) is handed to :func:`keel.features.offline.compute_features` — the
very code the local engine, training and the online parity test run — after sorting by (event time, id), the
order the local engine reads. One stage per entity column (e.g. customer, then terminal); history rows ride
along and are dropped before scoring. Window values depend only on same-entity events, so per-bucket results
equal whole-table results exactly for values on a decimal grid (money, counts, labels); for other values a
sum can differ by about one rounding of the window total.

**Scoring.** ``mapInPandas`` over the featured rows: row features and ratios with the offline functions, then
:meth:`DecisionModel.scores` and :meth:`DecisionModel.decide`. The model is broadcast as the bytes of its
artifact folder; each Python worker rebuilds it once (manifest verified) and keeps it for later batches.

**Output.** Spark writes Parquet parts into a temporary folder beside the target, which is then moved into
place (one folder swap; with ``partition_by_day`` one swap per ``date=YYYY-MM-DD`` folder). A failed job
leaves the previous output as it was and no temporary folder.

Pointing at a cluster: pass ``master="spark://host:7077"`` (or ``yarn``, ``k8s://...``) or an existing
``SparkSession``; the executors need ``keel`` installed (or shipped with ``spark.submit.pyFiles``) and input,
output and rejects on a file system the driver can rename in (a shared mount). Example::

    from keel.features.spark import spark_session
    spark = spark_session("local[*]")
    summary = score(spec, open_source("tx.parquet"), "out/scores", model=model, model_version="3",
                    engine="spark", spark=spark)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from keel.errors import ScoringError
from keel.features.definitions import (
    RatioDefinition,
    RawDefinition,
    RowDefinition,
    WindowDefinition,
    entities,
    window_definitions,
)
from keel.features.offline import compute_features
from keel.io import swap_into_place

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from keel.artifact import DecisionModel
    from keel.data.sources import Source
    from keel.score import ScorePlan, ScoreSummary
    from keel.spec import Spec

SCORE_FLAG = "__keel_score"
BUCKET = "__keel_bucket"
REASON = "__keel_reason"
_MODELS: dict[str, Any] = {}  # per Python worker: artifact digest -> DecisionModel


def spark_session(master: str | None = None, *, app_name: str = "keel-score", **conf: str) -> SparkSession:
    """A SparkSession set up for Keel: UTC session time, Arrow transfers, no UI; ``conf`` adds settings."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ScoringError(
            "The Spark engine needs pyspark.", hint="pip install 'keel[spark]' (and Java 17)."
        ) from exc
    master = master or "local[*]"
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "100000")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")
    )
    if master.startswith("local"):
        # Local workers run this interpreter (pyspark reads PYSPARK_PYTHON, default "python3"), so they import
        # the same keel, pandas and pyarrow as the driver.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.config("spark.sql.shuffle.partitions", "8").config("spark.driver.memory", "2g")
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as exc:  # Java missing, bad master URL: py4j raises several types
        raise ScoringError(
            f"Cannot start Spark at {master}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}.",
            hint="Check that Java 17 is installed and the master URL is reachable.",
        ) from exc


# --------------------------------------------------------------------------------------------- reading
def _read(spark: SparkSession, source: Source, scratch: Path) -> DataFrame:
    """The source as a Spark DataFrame (DuckDB tables are exported to Parquet first)."""
    if source.format == "parquet":
        return spark.read.parquet(source.path)
    if source.format == "csv":
        return spark.read.option("header", "true").option("inferSchema", "true").csv(source.path)
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "export.parquet"
    with source.connect() as con:
        con.execute(f"COPY (SELECT * FROM source) TO '{target}' (FORMAT parquet)").fetchall()
    return spark.read.parquet(str(target))


def _event_time(df: DataFrame, column: str) -> Column:
    """The event time as a Spark timestamp, whatever the file stored (ns as long, text, date, timestamp)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    kind = df.schema[column].dataType
    col = F.col(column)
    if isinstance(kind, T.LongType | T.IntegerType):  # Parquet TIMESTAMP(NANOS) read as nanoseconds
        return F.timestamp_micros(F.floor(col / 1000).cast("long"))
    if isinstance(kind, T.StringType):
        return F.try_to_timestamp(col)
    return col.cast("timestamp")


def _reason(df: DataFrame, plan: ScorePlan, ts: Column) -> Column:
    from pyspark.sql import functions as F

    expr: Any = None
    for rule in plan.rules:
        col = F.col(rule.column)
        if rule.kind == "null":
            cond = col.isNull()
        elif rule.kind == "unparseable":
            cond = ts.isNull()
        elif rule.kind == "future":
            assert plan.future_limit is not None
            cond = ts > F.to_timestamp(F.lit(plan.future_limit.strftime("%Y-%m-%d %H:%M:%S.%f")))
        elif rule.kind == "below":
            cond = col.cast("double") < F.lit(rule.bound)
        else:
            value = col.cast("double")
            cond = (value > F.lit(rule.bound)) & ~F.isnan(value)
        expr = F.when(cond, F.lit(rule.reason)) if expr is None else expr.when(cond, F.lit(rule.reason))
    return expr if expr is not None else F.lit(None).cast("string")


def _valid_rows(df: DataFrame, plan: ScorePlan) -> tuple[DataFrame, DataFrame]:
    """(rows with ``REASON`` set for rejects, valid rows with the scoring columns and a parsed event time)."""
    from pyspark.sql import functions as F

    ts = _event_time(df, plan.timestamp)
    checked = df.withColumn(REASON, _reason(df, plan, ts))
    columns = [ts.alias(c) if c == plan.timestamp else F.col(c) for c in plan.columns]
    good = checked.filter(F.col(REASON).isNull()).select(*columns)
    if plan.label:
        label = F.col(plan.label).cast("double") if plan.label_in_input else F.lit(None).cast("double")
        good = good.withColumn(plan.label, label)
    return checked, good


# --------------------------------------------------------------------------------------------- features
def _window_stage(df: DataFrame, plan: ScorePlan, entity: str, buckets: int) -> DataFrame:
    """Add one entity's window features with a grouped map over hash buckets of that entity."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    block = [d for d in window_definitions(plan.definitions) if d.entity == entity]
    ts, id_col, label = plan.timestamp, plan.id_column, plan.label
    order = [ts, id_col]

    def add_features(pdf: pd.DataFrame) -> pd.DataFrame:
        pdf = pdf.drop(columns=[BUCKET]).sort_values(order, kind="stable").reset_index(drop=True)
        values = compute_features(pdf, block, timestamp=ts, label=label)
        for d in block:
            pdf[d.name] = values[d.name].to_numpy()
        return pdf

    fields = [f for f in df.schema.fields] + [T.StructField(d.name, T.DoubleType()) for d in block]
    bucketed = df.withColumn(BUCKET, F.pmod(F.xxhash64(F.col(entity)), F.lit(buckets)))
    return bucketed.groupBy(BUCKET).applyInPandas(add_features, T.StructType(fields))


def _executor_model(files: dict[str, bytes], digest: str) -> DecisionModel:
    """Rebuild the broadcast artifact once per Python worker (manifest verified on load)."""
    cached = _MODELS.get(digest)
    if cached is not None:
        return cached
    from keel.artifact import DecisionModel

    folder = Path(tempfile.mkdtemp(prefix="keel-model-"))
    try:
        for name, data in files.items():
            (folder / name).write_bytes(data)
        model = DecisionModel.load(folder, threads=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _MODELS[digest] = model
    return model


def _artifact_bytes(model: DecisionModel, scratch: Path) -> tuple[dict[str, bytes], str]:
    folder = model.save(scratch / "model")
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    digest = hashlib.sha256(b"".join(name.encode() + data for name, data in files.items())).hexdigest()
    return files, digest


def _scoring_fn(plan: ScorePlan, broadcast: Any, digest: str, model_version: str, partition: bool) -> Any:
    row_defs = [d for d in plan.definitions if isinstance(d, RawDefinition | RowDefinition | RatioDefinition)]
    window_names = [d.name for d in plan.definitions if isinstance(d, WindowDefinition)]
    keys = plan.key_columns
    ts = plan.timestamp

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from keel.score import DECISION, MODEL_VERSION, SCORE, score_features

        model = _executor_model(broadcast.value, digest)
        for pdf in batches:
            if pdf.empty:
                continue
            features = compute_features(pdf, row_defs, timestamp=ts) if row_defs else pd.DataFrame(index=pdf.index)
            for name in window_names:
                features[name] = pdf[name].to_numpy(dtype=np.float64)
            scores, decisions = score_features(features, model)
            out = pdf[keys].copy()
            out[SCORE] = scores
            out[DECISION] = decisions.astype(str)
            out[MODEL_VERSION] = model_version
            if partition:
                out["date"] = pd.DatetimeIndex(out[ts]).strftime("%Y-%m-%d")
            yield out

    return score_batches


# --------------------------------------------------------------------------------------------- moving into place
def _tidy(folder: Path) -> None:
    """Drop Hadoop's checksum files so the folder holds only Parquet parts."""
    for crc in folder.rglob(".*.crc"):
        crc.unlink()


# --------------------------------------------------------------------------------------------- the job
def score_spark(
    spec: Spec,
    source: Source,
    output: Path,
    *,
    model: DecisionModel,
    model_version: str,
    rejects: Path | None,
    progress: Any,
    history: Source | None,
    partition_by_day: bool,
    master: str | None,
    spark: SparkSession | None,
    now: datetime | None,
    summary: ScoreSummary,
    buckets: int | None = None,
) -> None:
    """The Spark engine behind :func:`keel.score.score` (``engine="spark"``); fills ``summary``."""
    from pyspark.sql import functions as F

    from keel.score import (
        DECISION,
        REJECT_REASON,
        SCORE,
        _output_paths,
        plan_scoring,
    )

    plan = plan_scoring(spec, source.schema(), model, source=source.describe(), now=now)
    summary_path, rejects_path = _output_paths(output, partition_by_day, rejects)
    summary.rejects, summary.summary_path = str(rejects_path), str(summary_path)
    spark = spark or spark_session(master)
    output.parent.mkdir(parents=True, exist_ok=True)
    rejects_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.spark.", dir=output.parent))
    rejects_tmp = Path(tempfile.mkdtemp(prefix=f".{rejects_path.name}.", dir=rejects_path.parent))
    cached: list[DataFrame] = []
    try:
        raw = _read(spark, source, scratch)
        checked, good = _valid_rows(raw, plan)
        checked = checked.persist()
        cached.append(checked)
        total = checked.count()
        if progress is not None:
            progress(0, total)
        (
            checked.filter(F.col(REASON).isNotNull())
            .withColumn(REJECT_REASON, F.col(REASON))
            .drop(REASON)
            .write.mode("overwrite")
            .parquet(str(rejects_tmp / "data"))
        )
        reasons = {
            str(r[0]): int(r[1])
            for r in checked.filter(F.col(REASON).isNotNull()).groupBy(REASON).count().collect()
        }
        summary.rejected, summary.reject_reasons = sum(reasons.values()), dict(sorted(reasons.items()))

        frame = good.withColumn(SCORE_FLAG, F.lit(True))
        windows = window_definitions(plan.definitions)
        if history is not None and windows:
            first = good.agg(F.min(plan.timestamp)).first()[0]
            if first is not None:
                hplan = plan_scoring(spec, history.schema(), model, source=history.describe(), now=plan.now)
                _, past = _valid_rows(_read(spark, history, scratch / "history"), hplan)
                if plan.label and not hplan.label_in_input:
                    past = past.withColumn(plan.label, F.lit(None).cast("double"))
                low = pd.Timestamp(first) - pd.Timedelta(plan.horizon_ns, unit="ns")
                past = past.filter(
                    (F.col(plan.timestamp) > F.to_timestamp(F.lit(str(low))))
                    & (F.col(plan.timestamp) < F.to_timestamp(F.lit(str(pd.Timestamp(first)))))
                ).select(*frame.columns[:-1])
                past = past.withColumn(SCORE_FLAG, F.lit(False)).persist()
                cached.append(past)
                summary.history_rows = past.count()
                frame = frame.unionByName(past)

        n_buckets = buckets or max(spark.sparkContext.defaultParallelism * 2, (total + summary.history_rows) // 1_000_000 + 1)
        for entity in entities(plan.definitions):
            frame = _window_stage(frame, plan, entity, n_buckets)
        frame = frame.filter(F.col(SCORE_FLAG)).drop(SCORE_FLAG)

        files, digest = _artifact_bytes(model, scratch)
        broadcast = spark.sparkContext.broadcast(files)
        out_schema = frame.select(*plan.key_columns).schema.add(SCORE, "double").add(DECISION, "string")
        out_schema = out_schema.add("model_version", "string")
        if partition_by_day:
            out_schema = out_schema.add("date", "string")
        scored = frame.mapInPandas(
            _scoring_fn(plan, broadcast, digest, model_version, partition_by_day), out_schema
        ).withColumn(plan.timestamp, F.col(plan.timestamp).cast("timestamp_ntz"))
        data_tmp = scratch / "output"
        writer = scored.write.mode("overwrite")
        if partition_by_day:
            writer = writer.partitionBy("date")
        writer.parquet(str(data_tmp))
        _tidy(data_tmp)

        written = spark.read.parquet(str(data_tmp))
        _fill_stats(written, summary)
        if progress is not None:
            progress(total, total)

        # Everything is computed; only renames are left.
        if partition_by_day:
            days = sorted(p.name for p in data_tmp.iterdir() if p.is_dir() and p.name.startswith("date="))
            for day in days:
                swap_into_place(data_tmp / day, output / day)
            summary.partitions = days
        else:
            swap_into_place(data_tmp, output)
        _tidy(rejects_tmp / "data")
        swap_into_place(rejects_tmp / "data", rejects_path)
    except Exception as exc:
        if type(exc).__module__.startswith(("pyspark", "py4j")):
            raise ScoringError(
                f"The Spark scoring job failed: {_spark_message(exc)}.",
                hint="See the Spark log above for the failing stage.",
            ) from exc
        raise
    finally:
        for df in cached:
            with contextlib.suppress(Exception):
                df.unpersist()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(rejects_tmp, ignore_errors=True)


def _spark_message(exc: BaseException) -> str:
    """The line that says what went wrong (a Python worker's exception, else Spark's first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    text = errors[-1] if errors else (lines[0] if lines else type(exc).__name__)
    return text.rstrip(".")


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Violation): ")


def _fill_stats(written: DataFrame, summary: ScoreSummary) -> None:
    from pyspark.sql import functions as F

    from keel.score import _QUANTILES, DECISION, SCORE

    summary.decisions = dict(
        sorted((str(r[0]), int(r[1])) for r in written.groupBy(DECISION).count().collect())
    )
    summary.rows = sum(summary.decisions.values())
    if not summary.rows:
        return
    row = written.agg(
        F.mean(SCORE),
        F.min(SCORE),
        F.max(SCORE),
        F.percentile_approx(SCORE, list(_QUANTILES), 100_000),
    ).first()
    summary.score_mean, summary.score_min, summary.score_max = float(row[0]), float(row[1]), float(row[2])
    summary.score_quantiles = {
        f"p{round(q * 100):02d}": round(float(v), 6) for q, v in zip(_QUANTILES, row[3], strict=True)
    }


__all__ = ["score_spark", "spark_session"]
