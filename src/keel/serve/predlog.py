"""The prediction log: every scored event and its answer, plus late labels, in SQLite (WAL). Monitoring reads it.

The service appends records from the request path without waiting for the disk: a background thread batches
them into one transaction every ``flush_rows`` records or ``flush_ms`` milliseconds, whichever comes first. With
``process=True`` the rows are built and written by a process of its own (:mod:`keel.serve.logwriter`), which takes
that work off the serving process's GIL.
:meth:`PredictionLog.close` drains the queue, so a clean shutdown loses nothing.

Tables::

    predictions(seq, request_id, item, time, event_time, event_id, endpoint, inputs, features, score,
                decision, model_version, fallback, fallback_reason, stale, latency_ms)
    labels(event_id, label, at, received)
    feature_sets(id, names)                      # the rows' binary feature column (keel.logformat)
    prediction_segments(seq0, n, data)           # the rows again, columnar, per 4096 rows (keel.logformat)
    label_rows(seq, label, at)                   # labels joined to their predictions, kept at each write

Times are ISO-8601 text in UTC without offset (they sort as text). ``inputs`` and ``features`` are JSON.

Reading (what :mod:`keel.monitor` uses)::

    for chunk in iter_predictions(".keel/predictions.sqlite", start, end, batch_rows=50_000):
        chunk["score"], chunk["tx_amount"]         # one column per feature, plus the base columns
    labels = read_labels(".keel/predictions.sqlite")
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import pickle
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from keel.errors import MonitorError
from keel.logformat import (
    FEATURE_COLUMNS,
    INSERT_SEGMENT_ONLY,
    LABEL_ROWS_FOR_LABEL,
    LABEL_ROWS_FOR_PREDICTIONS,
    NAT,
    ORJSON_OPTIONS,
    Segment,
    SegmentPart,
    datetimes_us,
    encode_parts,
    ensure_feature_columns,
    ensure_segment_tables,
    feature_blob,
    feature_set_id,
    has_segment_only,
    input_fields,
    iso,
    iso_us,
    json_default,
    packer,
    part_of_rows,
    read_feature_sets,
    read_segment_columns,
    row_json,
    row_json_slow,
    segment_only_bounds,
    segment_rows,
)
from keel.serve.logwriter import ACK, frame, item_rows, spawn
from keel.sqlbatch import execute_chunked

if TYPE_CHECKING:  # pandas is imported where used: the writer process (keel.serve.logwriter) does without it
    import pandas as pd

log = logging.getLogger("keel.serve.predlog")

_SCHEMA = """
create table if not exists predictions (
    seq integer primary key autoincrement,
    request_id text not null,
    item integer not null default 0,
    time text not null,
    event_time text,
    event_id text,
    endpoint text not null,
    inputs text not null,
    features text,
    score real,
    decision text not null,
    model_version text,
    fallback integer not null,
    fallback_reason text,
    stale integer not null default 0,
    latency_ms real not null
);
create index if not exists predictions_by_event_time on predictions (event_time);
create index if not exists predictions_by_time on predictions (time);
create index if not exists predictions_by_event_id on predictions (event_id);
create table if not exists labels (
    event_id text primary key,
    label real not null,
    at text not null,
    received text not null
);
"""

PREDICTION_COLUMNS = (
    "request_id", "item", "time", "event_time", "event_id", "endpoint", "inputs", "features", "score",
    "decision", "model_version", "fallback", "fallback_reason", "stale", "latency_ms",
)
# Each row also carries its feature values as one float64 blob (keel.logformat), which monitoring reads without
# parsing text; the JSON ``features`` column stays for people and older readers.
_INSERT = (f"insert into predictions ({', '.join(PREDICTION_COLUMNS)}, {', '.join(FEATURE_COLUMNS)}) "
           f"values ({', '.join('?' * (len(PREDICTION_COLUMNS) + len(FEATURE_COLUMNS)))})")
# Rows go in _MULTI_ROWS at a time through one statement of that many VALUES tuples (the rest one by one): one
# statement step, reset and AUTOINCREMENT upkeep (sqlite_sequence) per _MULTI_ROWS rows instead of per row.
_MULTI_ROWS = 64
_ROW_VALUES = f"({', '.join('?' * (len(PREDICTION_COLUMNS) + len(FEATURE_COLUMNS)))})"
_INSERT_MULTI = _INSERT.rsplit(" values ", 1)[0] + " values " + ", ".join([_ROW_VALUES] * _MULTI_ROWS)
_LABEL_UPSERT = (
    "insert into labels (event_id, label, at, received) values (?, ?, ?, ?) on conflict(event_id)"
    " do update set label = excluded.label, at = excluded.at, received = excluded.received"
)
_INSERT_SEGMENT = "insert into prediction_segments (seq0, n, data) values (?, ?, ?)"
# A new log's page size. A row is ~1 KB (its inputs and features twice: JSON text and blob), so the writer's cost
# is mostly bytes through the WAL: 16 KiB pages take a quarter of the WAL frames, write calls and checkpoint copies
# of 4 KiB ones (commit and checkpoint 5.4 -> ~3 us per row of a 1,000-event batch). Existing logs keep theirs.
PAGE_SIZE = 16384
SEGMENT_ROWS = 4096  # rows per columnar segment: 16 write batches of 256, decoded in one np.frombuffer each
# At most this many rows of column batches in one segment-only segment (a write can hold many batches; readers
# decode a segment whole). A single larger batch still makes one segment.
SEGMENT_ONLY_ROWS = 4 * SEGMENT_ROWS
_STOP = object()


_json, _json_slow = row_json, row_json_slow  # (the rows' JSON text: keel.logformat, which rebuilds it)


@dataclass(frozen=True, slots=True, eq=False)
class PredictionBatch:
    """One request's answers column by column, for :meth:`PredictionLog.append_columns` (what the service's
    per-event records say, without a dict per event). ``n`` rows:

    - ``request_id``: the request's id; row ``i`` is ``f"{request_id}.{i}"``, or ``request_id`` itself when
      ``endpoint == "predict"``; ``endpoint``: ``"predict"`` or ``"batch"``; ``time``: when it was answered (aware).
    - ``inputs``: the validated events as columns (the column batch convention: the timestamp column a
      ``datetime64`` array, numbers float64 arrays with NaN for None, every other field a list), in the events'
      field order; ``timestamp``: the name of the timestamp column (each row's ``event_time``), or None.
    - ``event_ids``: each row's event id (or None for none), or None when the spec has no id column.
    - ``scores`` (float64, NaN: no score), ``decisions``, ``model_version``, ``fallback_reasons`` (None: the
      model answered; a row falls back when it has a reason), ``stale`` (bool), ``latency_ms`` (the request's).
    - ``features``: the float64 ``n x len(feature_names)`` matrix; ``failed``: rows without features (bool).

    The caller must not change the arrays or lists afterwards (the writer thread reads them later).
    """

    request_id: str
    endpoint: str
    time: datetime
    inputs: Mapping[str, Any]
    event_ids: Sequence[Any] | None
    timestamp: str | None
    scores: np.ndarray
    decisions: Sequence[str]
    model_version: str | None
    fallback_reasons: Sequence[str | None]
    stale: np.ndarray
    latency_ms: float
    features: np.ndarray
    feature_names: Sequence[str]
    failed: np.ndarray

    @property
    def n(self) -> int:
        return len(self.decisions)


_NUMPY = orjson.OPT_SERIALIZE_NUMPY
RECORD_CHUNK = 128  # records turned into rows between two pauses of the writer


def _pause() -> None:
    """Let the other threads (the service's event loop) take the GIL: the writer's Python runs in stretches of a
    millisecond or two, not for the interpreter's whole switch interval (5 ms) each time the loop wants it."""
    time.sleep(0)
_PLAIN = {int, float, bool, type(None)}
_TEXT = {str, type(None)}


def _split_json_list(data: bytes) -> list[str]:
    """The element texts of a JSON list of scalars without commas inside (numbers, true/false, null)."""
    text = data.decode()
    return text[1:-1].split(",") if len(text) > 2 else []


def _value_texts(values: Any, kinds: set[type] | None = None) -> tuple[list[str], list[int]]:
    """Each value's JSON text as it appears in :func:`_json` of its row's dict, and the rows whose text must come
    from the stdlib instead (a value orjson refuses: an int beyond 64 bits)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "M":
            return [f'"{t}"' if t is not None else "null"
                    for t in iso_us(values.astype("datetime64[us]").view("<i8"))], []
        return _split_json_list(orjson.dumps(values, option=_NUMPY)), []
    if kinds is None:
        kinds = set(map(type, values))
    if kinds <= _PLAIN:
        try:
            return _split_json_list(orjson.dumps(values)), []
        except orjson.JSONEncodeError:
            pass
    elif kinds <= _TEXT:
        joined = "".join(v for v in values if v is not None)
        if '"' not in joined and "\\" not in joined and joined.isprintable():  # nothing to escape
            return [f'"{v}"' if v is not None else "null" for v in values], []
    texts, slow = [], []
    for i, v in enumerate(values):
        try:
            texts.append(orjson.dumps(v, default=json_default, option=ORJSON_OPTIONS).decode())
        except (orjson.JSONEncodeError, TypeError):
            texts.append("null")
            slow.append(i)
    return texts, slow


def _objects(names: Sequence[str], texts: Sequence[Sequence[str]], n: int) -> list[str]:
    """The JSON object text of each of ``n`` rows with keys ``names`` (in order) and the value texts ``texts``
    (one list per key): one join and one split for all rows (no value text holds a NUL: JSON escapes it)."""
    if not names:
        return ["{}"] * n
    keys = [orjson.dumps(str(k)).decode() for k in names]
    width = 2 * len(keys)
    parts: list[str | None] = [None] * (width * n)
    for j, (key, values) in enumerate(zip(keys, texts, strict=True)):
        parts[2 * j::width] = [("}\x00{" if j == 0 else ",") + key + ":"] * n
        parts[2 * j + 1::width] = values
    return ("".join(parts)[1:] + "}").split("\x00")[1:]  # type: ignore[arg-type]


def _row_value(values: Any, i: int) -> Any:
    """Value ``i`` of an input column as the row's dict holds it (NaN numbers as None, times as datetimes)."""
    v = values[i]
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "M":
            import pandas as pd

            return None if np.isnat(v) else iso(pd.Timestamp(v).to_pydatetime())
        v = v.item()
        return None if isinstance(v, float) and v != v else v
    return v


def _input_texts(cols: Mapping[str, Any], n: int, values_of: Mapping[str, Any] | None = None,
                 kinds: Mapping[str, set[type]] | None = None) -> list[str]:
    """The ``inputs`` JSON text of each row of a column batch: exactly :func:`_json` of the row's dict.
    ``values_of``: the columns with times as their text (same JSON), ``kinds``: the types in list columns."""
    if not cols:
        return ["{}"] * n
    texts, slow = [], set()
    for name in cols:
        t, bad = _value_texts(cols[name] if values_of is None else values_of[name], (kinds or {}).get(name))
        texts.append(t)
        slow.update(bad)
    out = _objects(list(cols), texts, n)
    for i in slow:
        out[i] = _json({k: _row_value(v, i) for k, v in cols.items()})
    return out


def _matrix_rows(matrix: np.ndarray, names: Sequence[str]) -> tuple[list[str], list[bytes], bytes]:
    """Each row's features JSON text (:func:`_json` of its dict) and float64 blob, and the blobs end to end."""
    k = len(names)
    values = _split_json_list(orjson.dumps(matrix.ravel(), option=_NUMPY))
    texts = _objects(names, [values[j::k] for j in range(k)], len(matrix))
    raw = matrix.tobytes()
    width = 8 * k
    return texts, [raw[j:j + width] for j in range(0, len(raw), width)], raw


def _batch_rows(batch: PredictionBatch, feature_set: Any, *, rows: bool = True
                ) -> tuple[list[tuple[Any, ...]], SegmentPart]:
    """A :class:`PredictionBatch` as the rows (and segment part) its per-event records give, built column-wise.
    ``feature_set(names)`` gives the id of a feature set. ``rows=False``: the segment part only (no row, no
    JSON text: what a segment-only batch needs)."""
    n = batch.n
    rid = str(batch.request_id)
    endpoint = str(batch.endpoint)
    request_ids = [rid] * n if endpoint == "predict" else list(map((rid + ".").__add__, map(str, range(n))))
    answered = batch.time if batch.time is not None else datetime.now(UTC)
    time_text = iso(answered)
    time_us = int(datetimes_us([answered])[0])
    cols = batch.inputs
    ts = batch.timestamp
    inputs: dict[str, Any] = {}
    for name, values in cols.items():
        if isinstance(values, np.ndarray):
            if values.dtype.kind == "M":
                values = iso_us(values.astype("datetime64[us]").view("<i8"))
            elif values.dtype.kind != "f":
                values = values.tolist()
            else:  # NaN stands for None: the segment holds numpy's NaN for it, whatever NaN the column has
                nan = np.isnan(values)
                if nan.any():
                    values = np.where(nan, np.nan, values)
        inputs[name] = values
    if ts and ts in cols:
        stamps = cols[ts]
        if isinstance(stamps, np.ndarray) and stamps.dtype.kind == "M":
            event_us = stamps.astype("datetime64[us]").view("<i8")
            event_times = inputs[ts]
        else:
            event_us = datetimes_us(stamps)
            event_times = iso_us(event_us)
    else:
        event_us = np.full(n, NAT, dtype="<i8")
        event_times = [None] * n
    ids = batch.event_ids
    if ids is None:
        event_ids: list[Any] = [None] * n
    elif set(map(type, ids)) == {str}:
        event_ids = list(ids)
    else:
        event_ids = [None if v is None else str(v) for v in ids]
    scores = np.asarray(batch.scores, dtype="<f8")
    finite = np.isfinite(scores)
    score_list = scores.tolist()
    if not finite.all():
        score_list = [v if ok else None for v, ok in zip(score_list, finite.tolist(), strict=True)]
        scores = np.where(finite, scores, np.nan)
    decisions = list(batch.decisions) if set(map(type, batch.decisions)) == {str} else [
        str(d) for d in batch.decisions]
    reasons = list(batch.fallback_reasons)
    fallback = [0 if r is None else 1 for r in reasons]
    stale = np.asarray(batch.stale, dtype=bool).astype("u1")
    latency = float(batch.latency_ms)
    # features: JSON text from the matrix's value texts, blobs from its bytes
    failed = np.asarray(batch.failed, dtype=bool)
    names = list(batch.feature_names)
    k = len(names)
    matrix = np.ascontiguousarray(np.asarray(batch.features, dtype="<f8").reshape(n, k))
    any_failed = bool(failed.any())
    ok_rows = np.flatnonzero(~failed).tolist() if any_failed else range(n)
    feature_texts: list[str | None] = [None] * n
    blobs: list[bytes | None] = [None] * n
    sets = np.full(n, -1, dtype="<i4")
    fs: int | None = None
    numeric = True
    _pause()
    if len(ok_rows) and k:
        fs = feature_set(tuple(names))
        good = matrix[ok_rows] if any_failed else matrix
        if not rows:  # a segment-only part: the values end to end, no per-row text or blob
            sets[ok_rows] = fs
            raw = good.tobytes()
        else:
            texts, row_blobs, raw = _matrix_rows(good, names)
            if any_failed:
                for j, i in enumerate(ok_rows):
                    feature_texts[i], blobs[i] = texts[j], row_blobs[j]
                sets[ok_rows] = fs
            else:
                feature_texts, blobs = texts, row_blobs  # type: ignore[assignment]
                sets[:] = fs
        blob_bytes = raw
    else:  # no features at all, or none: "{}" (as an empty dict's text) without a blob
        for i in ok_rows:
            feature_texts[i] = "{}"
        numeric = not len(ok_rows)
        blob_bytes = b""
    fs_list = [fs] * n if not any_failed else [None if b is None else fs for b in blobs]
    kinds = {name: set(map(type, v)) for name, v in inputs.items() if isinstance(v, list)}
    mv = batch.model_version
    table: list[tuple[Any, ...]] = []
    if rows:
        _pause()
        input_texts = _input_texts(cols, n, inputs, kinds)
        _pause()
        table = list(zip(request_ids, range(n), repeat(time_text, n), event_times, event_ids, repeat(endpoint, n),
                         input_texts, feature_texts, score_list, decisions, repeat(mv, n), fallback, reasons,
                         stale.tolist(), repeat(latency, n), blobs, fs_list, strict=False))
    base = {
        "request_id": request_ids, "item": np.arange(n, dtype="<i8"), "time": np.full(n, time_us, dtype="<i8"),
        "event_time": event_us, "event_id": event_ids, "endpoint": [endpoint] * n, "score": scores,
        "decision": decisions, "model_version": [mv] * n, "fallback": np.array(fallback, dtype="u1"),
        "fallback_reason": reasons, "stale": stale, "latency_ms": np.full(n, latency, dtype="<f8"),
    }
    part = SegmentPart(n, base, sets, blob_bytes if numeric else b"", numeric, feature_texts, list(inputs), True,
                       inputs, kinds)
    return table, part


def _time_texts(values: Sequence[Any]) -> tuple[list[str | None], np.ndarray]:
    """:func:`iso` of each time (None: None) and its int64 microseconds, a numpy pass instead of a call each."""
    us = datetimes_us(values)
    return iso_us(us), us


def _record_times(records: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[str | None], np.ndarray, list[Any],
                                                                   list[str | None], np.ndarray]:
    """Records' answer and event times: values, :func:`iso` texts and microseconds, both in one numpy pass."""
    time_values = [r.get("time") for r in records]
    event_values = [r.get("event_time") for r in records]
    texts, us = _time_texts([*time_values, *event_values])
    n = len(records)
    return time_values, texts[:n], us[:n], event_values, texts[n:], us[n:]


def _records_rows(records: Sequence[Mapping[str, Any]], feature_row: Any, times: Any = None
                  ) -> tuple[list[tuple[Any, ...]], SegmentPart]:
    """The rows (and segment part) of per-event records, what :func:`_prediction_row` and ``feature_row`` give
    for each, built a column at a time (times formatted together, inputs' times reused). ``times``: their
    :func:`_record_times`, when already done. Raises on a malformed record (the caller then takes them one by
    one)."""
    n = len(records)
    get = [r.get for r in records]
    request_ids = [r["request_id"] for r in records]
    if set(map(type, request_ids)) != {str}:
        request_ids = list(map(str, request_ids))
    items = [int(g("item", 0)) for g in get]
    _, time_texts, time_us, event_values, event_texts, event_us = times or _record_times(records)
    time_texts = list(time_texts)
    if None in time_texts:  # no answer time: now, as _prediction_row
        now = datetime.now(UTC)
        for i in [i for i, t in enumerate(time_texts) if t is None]:
            time_texts[i], time_us[i] = iso(now), datetimes_us([now])[0]
    memo = {id(v): t for v, t in zip(event_values, event_texts, strict=True) if type(v) is datetime}

    def default(v: Any) -> Any:  # an event's time in its inputs is its event_time: formatted once
        text = memo.get(id(v))
        return text if text is not None else json_default(v)

    event_ids = [g("event_id") for g in get]
    if set(map(type, event_ids)) - {str, type(None)}:
        event_ids = [None if v is None else str(v) for v in event_ids]
    endpoints = [str(g("endpoint", "predict")) for g in get]
    inputs = [g("inputs", {}) for g in get]
    input_texts = []
    for d in inputs:
        try:
            input_texts.append(orjson.dumps(d, default=default, option=ORJSON_OPTIONS).decode())
        except (orjson.JSONEncodeError, TypeError):
            input_texts.append(_json_slow(d))
    features = [g("features") for g in get]
    # (per dict: orjson and one struct.pack are cheaper than gathering 128 dicts into a matrix first)
    feature_texts = [None if f is None else _json(f) for f in features]
    blobs_sets = list(map(feature_row, features))
    blobs = [b for b, _ in blobs_sets]
    sets = [fs for _, fs in blobs_sets]
    scores: list[Any] = [g("score") for g in get]
    if set(map(type, scores)) != {float}:
        scores = [None if v is None else float(v) for v in scores]
    scores = [v if v is None or math.isfinite(v) else None for v in scores]
    decisions = [r["decision"] for r in records]
    if set(map(type, decisions)) != {str}:
        decisions = list(map(str, decisions))
    versions = [g("model_version") for g in get]
    fallback = [int(bool(g("fallback", False))) for g in get]
    reasons = [g("fallback_reason") for g in get]
    stale = [int(bool(g("stale", False))) for g in get]
    latency = [float(g("latency_ms", 0.0)) for g in get]
    rows = list(zip(request_ids, items, time_texts, event_texts, event_ids, endpoints, input_texts, feature_texts,
                    scores, decisions, versions, fallback, reasons, stale, latency, blobs, sets, strict=True))
    base = {
        "request_id": request_ids, "item": items, "time": time_us, "event_time": event_us, "event_id": event_ids,
        "endpoint": endpoints, "score": scores, "decision": decisions, "model_version": versions,
        "fallback": fallback, "fallback_reason": reasons, "stale": stale, "latency_ms": latency,
    }
    numeric = all(b is not None or t is None for b, t in zip(blobs, feature_texts, strict=True))
    keys, uniform, fields = input_fields([d if isinstance(d, Mapping) else None for d in inputs])
    types = {k: set(map(type, values)) for k, values in fields.items()}
    for k, values in fields.items():
        if datetime in types[k]:  # as their JSON text: the times formatted above
            fields[k] = [memo.get(id(v), v) if type(v) is datetime else v for v in values]
            types[k] = set(map(type, fields[k]))
    part = SegmentPart(n, base, np.array([-1 if fs is None else fs for fs in sets], dtype="<i4"),
                       b"".join(b for b in blobs if b is not None) if numeric else b"", numeric, feature_texts,
                       keys, uniform, fields, types)
    return rows, part


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating) a prediction log for writing: WAL, normal sync, schema in place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None)
    db.execute(f"pragma page_size={PAGE_SIZE}")  # takes effect only while the file is empty: a new log
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")
    db.executescript(_SCHEMA)
    ensure_feature_columns(db)
    ensure_segment_tables(db)
    return db


class _Child:
    """A writer process and what was sent to it but not yet acknowledged (message number -> rows, flush events)."""

    def __init__(self, proc: Any, tx: Any, rx: Any) -> None:
        self.proc = proc
        self.tx = tx
        self.rx = rx
        self.inflight: dict[int, tuple[int, int, list[threading.Event]]] = {}  # number -> rows, items, events
        self.written = 0
        self.failures = 0
        self.dead = False
        self.stopping = False
        self.killed: str | None = None  # why this process ended it (the receiver may see the EOF first)
        self.started = time.monotonic()
        self.receiver: threading.Thread | None = None


class PredictionLog:
    """Batched, append-only writer. ``append``/``add_labels`` never block on disk; ``close`` flushes everything.

    Parameters: ``path`` of the SQLite file; ``flush_rows`` and ``flush_ms`` bound how long a record waits;
    ``max_queue`` bounds memory if the disk stalls (records beyond it are dropped and counted in ``dropped``);
    ``segment_rows``: rows per columnar segment (consecutive write batches are gathered into one; the rows of a
    segment not yet written are read from their rows). ``batch_segments``: the rows of column batches
    (:meth:`append_columns`) are stored only as a columnar segment each write (no row in ``predictions``, no
    text built; readers rebuild the rows: :func:`iter_rows`), per-event records as rows as before.

    ``process=True``: the rows are built and written by a process of its own (:mod:`keel.serve.logwriter`); this
    process only pickles the queued records every ``send_ms`` milliseconds and sends them over a pipe, so the
    writer's Python does not hold this process's GIL. Same tables, same API: ``flush`` returns once everything
    appended before it is committed; a writer process that dies is replaced (its unacknowledged records are
    counted in ``failures`` and logged); ``close`` stops it after writing everything, killing it after
    ``timeout`` if it is stuck. Without :meth:`start`, both modes write in the caller's thread at ``flush``/``close``.
    """

    def __init__(self, path: str | Path, *, flush_rows: int = 256, flush_ms: float = 200.0,
                 max_queue: int = 1_000_000, segment_rows: int = SEGMENT_ROWS, process: bool = False,
                 send_ms: float = 200.0, batch_segments: bool = False) -> None:
        self.path = Path(path)
        self.batch_segments = bool(batch_segments)
        self.flush_rows = max(1, int(flush_rows))
        self.flush_seconds = max(0.001, float(flush_ms) / 1000.0)
        # A deque, not a queue.Queue: appending takes no lock and wakes nobody. The writer wakes every flush_ms,
        # or when flush_rows rows are waiting, a flush is asked for, or the log closes: not once per request.
        self._queue: collections.deque[Any] = collections.deque()
        self._max_queue = max(1, int(max_queue))
        self._rows = 0  # rows appended since the writer's last drain (decides when to wake it early)
        self._wake = threading.Event()
        self._db = connect(self.path)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self._feature_sets: dict[tuple[str, ...], int] = {}
        self._segment_rows = segment_rows
        self._segments = SegmentBuffer(segment_rows, on_error=self._segment_failed)
        self.process = bool(process)
        self._send_seconds = min(self.flush_seconds, max(0.0005, float(send_ms) / 1000.0))
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._number = 0
        self._inflight_items = 0

    def start(self) -> PredictionLog:
        if self._thread is None:
            if self.process:
                self._db.close()  # the writer process has its own connection
                self._thread = threading.Thread(target=self._send_loop, name="keel-predlog-sender", daemon=True)
            else:
                self._thread = threading.Thread(target=self._run, name="keel-predlog", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> PredictionLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Queue items not yet written (in process mode: also those sent to the writer, not yet acknowledged)."""
        return len(self._queue) + self._inflight_items

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id (process mode, started), else None."""
        child = self._child
        return None if child is None or child.dead else int(child.proc.pid)

    def append(self, record: Mapping[str, Any]) -> None:
        """Queue one prediction record (keys of :data:`PREDICTION_COLUMNS`; ``inputs``/``features`` as dicts).

        The record is queued as is and turned into a row (ISO times, JSON text) by the writer thread, off the
        request path: the caller must not mutate it (or the dicts it holds) afterwards.
        """
        self._put(("p", record), 1)

    def append_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Queue records as one item (one queue operation for a whole batch; same rule as :meth:`append`)."""
        if records:
            self._put(("P", records), len(records))

    def append_columns(self, batch: PredictionBatch) -> None:
        """Queue one request's answers held column-wise (:class:`PredictionBatch`): the same rows, text, blobs and
        segments as :meth:`append_many` of its per-event records, built column by column by the writer (one queue
        operation here; same rule as :meth:`append`: do not change the batch afterwards)."""
        if batch.n:
            if self.process and self._thread is not None:
                # pickled here, while its arrays and lists are in the cache: the sender only joins the bytes
                try:
                    data: bytes | None = pickle.dumps(batch, protocol=5)
                except Exception:  # the sender tries again and drops (counting it) what does not pickle
                    data = None
                if data is not None:
                    self._put(("c", (batch.n, data)), batch.n)
                    return
            self._put(("C", batch), batch.n)

    def add_labels(self, labels: Sequence[tuple[Any, float, datetime]]) -> None:
        """Queue labels as ``(event_id, label, known_at)``; a later label for the same event replaces it."""
        received = iso(datetime.now(UTC))
        for event_id, label, at in labels:
            self._put(("l", (str(event_id), float(label), iso(at), received)), 1)

    def _put(self, item: Any, rows: int) -> None:
        if self._closed:
            raise RuntimeError("The prediction log is closed.")
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(item)
        self._rows += rows
        if self._rows >= self.flush_rows and not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is on disk (for tests and shutdown)."""
        if self._thread is None:
            self._write(self._drain())
            return
        done = threading.Event()
        self._put(("f", done), 0)
        self._wake.set()
        done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush every queued record and stop the writer. Safe to call twice."""
        if self._closed:
            return
        if self._thread is not None and self.process:
            self._close_process(timeout)
            return
        if self._thread is not None:
            self._queue.append(_STOP)
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None
        self._closed = True
        self._write(self._drain())
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("begin")
            self._segments.stage_flush(self._db)
            self._db.execute("commit")
            self._segments.commit()
        self._db.close()

    # --- writer thread ------------------------------------------------------------------------------------
    def _drain(self) -> list[Any]:
        items = []
        pop = self._queue.popleft
        self._rows = 0
        while True:
            try:
                items.append(pop())
            except IndexError:
                return items

    def _loop(self, seconds: float, handle: Any) -> None:
        """Every ``seconds``, or when woken: take the queue and ``handle(items, stop)``; return after the stop."""
        while True:
            self._wake.wait(seconds)
            self._wake.clear()
            items = self._drain()
            stop = any(i is _STOP for i in items)
            if stop:
                items = [i for i in items if i is not _STOP]
            handle(items, stop)
            if stop:
                return

    def _run(self) -> None:
        self._loop(self.flush_seconds, lambda items, stop: items and self._write(items))

    # --- writer process (process=True): the sender thread, the receiver thread -----------------------------
    def _send_loop(self) -> None:
        self._loop(self._send_seconds, self._hand_over)

    def _hand_over(self, items: list[Any], stop: bool) -> None:
        if items or stop:
            try:
                self._send(items, stop)
            except Exception as exc:  # never expected; the sender must go on (or stop) whatever happens
                lost = sum(item_rows(i) for i in items if i[0] != "f")
                with self._lock:
                    self.failures += lost
                log.error(json.dumps({"event": "predlog_send_failed", "rows": lost, "error": repr(exc)}))
                for i in items:
                    if i[0] == "f":
                        i[1].set()
        elif self._child is not None and self._child.dead:
            with contextlib.suppress(Exception):  # a writer that died is replaced before records come
                self._live_child()

    def _send(self, items: list[Any], stop: bool) -> None:
        events = [i[1] for i in items if i[0] == "f"]
        data = [i for i in items if i[0] != "f"] if events else items
        if not data and not events and (self._child is None or self._child.dead):
            return  # nothing to write and no writer to stop
        rows = sum(map(item_rows, data))
        number = self._number
        self._number += 1
        try:
            try:
                message = frame(number, rows, data, flush=bool(events), stop=stop)
            except Exception:  # an item that does not pickle loses only itself
                data, lost = self._picklable(data)
                rows -= lost
                message = frame(number, rows, data, flush=bool(events), stop=stop)
            child = self._live_child()
        except Exception as exc:  # no writer process could be started: these records are lost
            with self._lock:
                self.failures += rows
            log.error(json.dumps({"event": "predlog_writer_unavailable", "rows": rows, "error": repr(exc)}))
            for e in events:
                e.set()
            return
        with self._lock:
            child.inflight[number] = (rows, len(data), events)
            self._inflight_items += len(data)
            if stop:
                child.stopping = True
        try:
            child.tx.send_bytes(message)
        except OSError:  # the child is gone: what it had not acknowledged is counted, a new one takes over
            self._child_died(child)
        if stop:
            with contextlib.suppress(OSError):
                child.tx.close()

    def _picklable(self, items: list[Any]) -> tuple[list[Any], int]:
        good, lost = [], 0
        for item in items:
            try:
                pickle.dumps(item, protocol=5)
            except Exception as exc:
                lost += item_rows(item)
                log.error(json.dumps({"event": "predlog_record_invalid", "error": repr(exc)}))
                continue
            good.append(item)
        with self._lock:
            self.failures += lost
        return good, lost

    def _live_child(self) -> _Child:
        child = self._child
        if child is not None and not child.dead:
            return child
        if child is not None:  # a writer that dies at once (say, the log cannot be opened) is not restarted in a loop
            time.sleep(max(0.0, child.started + 1.0 - time.monotonic()))
        proc, tx, rx = spawn({"path": str(self.path), "flush_rows": self.flush_rows,
                              "flush_ms": self.flush_seconds * 1000.0, "segment_rows": self._segment_rows,
                              "batch_segments": self.batch_segments})
        child = _Child(proc, tx, rx)
        child.receiver = threading.Thread(target=self._receive_loop, args=(child,), name="keel-predlog-receiver",
                                          daemon=True)
        self._child = child
        child.receiver.start()
        return child

    def _receive_loop(self, child: _Child) -> None:
        while True:
            try:
                number, written, failures = ACK.unpack(child.rx.recv_bytes())
            except (EOFError, OSError, struct.error):
                break
            done: list[threading.Event] = []
            with self._lock:
                for k in [k for k in child.inflight if k <= number]:
                    _, items, events = child.inflight.pop(k)
                    self._inflight_items -= items
                    done.extend(events)
                self.written += written - child.written
                self.failures += failures - child.failures
                child.written, child.failures = written, failures
            for e in done:
                e.set()
        self._child_died(child)

    def _child_died(self, child: _Child, reason: str = "exited") -> None:
        """The writer process is gone: count what it had not acknowledged, release flushes waiting for it."""
        with self._lock:
            if child.dead:
                return
            child.dead = True
            lost = sum(rows for rows, _, _ in child.inflight.values())
            events = [e for _, _, es in child.inflight.values() for e in es]
            self._inflight_items -= sum(items for _, items, _ in child.inflight.values())
            child.inflight.clear()
            self.failures += lost
            clean = child.stopping and not lost
            reason = child.killed or reason
        with contextlib.suppress(OSError):
            child.rx.close()
        code = child.proc.poll()
        if code is None and reason == "exited":
            with contextlib.suppress(Exception):
                code = child.proc.wait(timeout=5)
        if not clean:
            log.error(json.dumps({"event": "predlog_writer_died", "pid": child.proc.pid, "exitcode": code,
                                  "reason": reason, "lost": lost}))
        for e in events:
            e.set()
        if not child.stopping:
            self._wake.set()  # the sender starts a new writer with the next records

    def _close_process(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        self._queue.append(_STOP)
        self._wake.set()
        assert self._thread is not None
        self._thread.join(max(0.0, deadline - time.monotonic()))
        child = self._child
        if child is not None:
            if child.receiver is not None:
                child.receiver.join(max(0.0, deadline - time.monotonic()))
            if child.proc.poll() is None:  # stuck (or still writing) past the timeout: stopped by force
                child.killed = "close_timeout"
                with contextlib.suppress(OSError):
                    child.proc.kill()
                with contextlib.suppress(Exception):
                    child.proc.wait(timeout=10)
                self._child_died(child, reason="close_timeout")
                with contextlib.suppress(OSError):
                    child.tx.close()
        self._thread.join(5.0)
        self._thread = None
        self._closed = True
        left = [i for i in self._drain() if i is not _STOP]
        lost = sum(item_rows(i) for i in left)
        if lost:
            self.failures += lost
            log.error(json.dumps({"event": "predlog_close_timeout", "rows": lost}))
        for i in left:
            if i[0] == "f":
                i[1].set()

    def _feature_row(self, features: Mapping[str, Any] | None) -> tuple[bytes | None, int | None]:
        """The row's binary feature columns: (float64 blob, feature set id), or (None, None) for non-numbers."""
        if not features:
            return None, None
        names = tuple(features)
        try:  # every value a real number (the service's rows): one pack; otherwise feature_blob's rules
            blob: bytes | None = packer(len(names)).pack(*features.values())
        except (struct.error, OverflowError, TypeError):
            blob = feature_blob(names, features)
        if blob is None:
            return None, None
        return blob, self._feature_set(names)

    def _feature_set(self, names: tuple[str, ...]) -> int:
        fs = self._feature_sets.get(names)
        if fs is None:
            fs = self._feature_sets[names] = feature_set_id(self._db, names)
        return fs

    def _write(self, items: list[Any]) -> None:
        rows: list[tuple[Any, ...]] = []
        parts: list[Any] = []  # the rows' segment parts, in order: SegmentPart, or (rows, inputs) of records
        memo: dict[int, tuple[Any, str | None]] = {}  # the records of one request share one answer time
        records: list[Mapping[str, Any]] = []

        def close_run() -> None:
            try:  # every record's times in one pass
                times: Any = _record_times(records)
            except Exception:
                times = None
            for at in range(0, len(records), RECORD_CHUNK):
                chunk = records[at:at + RECORD_CHUNK]
                _pause()
                try:  # column by column (the usual case)
                    if times is None:
                        raise ValueError("a record's time is not a time")
                    record_rows, part = _records_rows(chunk, self._feature_row,
                                                      [t[at:at + RECORD_CHUNK] for t in times])
                except Exception:  # a malformed record: one by one, so only it is lost
                    record_rows, inputs = [], []
                    for record in chunk:
                        try:
                            row = (*_prediction_row(record, memo), *self._feature_row(record.get("features")))
                        except Exception as exc:  # one malformed record must not stop the writer thread
                            self.failures += 1
                            log.error(json.dumps({"event": "predlog_record_invalid", "error": repr(exc)}))
                            continue
                        record_rows.append(row)
                        inputs.append(record.get("inputs", {}))
                    part = (record_rows, inputs)
                if record_rows:
                    rows.extend(record_rows)
                    parts.append(part)
            records.clear()

        # Runs in log order: ("rows", rows, parts) written as rows (+ row-backed segments), ("segment", n, (data,
        # bounds)) a run of column batches stored as one segment alone (batch_segments).
        runs: list[tuple[str, Any, Any]] = []
        pending: list[tuple[PredictionBatch, SegmentPart]] = []  # column batches of the next segment-only run

        def end_rows() -> None:
            nonlocal rows, parts
            if rows:
                runs.append(("rows", rows, parts))
                rows, parts = [], []

        def end_segment() -> None:
            if not pending:
                return
            seg_parts = [p for _, p in pending]
            try:
                data = encode_parts(seg_parts, _pause)
                bounds = segment_only_bounds(np.concatenate([p.base["event_time"] for p in seg_parts]),
                                             np.concatenate([p.base["time"] for p in seg_parts]))
            except Exception as exc:  # stored as rows (and a row-backed segment) instead
                self._segment_failed(sum(p.n for p in seg_parts), exc)
                for batch, _ in pending:
                    batch_rows, part = _batch_rows(batch, self._feature_set)
                    rows.extend(batch_rows)
                    parts.append(part)
                end_rows()
            else:
                runs.append(("segment", sum(p.n for p in seg_parts), (data, bounds)))
            pending.clear()

        for kind, payload in items:
            if kind in ("p", "P"):
                end_segment()
                if kind == "p":
                    records.append(payload)
                else:
                    records.extend(payload)
            elif kind == "C":
                try:
                    batch_rows, part = _batch_rows(payload, self._feature_set, rows=not self.batch_segments)
                except Exception as exc:  # a malformed batch must not stop the writer thread
                    self.failures += payload.n
                    log.error(json.dumps({"event": "predlog_batch_invalid", "error": repr(exc)}))
                    continue
                close_run()
                if self.batch_segments:
                    end_rows()
                    if pending and sum(p.n for _, p in pending) + part.n > SEGMENT_ONLY_ROWS:
                        end_segment()
                    pending.append((payload, part))
                else:
                    rows.extend(batch_rows)
                    parts.append(part)
        close_run()
        end_rows()
        end_segment()
        labels = [i[1] for i in items if i[0] == "l"]
        total = sum(len(a) if kind == "rows" else a for kind, a, _ in runs)
        if runs or labels:
            for attempt in range(3):
                try:
                    self._db.execute("begin")
                    for kind, a, b in runs:
                        if kind == "rows":
                            write_rows(self._db, a, None, self._segments, parts=b)
                        else:
                            self._db.execute(INSERT_SEGMENT_ONLY, (reserve_seq(self._db, a), a, b[0], *b[1]))
                    if labels:
                        write_labels(self._db, labels)
                    self._db.execute("commit")
                    self._segments.commit()
                    self.written += total
                    break
                except sqlite3.Error as exc:
                    self._segments.rollback()
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("rollback")
                    if attempt == 2:
                        self.failures += total + len(labels)
                        log.error(json.dumps({"event": "predlog_write_failed", "rows": total,
                                              "labels": len(labels), "error": str(exc)}))
                    else:
                        time.sleep(0.05 * (attempt + 1))
        for i in items:
            if i[0] == "f":
                i[1].set()

    def _segment_failed(self, rows: int, exc: Exception) -> None:
        log.error(json.dumps({"event": "predlog_segment_failed", "rows": rows, "error": repr(exc)}))


def _row_part(rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any]) -> SegmentPart:
    k = len(PREDICTION_COLUMNS)
    return part_of_rows(rows, PREDICTION_COLUMNS, [d if isinstance(d, Mapping) else None for d in inputs],
                        [r[k + 1] for r in rows], [r[k] for r in rows])


def segment_of(rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any]) -> bytes:
    """The columnar segment (keel.logformat) of rows as :class:`PredictionLog` writes them: the
    :data:`PREDICTION_COLUMNS` fields followed by the feature blob and feature set id; ``inputs`` the records' raw
    input dicts."""
    return encode_parts([_row_part(rows, inputs)])


