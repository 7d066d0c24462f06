"""Batch scoring: a table of events in, a Parquet table of scores and decisions out, out-of-core or on Spark.

:func:`score` reads the input in event-time order (DuckDB ``ORDER BY timestamp, id``, streamed as Arrow
batches), computes point-in-time features with the offline pipeline
(:func:`keel.features.offline.compute_features`, the same numbers the model was trained on and the online
store serves), scores with the :class:`~keel.artifact.DecisionModel`, applies its threshold through
:meth:`~keel.artifact.DecisionModel.decide`, and writes one row per valid input row::

    <id_column>, <timestamp>, <entity keys...>, score, decision, model_version

Example::

    model, info = Registry.from_spec(spec).load("champion")
    summary = score(spec, open_source("day.parquet"), Path("out/scores.parquet"),
                    model=model, model_version=str(info.version), history=open_source("events.parquet"))
    summary.rows, summary.rejected, summary.decisions     # 180_233, 12, {'approve': 180_101, 'review': 132}

**History.** A window feature at an event reads the same entity's events up to ``max(window + delay)`` before
it. Those events come from the input itself (earlier rows) and, for the first rows, from the optional
``history`` source: its valid rows in ``(first input time - horizon, first input time)`` are read as warm-up
and never scored or written. Without ``history`` the first ``horizon`` of the input sees shorter histories.

**Labels.** Label aggregates (``label_count``, ``label_rate``) read labels only through windows whose delay is
at least ``data.label_delay``, i.e. only labels already known at the scored event's time. Rows whose label is
null, and every row of an input without the label column, count as events but not as positives (label 0):
scoring new events with no labels yet simply sees them as not (yet) known fraud, as the online store does.

**Out-of-core.** Rows are processed in time-ordered chunks of ``chunk_rows``; between chunks the trailing
rows newer than ``last time - horizon`` are carried over (every row a later event's window can reach), so a
tiny chunk size gives exactly the one-chunk output. Rows with the same timestamp are ordered by the id column
(the same order on every engine). Output row groups go through a ``pyarrow.parquet.ParquetWriter`` into a
temporary file beside the target, renamed into place at the end: the output is the old one or the whole new
one, never a part; an interrupted run (an exception, Ctrl-C) leaves no output and no temporary file.

**Validation.** Rows that break the contract go to a rejects Parquet file (all input columns plus
``reject_reason``) and are neither scored nor used as history: a null id, entity key or timestamp, an
unparseable timestamp, a timestamp later than now + ``data.max_future_skew``, a value outside
``data.ranges``. A missing column stops the job before anything is written (:class:`~keel.errors.DataError`
naming it).

**Idempotent.** Re-running the same input to the same output replaces it. With ``partition_by_day`` the output
is a folder ``output/date=YYYY-MM-DD/part.parquet`` with one file per event day, each replaced on its own:
re-running one day's input (with the full table as ``history``) rewrites that day and leaves the others.

**Engines.** ``engine="local"`` (this module) or ``engine="spark"`` (:mod:`keel.features.spark`), which gives
the same rows, scores and decisions on Apache Spark.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keel.data.contracts import type_family
from keel.data.sources import Source, open_source, quote_identifier
from keel.errors import DataError, ScoringError
from keel.features.chunked import chunked_features, rechunk
from keel.features.definitions import (
    Definition,
    entities,
    feature_names,
    required_columns,
    resolve_definitions,
    validate_schema,
    window_definitions,
)
from keel.features.offline import compute_features, to_ns
from keel.io import atomic_write_json, process_start_time, swap_into_place, sweep_stale_temporaries

if TYPE_CHECKING:
    from keel.artifact import DecisionModel
    from keel.spec import Spec

Engine = Literal["local", "spark"]
Progress = Callable[[int, int], None]
"""Called as ``progress(rows_done, rows_total)`` after each chunk (rows read, valid or rejected)."""

DEFAULT_CHUNK_ROWS = 1_000_000
REJECT_REASON = "reject_reason"
SCORE = "score"
DECISION = "decision"
MODEL_VERSION = "model_version"
SUMMARY_FILE = "_summary.json"
REJECTS_FILE = "_rejects.parquet"
PART_FILE = "part.parquet"
_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
_BINS = 100_000  # score histogram resolution for streaming quantiles (scores are probabilities in [0, 1])


# --------------------------------------------------------------------------------------------- summary
@dataclass
class ScoreSummary:
    """What a scoring run did; also written as JSON beside the output (``<output>.summary.json``).

    ``rows`` valid rows scored and written; ``rejected`` rows sent to ``rejects``; ``history_rows`` warm-up rows
    read from the history source; ``decisions`` count per action; ``score_quantiles`` maps ``p01``... ``p99``
    to the score at that quantile (to 1e-5); ``partitions`` the day folders written with ``partition_by_day``.
    """

    engine: str
    model_version: str
    input: str
    output: str
    rejects: str
    summary_path: str
    rows: int = 0
    rejected: int = 0
    history_rows: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    score_mean: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    score_quantiles: dict[str, float] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)
    started_at: str = ""
    seconds: float = 0.0
    rows_per_second: float = 0.0
    chunk_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ScoreStats:
    """Streaming decision counts and a fine score histogram (quantiles without keeping every score)."""

    def __init__(self) -> None:
        self.rows = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.hist = np.zeros(_BINS, dtype=np.int64)
        self.decisions: dict[str, int] = {}

    def add(self, scores: np.ndarray, decisions: np.ndarray | pa.Array | pa.ChunkedArray) -> None:
        if len(scores) == 0:
            return
        finite = scores[np.isfinite(scores)]
        self.rows += len(scores)
        if len(finite):
            self.total += float(finite.sum())
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))
            idx = np.clip((finite * _BINS).astype(np.int64), 0, _BINS - 1)
            self.hist += np.bincount(idx, minlength=_BINS)
        if isinstance(decisions, pa.Array | pa.ChunkedArray):  # the written column: counted in Arrow's C++
            pairs = [(d["values"], d["counts"]) for d in pc.value_counts(decisions).to_pylist()]
        else:
            pairs = list(pd.Series(decisions, dtype=object).value_counts(sort=False).items())
        for v, c in pairs:
            self.decisions[str(v)] = self.decisions.get(str(v), 0) + int(c)

    def fill(self, summary: ScoreSummary) -> None:
        summary.decisions = dict(sorted(self.decisions.items()))
        n = int(self.hist.sum())
        if not n:
            return
        summary.score_mean = self.total / n
        summary.score_min, summary.score_max = self.low, self.high
        cum = np.cumsum(self.hist)
        for q in _QUANTILES:
            b = int(np.searchsorted(cum, q * n, side="left"))
            value = min(max((b + 0.5) / _BINS, self.low), self.high)
            summary.score_quantiles[f"p{round(q * 100):02d}"] = round(value, 6)


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Rule:
    """One validation rule: a row where it holds is rejected with ``reason`` (first matching rule wins)."""

    kind: Literal["null", "unparseable", "future", "below", "above"]
    column: str
    reason: str
    bound: float | None = None


@dataclass(frozen=True)
class ScorePlan:
    """Everything a scoring engine needs to know about the input, derived once from the spec and the schema."""

    definitions: list[Definition]
    id_column: str
    timestamp: str
    entity_keys: list[str]
    label: str | None  # the label column when definitions aggregate labels (None otherwise)
    label_in_input: bool
    columns: list[str]  # input columns read for scoring, in order
    key_columns: list[str]  # id, timestamp, entity keys: written with every score
    horizon_ns: int
    timestamp_sql: str  # DuckDB expression of the event time as TIMESTAMP
    reason_sql: str  # DuckDB expression: NULL for a valid row, else why it is rejected
    feature_names: list[str]
    now: datetime
    rules: tuple[Rule, ...] = ()
    future_limit: datetime | None = None
    timestamp_text: bool = False  # the event time is stored as text and parsed

    @property
    def output_columns(self) -> list[str]:
        return [*self.key_columns, SCORE, DECISION, MODEL_VERSION]


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def plan_scoring(
    spec: Spec, schema: dict[str, str], model: DecisionModel, *, source: str, now: datetime | None = None
) -> ScorePlan:
    """Check the input schema against the spec and the model; raise before anything is read or written.

    :class:`~keel.errors.DataError` names a missing column; :class:`~keel.errors.ScoringError` a model that
    reads features the spec does not define or a spec without ``data.id_column``/``data.timestamp``.
    """
    data = spec.data
    if not data.id_column:
        raise ScoringError(
            "Batch scoring needs data.id_column in keel.toml: every score is written with its row's id, and the "
            "id orders events that share a timestamp.",
            hint="Name the unique event id column in [data] id_column.",
        )
    if not data.timestamp:
        raise ScoringError(
            "Batch scoring needs data.timestamp in keel.toml (point-in-time features read each event's past).",
            hint="Name the event time column in [data] timestamp.",
        )
    defs = resolve_definitions(spec.features, data)
    names = feature_names(defs)
    unknown = [f for f in model.feature_names if f not in names]
    if unknown:
        raise ScoringError(
            f"The model reads features {unknown} that keel.toml [features] does not define.",
            hint="Score with the spec the model was trained with, or retrain the model on this spec.",
        )
    windows = window_definitions(defs)
    reads_label = any(d.reads_label for d in windows)
    label = data.label if reads_label else None
    ts, id_col = data.timestamp, data.id_column
    keys = list(dict.fromkeys([id_col, ts, *data.entity_keys, *entities(defs)]))
    needed = list(dict.fromkeys([*keys, *required_columns(defs, timestamp=ts, label=None)]))
    missing = [c for c in needed if c not in schema]
    if missing:
        names_text = ", ".join(repr(c) for c in missing)
        raise DataError(
            f"Column{'s' if len(missing) > 1 else ''} {names_text} needed to score {'are' if len(missing) > 1 else 'is'}"
            f" missing from {source}, which has: {', '.join(schema)}.",
            hint="Score a table with the columns the model was trained on (see keel.toml [data] and [features]).",
        )
    label_in_input = label is not None and label in schema
    columns = needed + ([label] if label_in_input and label not in needed else [])

    family = type_family(schema[ts])
    q = quote_identifier(ts)
    if family == "timestamp":
        ts_sql = f"CAST({q} AS TIMESTAMP)" if "TIME ZONE" in schema[ts].upper() or schema[ts] == "DATE" else q
    elif family == "string":
        ts_sql = f"TRY_CAST({q} AS TIMESTAMP)"
    else:
        raise DataError(
            f"The timestamp column {ts!r} of {source} is {schema[ts]}, not a time.",
            hint="Store ISO 8601 text (2018-04-01 08:30:00) or a timestamp type.",
        )
    check_schema = {c: schema[c] for c in columns} | {ts: "TIMESTAMP"}
    if label and not label_in_input:
        check_schema[label] = "DOUBLE"
    validate_schema(defs, check_schema, timestamp=ts, label=label, expected=data.schema_, source=source)

    now = now or datetime.now(UTC).replace(tzinfo=None)
    limit = now + data.max_future_skew
    rules: list[Rule] = [Rule("null", id_col, f"null id {id_col!r}")]
    rules += [Rule("null", e, f"null entity key {e!r}") for e in keys[2:]]
    rules.append(Rule("null", ts, f"null timestamp {ts!r}"))
    if family == "string":
        rules.append(Rule("unparseable", ts, f"unparseable timestamp {ts!r}"))
    rules.append(Rule("future", ts, f"timestamp {ts!r} in the future (after {limit:%Y-%m-%d %H:%M:%S})"))
    for col, bounds in data.ranges.items():
        if col not in schema:
            continue  # e.g. the label of new, unlabelled events
        if type_family(schema[col]) not in ("int", "float"):
            raise DataError(f"Column {col!r} has a range in data.ranges but is {schema[col]} in {source}, not a number.")
        if bounds.min is not None:
            rules.append(Rule("below", col, f"{col!r} below {bounds.min:g}", float(bounds.min)))
        if bounds.max is not None:
            rules.append(Rule("above", col, f"{col!r} above {bounds.max:g}", float(bounds.max)))
    cases: list[str] = []
    for rule in rules:
        q_col = quote_identifier(rule.column)
        value = f"CAST({q_col} AS DOUBLE)"
        condition = {
            "null": f"{q_col} IS NULL",
            "unparseable": f"{ts_sql} IS NULL",
            "future": f"{ts_sql} > TIMESTAMP '{limit:%Y-%m-%d %H:%M:%S.%f}'",
            "below": f"{value} < {rule.bound!r}",
            "above": f"{value} > {rule.bound!r} AND NOT isnan({value})",
        }[rule.kind]
        cases.append(f"WHEN {condition} THEN {_sql_text(rule.reason)}")
    horizon = max((to_ns(d.horizon) for d in windows), default=0)
    return ScorePlan(
        definitions=defs,
        id_column=id_col,
        timestamp=ts,
        entity_keys=keys[2:],
        label=label,
        label_in_input=label_in_input,
        columns=columns,
        key_columns=keys,
        horizon_ns=horizon,
        timestamp_sql=ts_sql,
        reason_sql="CASE " + " ".join(cases) + " END",
        rules=tuple(rules),
        future_limit=limit,
        timestamp_text=family == "string",
        feature_names=list(model.feature_names),
        now=now,
    )


# --------------------------------------------------------------------------------------------- pure core
def features_for_scoring(frame: pd.DataFrame, plan: ScorePlan, first_row: int = 0) -> pd.DataFrame:
    """Point-in-time features of the rows of ``frame`` from ``first_row`` on (earlier rows: history only).

    Rows in event order; the label column optional.
    """
    if plan.label and plan.label not in frame.columns:
        frame = frame.assign(**{plan.label: np.float64(np.nan)})
    return compute_features(frame, plan.definitions, timestamp=plan.timestamp, label=plan.label, first_row=first_row)


def score_features(features: pd.DataFrame, model: DecisionModel) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores and decisions for a feature frame: the one scoring step every engine calls."""
    scores = model.scores(features)
    return scores, model.decide(scores)


