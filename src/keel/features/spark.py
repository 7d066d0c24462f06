"""Point-in-time features and batch scoring on Apache Spark: the same rows, scores and decisions as the local engine.

**Why a grouped map and not Spark SQL window frames.** The features could be compiled to Spark SQL
(``RANGE BETWEEN`` frames over event-time seconds), but that would be a second implementation of the window
semantics and it would not give identical numbers: a ``RANGE`` frame counts every event sharing the current
timestamp (Keel counts only those earlier in event order when ``delay = 0``), and Spark sums doubles in frame
order while Keel sums on an exact integer grid (cents and 0/1 labels sum exactly), so means could differ in
the last bit and a score sitting on a tree split could flip its decision. Instead each entity's windows are
computed by a map over partitions: rows are hash-partitioned by the entity, so a partition holds every event
of each of its entity values (every window is complete), and the whole partition is handed to
:func:`keel.features.offline.compute_features` — the very code the local engine, training and the online
parity test run — after sorting by (event time, id), the order the local engine reads. One stage per entity
column (e.g. customer, then terminal); history rows ride along and are dropped before scoring. (A grouped
map, ``applyInPandas``, gives the same numbers but sorts each partition by the key and calls Python once
per group.) Window values depend only on same-entity events, so per-bucket results
equal whole-table results exactly for values on a decimal grid (money, counts, labels); for other values a
sum can differ by about one rounding of the window total.

**Scoring.** In the last entity's pass (the same trip to Python as its windows; ``mapInPandas`` over the rows
when there are no window features): row features and ratios with the offline functions, then
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
import math
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
def _partition_frame(batches: Iterator[pd.DataFrame], plan: ScorePlan) -> pd.DataFrame:
    """All rows of one partition (every event of its entities), in the local engine's order: (event time, id)."""
    frames = [pdf for pdf in batches if len(pdf)]
    if not frames:
        return pd.DataFrame()
    pdf = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    # np.lexsort on the raw arrays: pandas' multi-column sort_values factorizes (hashes) every key first, ~20x
    # slower on a shuffled partition of ~1 M distinct times. Ids are unique, so the order is total.
    order = np.lexsort((_sort_key(pdf[plan.id_column]), _sort_key(pdf[plan.timestamp])))
    return pdf.take(order).reset_index(drop=True)


def _sort_key(series: pd.Series) -> np.ndarray:
    """An array that sorts like ``series`` (datetimes as int64 ns; strings and others as they are)."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return series.to_numpy(dtype="datetime64[ns]").view(np.int64)
    return series.to_numpy()


def _add_window_features(pdf: pd.DataFrame, plan: ScorePlan, entity: str) -> pd.DataFrame:
    block = [d for d in window_definitions(plan.definitions) if d.entity == entity]
    values = compute_features(pdf, block, timestamp=plan.timestamp, label=plan.label)
    return pdf.assign(**{d.name: values[d.name].to_numpy() for d in block})


def _slices(pdf: pd.DataFrame, rows: int = 100_000) -> Iterator[pd.DataFrame]:
    """A partition's result in Arrow-batch-sized frames (bounded transfer buffers back to the JVM)."""
    for a in range(0, len(pdf), rows):
        yield pdf.iloc[a : a + rows]