def _parts_segment(parts: Sequence[Any]) -> bytes:
    return encode_parts([p if isinstance(p, SegmentPart) else _row_part(*p) for p in parts], _pause)


class SegmentBuffer:
    """Gathers consecutive write batches into segments of ``size`` rows, written inside the writer's transactions.

    :meth:`stage` (after a batch's rows are inserted) writes a segment when enough rows are gathered or the batch
    does not follow the pending rows; :meth:`commit`/:meth:`rollback` keep or drop what was staged, as the
    transaction did. Rows whose segment is never written (a crash, a failed encoding) are read from their rows.
    The pending rows are kept as parts (a column batch's :class:`SegmentPart`, or records' ``(rows, inputs)``),
    encoded column by column when the segment is written.
    """

    def __init__(self, size: int = SEGMENT_ROWS, on_error: Any = None) -> None:
        self.size = max(1, int(size))
        self.on_error = on_error
        self.seq0: int | None = None
        self.count = 0
        self.parts: list[Any] = []
        self._staged: tuple[int | None, int, list[Any]] | None = None

    def _current(self) -> tuple[int | None, int, list[Any]]:
        return self._staged if self._staged is not None else (self.seq0, self.count, self.parts)

    def _write(self, db: sqlite3.Connection, seq0: int | None, count: int, parts: list[Any]) -> None:
        if seq0 is None or not count:
            return
        try:
            data = _parts_segment(parts)
        except Exception as exc:  # the rows stay readable from the predictions table
            if self.on_error is not None:
                self.on_error(count, exc)
            return
        db.execute(_INSERT_SEGMENT, (seq0, count, data))

    def stage(self, db: sqlite3.Connection, seq0: int, rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any] | None,
              parts: Sequence[Any] | None = None) -> None:
        """Add the rows just inserted from ``seq0`` on: their records' ``inputs``, or their ``parts`` (as
        :meth:`PredictionLog` gathers them; then ``inputs`` is not read)."""
        p0, count, pparts = self._current()
        if count and p0 is not None and seq0 != p0 + count:  # another writer came in between
            self._write(db, p0, count, pparts)
            count, pparts = 0, []
        if not count:
            p0 = seq0
        new = list(parts) if parts is not None else [(rows, inputs)]
        count, pparts = count + len(rows), [*pparts, *new]
        if count >= self.size:
            self._write(db, p0, count, pparts)
            p0, count, pparts = None, 0, []
        self._staged = (p0, count, pparts)

    def stage_flush(self, db: sqlite3.Connection) -> None:
        """Write the pending rows' segment whatever its size (at close)."""
        p0, count, pparts = self._current()
        self._write(db, p0, count, pparts)
        self._staged = (None, 0, [])

    def commit(self) -> None:
        if self._staged is not None:
            self.seq0, self.count, self.parts = self._staged
            self._staged = None

    def rollback(self) -> None:
        self._staged = None