def output_table(keys: pd.DataFrame, scores: np.ndarray, decisions: np.ndarray, model_version: str) -> pa.Table:
    """The output rows as Arrow: key columns, ``score``, ``decision``, ``model_version``."""
    table = pa.Table.from_pandas(keys, preserve_index=False)
    n = len(scores)
    table = table.append_column(SCORE, pa.array(scores, type=pa.float64()))
    table = table.append_column(DECISION, pa.array(decisions, type=pa.string()))
    version = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([model_version]))
    return table.append_column(MODEL_VERSION, version.cast(pa.string()))


# --------------------------------------------------------------------------------------------- local engine
def _output_paths(output: Path, partition_by_day: bool, rejects: Path | None) -> tuple[Path, Path]:
    if partition_by_day:
        return output / SUMMARY_FILE, rejects or output / REJECTS_FILE
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".summary.json"), rejects or output.with_name(stem + ".rejects.parquet")


class _Outputs:
    """Temporary Parquet files beside their targets; :meth:`commit` renames them all, :meth:`discard` deletes."""

    def __init__(self, output: Path, partition_by_day: bool, timestamp: str, distinct: Sequence[str] = ()) -> None:
        self.output = output
        self.distinct = {*distinct, SCORE}
        self.partition_by_day = partition_by_day
        self.timestamp = timestamp
        self.pending: list[tuple[Path, Path]] = []
        self.writer: pq.ParquetWriter | None = None
        self.day: str | None = None

    def _open(self, target: Path, schema: pa.Schema) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self.pending.append((Path(name), target))
        # Dictionary pages only where they pay: ids, event times and scores are nearly all distinct, and trying
        # a dictionary on them before falling back cost ~40 % of the write CPU (and a slightly larger file).
        few = [c for c in schema.names if c not in self.distinct]
        self.writer = pq.ParquetWriter(name, schema, compression="snappy", use_dictionary=few)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, table: pa.Table) -> None:
        if not self.partition_by_day:
            if self.writer is None:
                self._open(self.output, table.schema)
            assert self.writer is not None
            self.writer.write_table(table)
            return
        days = pd.DatetimeIndex(table.column(self.timestamp).to_pandas()).strftime("%Y-%m-%d").to_numpy()
        # Rows arrive in time order, so each day is one contiguous run.
        starts = np.flatnonzero(np.r_[True, days[1:] != days[:-1]])
        for a, b in zip(starts, [*starts[1:], len(days)], strict=True):
            if days[a] != self.day:
                self._close()
                self.day = str(days[a])
                self._open(self.output / f"date={self.day}" / PART_FILE, table.schema)
            assert self.writer is not None
            self.writer.write_table(table.slice(a, b - a))

    def finish_empty(self, schema: pa.Schema) -> None:
        if not self.partition_by_day and not self.pending:
            self._open(self.output, schema)

    def commit(self) -> list[str]:
        self._close()
        for tmp, target in self.pending:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            swap_into_place(tmp, target)
            if self.partition_by_day:  # parts an earlier Spark run left in the same day folder
                for stale in target.parent.glob("part-*"):
                    stale.unlink()
        written = [str(target.parent.name) for _, target in self.pending] if self.partition_by_day else []
        self.pending = []
        return written

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._close()
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []


def _select_sql(plan: ScorePlan, columns: Sequence[str], where: str, order: bool) -> str:
    cols = ", ".join(
        f"{plan.timestamp_sql} AS {quote_identifier(c)}" if c == plan.timestamp else quote_identifier(c)
        for c in columns
    )
    sql = f"SELECT {cols} FROM source WHERE {where}"
    if order:
        sql += f" ORDER BY {plan.timestamp_sql}, {quote_identifier(plan.id_column)}"
    return sql


@contextlib.contextmanager
def _connection(source: Source, spill: Path) -> Iterator[Any]:
    con = source.connect()
    try:
        # ORDER BY on an input larger than memory spills to disk beside the output (removed afterwards).
        con.execute(f"SET temp_directory = {_sql_text(str(spill))}").fetchall()
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _stream(con: Any, sql: str, rows: int, what: str) -> Iterator[pa.RecordBatch]:
    import duckdb

    try:
        yield from con.sql(sql).to_arrow_reader(rows)
    except duckdb.Error as exc:
        raise DataError(f"Reading {what} failed: {str(exc).strip().splitlines()[0]}.") from exc


def _write_rejects(con: Any, plan: ScorePlan, target: Path, what: str) -> tuple[dict[str, int], Path]:
    """Stream invalid rows (every input column + ``reject_reason``) into a temp file beside ``target``."""
    sql = f"SELECT *, {plan.reason_sql} AS {REJECT_REASON} FROM source WHERE ({plan.reason_sql}) IS NOT NULL"
    reasons: dict[str, int] = {}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        writer: pq.ParquetWriter | None = None
        try:
            for batch in _stream(con, sql, 100_000, what):
                if writer is None:
                    writer = pq.ParquetWriter(name, batch.schema)
                writer.write_batch(batch)
                for reason, n in pd.Series(batch.column(REJECT_REASON).to_numpy(zero_copy_only=False)).value_counts().items():
                    reasons[str(reason)] = reasons.get(str(reason), 0) + int(n)
            if writer is None:
                empty = con.sql(sql + " LIMIT 0").to_arrow_table()
                writer = pq.ParquetWriter(name, empty.schema)
        finally:
            if writer is not None:
                writer.close()
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return reasons, Path(name)