def _window_stage(df: DataFrame, plan: ScorePlan, entity: str, partitions: int) -> DataFrame:
    """Add one entity's window features: hash-partition by the entity, then one pandas pass per partition.

    A partition holds every event of each of its entity values, so its windows are complete; the rows are
    handed to :func:`compute_features` together (no per-group sort or call: Spark's ``applyInPandas`` would
    sort the partition by the key and call once per group).
    """
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    block = [d for d in window_definitions(plan.definitions) if d.entity == entity]

    def add_features(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        pdf = _partition_frame(batches, plan)
        if len(pdf):
            yield from _slices(_add_window_features(pdf, plan, entity))

    fields = [f for f in df.schema.fields] + [T.StructField(d.name, T.DoubleType()) for d in block]
    return df.repartition(partitions, F.col(entity)).mapInPandas(add_features, T.StructType(fields))


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


def _scoring_fn(
    plan: ScorePlan, broadcast: Any, digest: str, model_version: str, partition: bool, last_entity: str | None
) -> Any:
    """The function of the last stage: with ``last_entity``, that entity's windows (per partition, see
    :func:`_window_stage`) then scoring, in one pass; without window features, scoring batch by batch."""
    row_defs = [d for d in plan.definitions if isinstance(d, RawDefinition | RowDefinition | RatioDefinition)]
    window_names = [d.name for d in plan.definitions if isinstance(d, WindowDefinition)]
    keys = plan.key_columns
    ts = plan.timestamp

    def score_frame(pdf: pd.DataFrame, model: DecisionModel) -> pd.DataFrame:
        from keel.score import DECISION, MODEL_VERSION, SCORE, score_features

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
        return out

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = _executor_model(broadcast.value, digest)
        if last_entity is None:
            for pdf in batches:
                if not pdf.empty:
                    yield score_frame(pdf, model)
            return
        pdf = _partition_frame(batches, plan)
        if not len(pdf):
            return
        pdf = _add_window_features(pdf, plan, last_entity)
        pdf = pdf[pdf[SCORE_FLAG].to_numpy(dtype=bool)]  # history rows fed the windows; they are not scored
        for part in _slices(pdf):
            yield score_frame(part, model)

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
    partitions: int | None = None,
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
        # One pass over the input for the row count, the rejects per reason and the first valid event time
        # (caching the whole input for three passes cost more than reading the Parquet columns again).
        tally = checked.groupBy(REASON).agg(
            F.count(F.lit(1)).alias("rows"), F.min(_event_time(raw, plan.timestamp)).alias("first")
        ).collect()
        total = sum(int(r["rows"]) for r in tally)
        first = next((r["first"] for r in tally if r[REASON] is None), None)
        reasons = {str(r[REASON]): int(r["rows"]) for r in tally if r[REASON] is not None}
        if progress is not None:
            progress(0, total)
        (
            checked.filter(F.col(REASON).isNotNull())
            .withColumn(REJECT_REASON, F.col(REASON))
            .drop(REASON)
            .write.mode("overwrite")
            .parquet(str(rejects_tmp / "data"))
        )
        summary.rejected, summary.reject_reasons = sum(reasons.values()), dict(sorted(reasons.items()))

        frame = good.withColumn(SCORE_FLAG, F.lit(True))
        windows = window_definitions(plan.definitions)
        if history is not None and windows and first is not None:
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

        # One partition per core (at least), and at most ~1 M rows each: a partition is one pandas frame.
        rows = total + summary.history_rows
        n_parts = partitions or max(spark.sparkContext.defaultParallelism, rows // 1_000_000 + 1)
        keyed = entities(plan.definitions)
        for entity in keyed[:-1]:
            frame = _window_stage(frame, plan, entity, n_parts)
        # The last entity's windows and the scoring run in the same pass (one trip to Python, not two).
        frame = frame.repartition(n_parts, F.col(keyed[-1])) if keyed else frame.filter(F.col(SCORE_FLAG))

        files, digest = _artifact_bytes(model, scratch)
        broadcast = spark.sparkContext.broadcast(files)
        out_schema = frame.select(*plan.key_columns).schema.add(SCORE, "double").add(DECISION, "string")
        out_schema = out_schema.add("model_version", "string")
        if partition_by_day:
            out_schema = out_schema.add("date", "string")
        last = keyed[-1] if keyed else None
        scored = frame.mapInPandas(
            _scoring_fn(plan, broadcast, digest, model_version, partition_by_day, last), out_schema
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
    """Decision counts and the score summary from the written output, in one aggregation.

    Scores are binned as the local engine bins them (:class:`keel.score._ScoreStats`, 1e-5 wide), so both
    engines report the same quantiles; ``percentile_approx`` over every row cost a job of its own, ~10x longer.
    """
    from pyspark.sql import functions as F

    from keel.score import _BINS, DECISION, SCORE, _ScoreStats

    score = F.col(SCORE)
    finite = score.isNotNull() & ~F.isnan(score) & (F.abs(score) < F.lit(math.inf))
    binned = F.when(finite, F.least(F.greatest(F.floor(score * _BINS), F.lit(0)), F.lit(_BINS - 1)).cast("int"))
    rows = (
        written.groupBy(F.col(DECISION), binned.alias("bin"))
        .agg(F.count(F.lit(1)).alias("n"), F.sum(score).alias("total"), F.min(score).alias("low"),
             F.max(score).alias("high"))
        .collect()
    )
    stats = _ScoreStats()
    for r in rows:
        n = int(r["n"])
        stats.decisions[str(r[DECISION])] = stats.decisions.get(str(r[DECISION]), 0) + n
        stats.rows += n
        if r["bin"] is None:
            continue
        stats.hist[int(r["bin"])] += n
        stats.total += float(r["total"])
        stats.low, stats.high = min(stats.low, float(r["low"])), max(stats.high, float(r["high"]))
    stats.fill(summary)
    summary.rows = stats.rows


__all__ = ["score_spark", "spark_session"]