def write_rows(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any] | None,
               segments: SegmentBuffer | None, *, parts: Sequence[Any] | None = None) -> None:
    """Insert rows (:data:`PREDICTION_COLUMNS` + feature blob + set id) and the labels already known for them, and
    stage them for a segment, inside the caller's transaction (which makes their ``seq`` consecutive). ``inputs``:
    the records' raw input dicts, or ``parts`` the rows' segment parts (see :class:`SegmentBuffer`)."""
    insert_rows(db, rows)
    (last,) = db.execute("select last_insert_rowid()").fetchone()
    seq0 = int(last) - len(rows) + 1
    if segments is not None:
        segments.stage(db, seq0, rows, inputs, parts)
    if db.execute("select exists (select 1 from labels)").fetchone()[0]:  # a label may come before its event
        db.execute(LABEL_ROWS_FOR_PREDICTIONS, (seq0,))


def reserve_seq(db: sqlite3.Connection, n: int) -> int:
    """Take ``n`` consecutive ``seq`` numbers from the ``predictions`` AUTOINCREMENT counter for rows stored only in a
    segment (inside the caller's transaction): no row inserted later can get one. Returns the first."""
    row = db.execute("select seq from sqlite_sequence where name = 'predictions'").fetchone()
    if row is None:  # no row ever inserted
        (top,) = db.execute("select max(seq) from predictions").fetchone()
        last = int(top or 0)
        db.execute("insert into sqlite_sequence (name, seq) values ('predictions', ?)", (last + n,))
    else:
        last = int(row[0])
        db.execute("update sqlite_sequence set seq = ? where name = 'predictions'", (last + n,))
    return last + 1