def _history_frame(history: Source, spec: Spec, model: DecisionModel, plan: ScorePlan, start: Any) -> pd.DataFrame:
    """Valid history rows in ``(start - horizon, start)``, in event order, with the columns scoring reads."""
    hplan = plan_scoring(spec, history.schema(), model, source=history.describe(), now=plan.now)
    columns = [c for c in plan.columns if c != plan.label]
    if plan.label and hplan.label_in_input:
        columns.append(plan.label)  # history labels count even when the input has none
    low = pd.Timestamp(start) - pd.Timedelta(plan.horizon_ns, unit="ns")
    where = (
        f"({hplan.reason_sql}) IS NULL AND {hplan.timestamp_sql} > TIMESTAMP '{low.isoformat(sep=' ')}'"
        f" AND {hplan.timestamp_sql} < TIMESTAMP '{pd.Timestamp(start).isoformat(sep=' ')}'"
    )
    with history.connect() as con:
        frame = con.sql(_select_sql(hplan, columns, where, order=True)).to_arrow_table().to_pandas()
    return frame


def _score_local(
    spec: Spec,
    source: Source,
    output: Path,
    *,
    model: DecisionModel,
    model_version: str,
    chunk_rows: int,
    rejects: Path | None,
    progress: Progress | None,
    history: Source | None,
    partition_by_day: bool,
    now: datetime | None,
    summary: ScoreSummary,
) -> None:
    plan = plan_scoring(spec, source.schema(), model, source=source.describe(), now=now)
    summary_path, rejects_path = _output_paths(output, partition_by_day, rejects)
    summary.rejects, summary.summary_path = str(rejects_path), str(summary_path)
    spill = Path(tempfile.mkdtemp(prefix=f".{output.name}.spill.", dir=_parent(output)))
    outputs = _Outputs(output, partition_by_day, plan.timestamp, distinct=[plan.id_column, plan.timestamp])
    rejects_tmp: Path | None = None
    stats = _ScoreStats()
    try:
        with _connection(source, spill) as con:
            total = int(con.execute("SELECT count(*) FROM source").fetchall()[0][0])
            reasons, rejects_tmp = _write_rejects(con, plan, rejects_path, source.describe())
            summary.rejected, summary.reject_reasons = sum(reasons.values()), dict(sorted(reasons.items()))
            done = summary.rejected
            if progress is not None:
                progress(done, total)
            carry: pd.DataFrame | None = None
            if history is not None and plan.horizon_ns > 0:
                first = con.execute(
                    f"SELECT min({plan.timestamp_sql}) FROM source WHERE ({plan.reason_sql}) IS NULL"
                ).fetchall()[0][0]
                if first is not None:
                    carry = _history_frame(history, spec, model, plan, first)
                    summary.history_rows = len(carry)
            sql = _select_sql(plan, plan.columns, f"({plan.reason_sql}) IS NULL", order=True)
            schema: pa.Schema | None = None
            chunks = rechunk(_stream(con, sql, min(chunk_rows, 1_000_000), source.describe()), chunk_rows)
            stream = chunked_features(chunks, lambda frame, first: features_for_scoring(frame, plan, first),
                                      timestamp=plan.timestamp, horizon_ns=plan.horizon_ns, history=carry,
                                      skips_history=True)
            # Features of the next chunk are computed in a second thread while this one predicts and writes
            # (the compiled trees and most NumPy work release the GIL), so the stages overlap instead of adding up.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-score") as pool:
                pending = pool.submit(next, stream, None)
                while (ready := pending.result()) is not None:
                    chunk, features = ready
                    pending = pool.submit(next, stream, None)
                    scores, decisions = score_features(features, model)
                    table = output_table(chunk.select(plan.key_columns).to_pandas(), scores, decisions,
                                         model_version)
                    schema = table.schema
                    outputs.write(table)
                    stats.add(scores, table.column(DECISION))
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            if schema is None:
                schema = output_table(
                    _empty_keys(con, plan), np.zeros(0), np.zeros(0, dtype=object), model_version
                ).schema
                outputs.finish_empty(schema)
        summary.rows = stats.rows
        stats.fill(summary)
        summary.partitions = outputs.commit()
        swap_into_place(rejects_tmp, rejects_path)
        rejects_tmp = None
    finally:
        outputs.discard()
        if rejects_tmp is not None:
            rejects_tmp.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)