def insert_rows(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """``insert`` the rows into ``predictions`` in their order (consecutive ``seq`` inside a transaction)."""
    execute_chunked(db, _INSERT, _INSERT_MULTI, rows, _MULTI_ROWS)


def write_labels(db: sqlite3.Connection, labels: Sequence[tuple[str, float, str | None, str | None]]) -> None:
    """Upsert ``(event_id, label, at, received)`` rows and their label rows, inside the caller's transaction."""
    db.executemany(_LABEL_UPSERT, labels)
    db.executemany(LABEL_ROWS_FOR_LABEL, [{"label": label, "at": at, "event_id": event_id}
                                          for event_id, label, at, _ in labels])


def _time_text(value: Any, memo: dict[int, tuple[Any, str | None]] | None) -> str | None:
    if value is None or memo is None:
        return iso(value)
    hit = memo.get(id(value))
    if hit is None or hit[0] is not value:  # the object is kept in the memo, so its id cannot be reused meanwhile
        hit = memo[id(value)] = (value, iso(value))
    return hit[1]


def _prediction_row(record: Mapping[str, Any], times: dict[int, tuple[Any, str | None]] | None = None
                    ) -> tuple[Any, ...]:
    features = record.get("features")
    score = record.get("score")
    return (
        str(record["request_id"]),
        int(record.get("item", 0)),
        _time_text(record.get("time"), times) or iso(datetime.now(UTC)),
        _time_text(record.get("event_time"), times),
        None if record.get("event_id") is None else str(record["event_id"]),
        str(record.get("endpoint", "predict")),
        _json(record.get("inputs", {})),
        None if features is None else _json(features),
        None if score is None or not math.isfinite(float(score)) else float(score),
        str(record["decision"]),
        record.get("model_version"),
        int(bool(record.get("fallback", False))),
        record.get("fallback_reason"),
        int(bool(record.get("stale", False))),
        float(record.get("latency_ms", 0.0)),
    )


def backfill_segments(path: str | Path, *, segment_rows: int = SEGMENT_ROWS) -> int:
    """Write the columnar segments of the rows no segment covers (a log written before segments existed), so
    monitoring reads them without parsing text. Returns the number of rows newly covered.

    One-time and offline: run it while no service writes the log (a running service's pending rows would get a
    second segment; readers then skip the overlapping one). Memory stays at one segment of rows. Example::

        backfill_segments(".keel/predictions.sqlite")   # ~10-20 s per million rows
    """
    db = connect(path)
    sets: dict[tuple[str, ...], int] = {}
    covered = 0
    try:
        spans = db.execute("select seq0, seq0 + n from prediction_segments order by seq0").fetchall()
        (last,) = db.execute("select max(seq) from predictions").fetchone()
        if last is None:
            return 0
        gaps, at = [], 1
        for lo, hi in spans:
            if lo > at:
                gaps.append((at, lo))
            at = max(at, hi)
        if at <= last:
            gaps.append((at, last + 1))
        cols = ", ".join(["seq", *PREDICTION_COLUMNS, *FEATURE_COLUMNS])
        for lo, hi in gaps:
            pending: list[tuple[Any, ...]] = []
            inputs: list[Any] = []
            seq0 = None

            def flush() -> None:
                nonlocal pending, inputs, seq0, covered
                if pending and seq0 is not None:
                    db.execute(_INSERT_SEGMENT, (seq0, len(pending), segment_of(pending, inputs)))
                    covered += len(pending)
                pending, inputs, seq0 = [], [], None

            chunks = (db.execute(f"select {cols} from predictions where seq >= ? and seq < ? order by seq",
                                 (a, min(a + segment_rows, hi))).fetchall() for a in range(lo, hi, segment_rows))
            for seq, *row in (r for chunk in chunks for r in chunk):
                if seq0 is not None and seq != seq0 + len(pending):  # a deleted row: segments cover consecutive seq
                    flush()
                k = len(PREDICTION_COLUMNS)
                blob, fs = row[k], row[k + 1]
                if blob is None or fs is None:
                    features = None if row[7] is None else json.loads(row[7])
                    names = tuple(features) if isinstance(features, dict) else ()
                    blob = feature_blob(names, features) if names else None
                    if blob is not None and names not in sets:
                        sets[names] = feature_set_id(db, names)
                    fs = sets[names] if blob is not None else None
                if seq0 is None:
                    seq0 = seq
                pending.append((*row[:k], blob, fs))
                inputs.append(json.loads(row[6]) if row[6] else None)
                if len(pending) >= segment_rows:
                    flush()
            flush()
    finally:
        db.close()
    return covered


@dataclass
class PackResult:
    """What :func:`pack_segments` did: rows now stored only in their segment, segments packed, and segments left
    as they were because their rows did not match their segment (``mismatched``) or were not all there
    (``incomplete``)."""

    rows: int = 0
    segments: int = 0
    mismatched: int = 0
    incomplete: int = 0


def pack_segment(db: sqlite3.Connection, seq0: int, n: int, data: bytes, sets: Mapping[int, tuple[str, ...]]) -> str:
    """Store one segment's rows only in the segment (as the service stores a batch's answers): delete its rows
    from ``predictions`` and ``label_rows`` and mark it segment-only, once the rows rebuilt from the segment equal
    the stored rows value for value. Runs in the caller's transaction. Returns ``"packed"``, ``"mismatched"`` or
    ``"incomplete"`` (fewer rows stored than the segment covers); only ``"packed"`` changes anything."""
    seg = Segment(data)
    cols = ", ".join([*PREDICTION_COLUMNS, *FEATURE_COLUMNS])
    stored = db.execute(f"select {cols} from predictions where seq >= ? and seq < ? order by seq",
                        (seq0, seq0 + n)).fetchall()
    if len(stored) != n:
        return "incomplete"
    if segment_rows(seg, sets) != stored:
        return "mismatched"
    db.execute("delete from predictions where seq >= ? and seq < ?", (seq0, seq0 + n))
    db.execute("delete from label_rows where seq >= ? and seq < ?", (seq0, seq0 + n))
    db.execute("update prediction_segments set segment_only = 1, t_lo = ?, t_hi = ?, t_null = ?, a_lo = ?, a_hi = ?"
               " where seq0 = ?", (*segment_only_bounds(seg.column("event_time"), seg.column("time")), seq0))
    return "packed"


def pack_segments(path: str | Path, *, before: datetime | str | None = None,
                  on_segment: Any = None) -> PackResult:
    """Store the rows that a columnar segment already holds only in that segment (what the service does for
    ``/v1/predict/batch`` answers by default): the log shrinks about five-fold and monitoring reads those rows from
    the segment alone. ``before``: only segments whose newest answer time is earlier. Every reader returns the
    same rows and labels afterwards; a segment whose rows do not rebuild exactly from it is left as it is.

    Each segment packs in its own short transaction, so a running service keeps writing; a monitoring run at the
    same time may miss the rows of the segment being packed, so run it between monitoring runs. The freed pages
    are reused by later writes (``VACUUM`` returns them to the file system). ``on_segment(done, total)`` is
    called after each segment. Example::

        pack_segments(".keel/predictions.sqlite", before="2026-11-01")
    """
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"No prediction log at {p}.",
                           hint="Serve some traffic first (`keel serve`), or pass the log's path.")
    limit = None if before is None else _time_us(before)
    db = connect(p)
    db.execute("pragma busy_timeout = 10000")
    result = PackResult()
    try:
        sets = read_feature_sets(db)
        todo = db.execute("select seq0, n from prediction_segments where segment_only is not 1 order by seq0"
                          ).fetchall()
        for done, (seq0, n) in enumerate(todo, 1):
            db.execute("begin immediate")
            try:
                (data,) = db.execute("select data from prediction_segments where seq0 = ?", (seq0,)).fetchone()
                if limit is None or int(Segment(data).column("time").max()) < limit:
                    outcome = pack_segment(db, seq0, n, data, sets)
                    if outcome == "packed":
                        result.rows += n
                        result.segments += 1
                    else:
                        setattr(result, outcome, getattr(result, outcome) + 1)
                db.execute("commit")
            except BaseException:
                db.execute("rollback")
                raise
            if on_segment is not None:
                on_segment(done, len(todo))
    finally:
        db.close()
    return result


def _time_us(value: datetime | str) -> int:
    """A time (naive: UTC; with an offset: converted) as int64 microseconds since the epoch, as segments store
    times."""
    try:
        return _us_of(iso(value))  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:  # (a text pandas cannot read, or NaT)
        raise MonitorError(f"Cannot read {value!r} as a time.",
                           hint="Give an ISO-8601 date or time, e.g. 2026-11-01 or 2026-11-01T12:00:00Z.") from exc


# --- readers ---------------------------------------------------------------------------------------------
def _open_read(path: str | Path) -> sqlite3.Connection:
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"No prediction log at {p}.",
                           hint="Serve some traffic first (`keel serve`), or check serving.prediction_log.")
    return sqlite3.connect(f"file:{p}?mode=ro", uri=True)


def iter_predictions(
    path: str | Path,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    batch_rows: int = 50_000,
    *,
    on: str = "event_time",
    expand_features: bool = True,
) -> Iterator[pd.DataFrame]:
    """Stream logged predictions with ``start <= on < end`` in log order, ``batch_rows`` rows per frame.

    ``on`` is ``"event_time"`` (the event's own time; what replays and drift windows use) or ``"time"`` (when
    the service answered). Each frame has the base columns (``time``/``event_time`` as datetimes, ``fallback``
    and ``stale`` as bool, ``inputs`` as dicts) and, with ``expand_features``, one float column per feature
    (a feature whose name clashes with a base column is prefixed ``feature_``). Memory stays at one batch.
    """
    import pandas as pd

    if on not in ("event_time", "time"):
        raise MonitorError(f"iter_predictions(on=...) must be 'event_time' or 'time'. Got {on!r} instead.")
    if batch_rows < 1:
        raise MonitorError(f"iter_predictions(batch_rows=...) must be at least 1. Got {batch_rows} instead.")
    lo_t = iso(pd.Timestamp(start)) if start is not None else None
    hi_t = iso(pd.Timestamp(end)) if end is not None else None
    columns = ["seq", *PREDICTION_COLUMNS]
    page: list[tuple[Any, ...]] = []
    for row in _iter_rows(path, lo_t, hi_t, on, batch_rows, input_dicts=True, feature_dicts=expand_features):
        page.append(row)
        if len(page) == batch_rows:
            yield _frame(page, columns, expand_features)
            page = []
    if page:
        yield _frame(page, columns, expand_features)