def _empty_keys(con: Any, plan: ScorePlan) -> pd.DataFrame:
    return con.sql(_select_sql(plan, plan.key_columns, "false", order=False)).to_arrow_table().to_pandas()


def _parent(output: Path) -> Path:
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


# --------------------------------------------------------------------------------------------- entry points
def score(
    spec: Spec,
    input: Source,
    output: str | Path,
    *,
    model: DecisionModel,
    model_version: str,
    engine: Engine = "local",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    rejects: str | Path | None = None,
    progress: Progress | None = None,
    history: Source | None = None,
    partition_by_day: bool = False,
    spark_master: str | None = None,
    spark: Any = None,
    now: datetime | None = None,
) -> ScoreSummary:
    """Score ``input`` with ``model`` into Parquet at ``output``; return (and write) the run summary.

    Parameters:
        spec: the validated keel.toml (data columns, feature definitions, ranges).
        input: the events to score (:func:`keel.data.sources.open_source`: CSV, Parquet file/glob, DuckDB table).
        output: a Parquet file (local engine), a folder of Parquet parts (Spark), or with ``partition_by_day`` a
            folder of ``date=YYYY-MM-DD`` partitions.
        model: the decision model (threshold and calibration included); ``model_version`` is written per row.
        engine: ``"local"`` (DuckDB + pandas, chunked) or ``"spark"`` (``spark_master``, default ``local[*]``,
            or an existing ``spark`` session).
        chunk_rows: rows per chunk on the local engine (memory is about ``chunk_rows`` + the history horizon).
        rejects: where invalid rows go (default ``<output stem>.rejects.parquet`` or ``output/_rejects.parquet``).
        progress: ``progress(rows_done, rows_total)`` after each chunk; an exception raised there stops the run
            and leaves no output behind.
        history: older events for the first rows' windows (read, never scored).
        now: the clock for the future-timestamp check (default: now, UTC).

    Raises:
        DataError: a column is missing or the input cannot be read (before anything is written).
        ScoringError: the spec or model cannot score this input.
    """
    if chunk_rows < 1:
        raise ScoringError(f"chunk_rows must be a positive number of rows. Got {chunk_rows} instead.")
    output = Path(output)
    if partition_by_day and output.suffix == ".parquet":
        raise ScoringError(
            f"With partition_by_day the output is a folder of date=YYYY-MM-DD partitions, not the file {output}.",
            hint="Name a folder (e.g. scores/) or drop --partition-by-day.",
        )
    # Litter of runs killed mid-write: temporaries of every file this run writes, and DuckDB's spill folder.
    started = process_start_time()
    for written in (output, *_output_paths(output, partition_by_day, Path(rejects) if rejects else None)):
        sweep_stale_temporaries(written, older_than=started, patterns=(".{}.*.tmp", ".{}.spill.*"))
    summary = ScoreSummary(
        engine=engine,
        model_version=model_version,
        input=input.describe(),
        output=str(output),
        rejects="",
        summary_path="",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        chunk_rows=chunk_rows,
    )
    start = time.perf_counter()
    if engine == "local":
        _score_local(
            spec,
            input,
            output,
            model=model,
            model_version=model_version,
            chunk_rows=chunk_rows,
            rejects=Path(rejects) if rejects is not None else None,
            progress=progress,
            history=history,
            partition_by_day=partition_by_day,
            now=now,
            summary=summary,
        )
    elif engine == "spark":
        from keel.features.spark import score_spark

        score_spark(
            spec,
            input,
            output,
            model=model,
            model_version=model_version,
            rejects=Path(rejects) if rejects is not None else None,
            progress=progress,
            history=history,
            partition_by_day=partition_by_day,
            master=spark_master,
            spark=spark,
            now=now,
            summary=summary,
        )
    else:
        raise ScoringError(f"engine must be 'local' or 'spark'. Got {engine!r} instead.")
    summary.seconds = round(time.perf_counter() - start, 3)
    summary.rows_per_second = round((summary.rows + summary.rejected) / summary.seconds, 1) if summary.seconds else 0.0
    atomic_write_json(summary.summary_path, summary.to_dict())
    return summary


def run_score(
    spec: Spec,
    input: str | Path,
    output: str | Path,
    *,
    model: str = "champion",
    engine: Engine = "local",
    master: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    rejects: str | Path | None = None,
    partition_by_day: bool = False,
    history: str | Path | None = None,
    table: str | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    """``keel score INPUT -o OUTPUT``: load ``model`` (alias or version) from the registry and :func:`score`.

    ``history`` defaults to nothing; pass ``data.source`` (e.g. ``--history``) to warm up windows with older events.
    """
    from keel.registry import Registry

    decision_model, info = Registry.from_spec(spec).load(model)
    source = open_source(input, table=table)
    past = open_source(history) if history is not None else None
    return score(
        spec,
        source,
        output,
        model=decision_model,
        model_version=str(info.version),
        engine=engine,
        chunk_rows=chunk_rows,
        rejects=rejects,
        progress=progress,
        history=past,
        partition_by_day=partition_by_day,
        spark_master=master,
    )


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ScorePlan",
    "ScoreSummary",
    "features_for_scoring",
    "output_table",
    "plan_scoring",
    "run_score",
    "score",
    "score_features",
]