def _only_spans(db: sqlite3.Connection, on: str, lo_t: str | None, hi_t: str | None) -> list[tuple[int, int]]:
    """``(seq0, n)`` of the segment-only segments that may hold rows with ``lo_t <= on < hi_t``, in seq order."""
    if not has_segment_only(db):
        return []
    lo_c, hi_c = ("t_lo", "t_hi") if on == "event_time" else ("a_lo", "a_hi")
    where, params = ["segment_only = 1"], []
    if lo_t is not None or hi_t is not None:
        where.append(f"{lo_c} is not null")
    if lo_t is not None:
        where.append(f"{hi_c} >= ?")
        params.append(_us_of(lo_t))
    if hi_t is not None:
        where.append(f"{lo_c} < ?")
        params.append(_us_of(hi_t))
    return [(int(a), int(n)) for a, n in db.execute(
        f"select seq0, n from prediction_segments where {' and '.join(where)} order by seq0", params)]


def _us_of(text: str) -> int:
    return int(np.datetime64(text, "us").astype(np.int64))


def iter_rows(path: str | Path, lo_t: str | None = None, hi_t: str | None = None, *, on: str = "event_time",
              page_rows: int = 50_000, input_dicts: bool = False) -> Iterator[tuple[Any, ...]]:
    """Every logged row with ``lo_t <= on < hi_t`` (:func:`iso` texts; None: unbounded) in ``seq`` order, as
    ``(seq, *PREDICTION_COLUMNS)`` with the values and texts ``predictions`` holds, whether the row is in that
    table or only in a segment (a column batch stored columnar only: rebuilt by :func:`segment_rows`).

    ``on``: ``"event_time"`` or ``"time"``; a row without that time is left out when a bound is given (as SQL's
    comparison with NULL). Rows are read ``page_rows`` at a time (keyset pages on ``seq``) and one segment at a
    time, so memory stays bounded. ``input_dicts``: the ``inputs`` of rows stored only in a segment come as
    the dict ``json.loads`` gives of their text (built from the values: no text written to be parsed again). Example::

        for seq, request_id, *rest in iter_rows(".keel/predictions.sqlite", "2018-04-01T00:00:00.000000"):
            ...
    """
    if on not in ("event_time", "time"):
        raise MonitorError(f"iter_rows(on=...) must be 'event_time' or 'time'. Got {on!r} instead.")
    return _iter_rows(path, lo_t, hi_t, on, page_rows, input_dicts=input_dicts)


def _iter_rows(path: str | Path, lo_t: str | None, hi_t: str | None, on: str, page_rows: int, *,
               input_dicts: bool = False, feature_dicts: bool = False) -> Iterator[tuple[Any, ...]]:
    """:func:`iter_rows`; ``input_dicts``/``feature_dicts``: the ``inputs``/``features`` of segment-only rows as
    ``json.loads`` gives their texts (built from the segment's values, no text written and parsed), table rows'
    as texts."""
    db = _open_read(path)
    try:
        where, params = [], []
        if lo_t is not None:
            where.append(f"{on} >= ?")
            params.append(lo_t)
        if hi_t is not None:
            where.append(f"{on} < ?")
            params.append(hi_t)
        spans = _only_spans(db, on, lo_t, hi_t)
        sets = read_feature_sets(db) if spans else {}  # (after the spans: every set they use is named by then)
        select = f"select {', '.join(['seq', *PREDICTION_COLUMNS])} from predictions where "
        width = len(PREDICTION_COLUMNS)

        def table(last: int, stop: int | None) -> Iterator[tuple[Any, ...]]:
            # Keyset pagination on seq: constant cost per page, safe while the service keeps appending.
            clause = " and ".join(["seq > ?", *(["seq < ?"] if stop is not None else []), *where])
            while True:
                rows = db.execute(f"{select}{clause} order by seq limit ?",
                                  (last, *([stop] if stop is not None else []), *params, page_rows)).fetchall()
                yield from rows
                if len(rows) < page_rows:
                    return
                last = rows[-1][0]

        last = 0
        for seq0, n in spans:
            yield from table(last, seq0)
            (data,) = db.execute("select data from prediction_segments where seq0 = ?", (seq0,)).fetchone()
            seg = Segment(data)
            keep = None  # the rows in the time range (the texts compared as SQL compares the table's)
            if lo_t is not None or hi_t is not None:
                keep = [i for i, t in enumerate(iso_us(seg.column(on))) if t is not None
                        and (lo_t is None or t >= lo_t) and (hi_t is None or t < hi_t)]
            rebuilt = segment_rows(seg, sets, rows=keep, input_dicts=input_dicts, feature_dicts=feature_dicts)
            for seq, row in zip(range(seq0, seq0 + n) if keep is None else [seq0 + i for i in keep], rebuilt,
                                strict=True):
                yield (seq, *row[:width])
            last = seq0 + n - 1
        yield from table(last, None)
    finally:
        db.close()


SAMPLE_COLUMNS = ("seq", "event_id", "event_time", "inputs", "features")


def sample_rows(path: str | Path, sample: int, hi_t: str | None = None) -> list[tuple[Any, ...]]:
    """At most ``sample`` logged rows with features and ``event_time < hi_t`` (an :func:`iso` text; None: no
    bound), spread over the whole log: the first of those whose ``seq`` is a multiple of ``step = max(1, count //
    sample)``, in ``seq`` order, as :data:`SAMPLE_COLUMNS` (``inputs``/``features``: the texts). Rows stored only in
    segments count from their columns, and only the sampled ones are rebuilt. Example::

        rows = sample_rows(".keel/predictions.sqlite", 1000)   # [(seq, event_id, event_time, inputs, features), ...]
    """
    db = _open_read(path)
    try:
        cond = "features is not null" + (" and event_time < ?" if hi_t is not None else "")
        args: tuple[Any, ...] = (hi_t,) if hi_t is not None else ()
        (n,) = db.execute(f"select count(*) from predictions where {cond}", args).fetchone()
        spans = _only_spans(db, "event_time", None, hi_t)
        sets = read_feature_sets(db) if spans else {}
        eligible: list[tuple[int, np.ndarray]] = []  # per segment: seq0, the rows that count
        for seq0, _ in spans:  # (only the two columns that tell are read)
            seg = read_segment_columns(db, seq0, ["features.set", "features.json", "event_time"])
            ok = (seg.column("features.set") >= 0 if seg.kind("features.set") else
                  np.array([d is not None for d in seg.column("features.json")], dtype=bool))
            if hi_t is not None:  # (the texts compared as SQL compares the table's)
                ok &= np.array([t is not None and t < hi_t for t in iso_us(seg.column("event_time"))], dtype=bool)
            rows = np.flatnonzero(ok)
            n += len(rows)
            eligible.append((seq0, rows))
        step = max(1, n // max(sample, 1))
        out = db.execute(f"select {', '.join(SAMPLE_COLUMNS)} from predictions where {cond} and seq % ? = 0"
                         " order by seq limit ?", (*args, step, sample)).fetchall()
        taken = 0
        for seq0, rows in eligible:
            if taken >= sample:
                break
            rows = rows[(rows + seq0) % step == 0][:sample - taken]
            if not len(rows):
                continue
            taken += len(rows)
            (data,) = db.execute("select data from prediction_segments where seq0 = ?", (seq0,)).fetchone()
            rebuilt = segment_rows(Segment(data), sets, rows=rows)
            out += [(seq0 + i, r[4], r[3], r[6], r[7]) for i, r in zip(rows.tolist(), rebuilt, strict=True)]
    finally:
        db.close()
    return sorted(out)[:sample] if spans else out


def _frame(rows: list[tuple[Any, ...]], columns: list[str], expand: bool) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=columns)
    frame["time"] = pd.to_datetime(frame["time"])
    frame["event_time"] = pd.to_datetime(frame["event_time"])
    frame["fallback"] = frame["fallback"].astype(bool)
    frame["stale"] = frame["stale"].astype(bool)
    frame["score"] = frame["score"].astype("float64")
    # (rows stored only in a segment come as dicts already, not texts: _iter_rows)
    frame["inputs"] = [v if type(v) is dict else json.loads(v) for v in frame["inputs"]]
    if expand:
        decoded = [v if type(v) is dict else json.loads(v) if v else {} for v in frame["features"]]
        feats = pd.DataFrame.from_records(decoded, index=frame.index).astype("float64")
        feats.columns = [f"feature_{c}" if c in frame.columns else c for c in feats.columns]
        frame = pd.concat([frame.drop(columns=["features"]), feats], axis=1)
    return frame


def read_predictions(path: str | Path, start: datetime | str | None = None, end: datetime | str | None = None,
                     *, on: str = "event_time") -> pd.DataFrame:
    """All matching predictions in one frame (small logs; use :func:`iter_predictions` for large ones)."""
    import pandas as pd

    frames = list(iter_predictions(path, start, end, on=on))
    if not frames:
        return pd.DataFrame(columns=["seq", *PREDICTION_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def read_labels(path: str | Path) -> pd.DataFrame:
    """Every label received: ``event_id`` (text), ``label`` (float), ``at`` and ``received`` (datetimes)."""
    import pandas as pd

    db = _open_read(path)
    try:
        rows = db.execute("select event_id, label, at, received from labels order by at").fetchall()
    finally:
        db.close()
    frame = pd.DataFrame.from_records(rows, columns=["event_id", "label", "at", "received"])
    frame["label"] = frame["label"].astype("float64")
    frame["at"] = pd.to_datetime(frame["at"])
    frame["received"] = pd.to_datetime(frame["received"])
    return frame


__all__ = ["PREDICTION_COLUMNS", "SEGMENT_ROWS", "PackResult", "PredictionBatch", "PredictionLog", "SegmentBuffer", "backfill_segments", "iter_predictions", "iter_rows", "pack_segment", "pack_segments", "read_labels", "read_predictions", "sample_rows"]
