"""The prediction log: every scored event and its answer, plus late labels, in SQLite (WAL). Monitoring reads it.

The service appends records from the request path without waiting for the disk: a background thread batches
them into one transaction every ``flush_rows`` records or ``flush_ms`` milliseconds, whichever comes first.
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
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from keel.errors import MonitorError
from keel.logformat import (
    FEATURE_COLUMNS,
    LABEL_ROWS_FOR_LABEL,
    LABEL_ROWS_FOR_PREDICTIONS,
    ORJSON_OPTIONS,
    encode_segment,
    ensure_feature_columns,
    ensure_segment_tables,
    feature_blob,
    feature_set_id,
    iso,
    json_default,
    packer,
)

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
_LABEL_UPSERT = (
    "insert into labels (event_id, label, at, received) values (?, ?, ?, ?) on conflict(event_id)"
    " do update set label = excluded.label, at = excluded.at, received = excluded.received"
)
_INSERT_SEGMENT = "insert into prediction_segments (seq0, n, data) values (?, ?, ?)"
SEGMENT_ROWS = 4096  # rows per columnar segment: 16 write batches of 256, decoded in one np.frombuffer each
_STOP = object()


_ENCODE = json.JSONEncoder(default=json_default, separators=(",", ":")).encode


def _json_slow(value: Any) -> str:
    if isinstance(value, Mapping):
        # JSON has no NaN: missing feature values (an empty window's mean) are stored as null.
        value = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in value.items()}
    return _ENCODE(value)


def _json(value: Any) -> str:
    """Compact JSON text of an input or feature dict: non-finite floats as null, times as :func:`iso`.

    orjson writes it (a tenth of the stdlib encoder's cost, the largest part of a log row); values it refuses
    (an int beyond 64 bits) take the stdlib path, which gives the same JSON values."""
    try:
        return orjson.dumps(value, default=json_default, option=ORJSON_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return _json_slow(value)


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating) a prediction log for writing: WAL, normal sync, schema in place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=normal")
    db.executescript(_SCHEMA)
    ensure_feature_columns(db)
    ensure_segment_tables(db)
    return db


class PredictionLog:
    """Batched, append-only writer. ``append``/``add_labels`` never block on disk; ``close`` flushes everything.

    Parameters: ``path`` of the SQLite file; ``flush_rows`` and ``flush_ms`` bound how long a record waits;
    ``max_queue`` bounds memory if the disk stalls (records beyond it are dropped and counted in ``dropped``);
    ``segment_rows``: rows per columnar segment (consecutive write batches are gathered into one; the rows of a
    segment not yet written are read from their rows).
    """

    def __init__(self, path: str | Path, *, flush_rows: int = 256, flush_ms: float = 200.0,
                 max_queue: int = 1_000_000, segment_rows: int = SEGMENT_ROWS) -> None:
        self.path = Path(path)
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
        self._segments = SegmentBuffer(segment_rows, on_error=self._segment_failed)

    def start(self) -> PredictionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keel-predlog", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> PredictionLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return len(self._queue)

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

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            items = self._drain()
            stop = any(i is _STOP for i in items)
            if stop:
                items = [i for i in items if i is not _STOP]
            if items:
                self._write(items)
            if stop:
                return

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
        fs = self._feature_sets.get(names)
        if fs is None:
            fs = self._feature_sets[names] = feature_set_id(self._db, names)
        return blob, fs

    def _write(self, items: list[Any]) -> None:
        rows, inputs = [], []
        times: dict[int, tuple[Any, str | None]] = {}  # the records of one request share one answer time
        for kind, payload in items:
            if kind in ("p", "P"):
                for record in [payload] if kind == "p" else payload:
                    try:
                        rows.append((*_prediction_row(record, times), *self._feature_row(record.get("features"))))
                        inputs.append(record.get("inputs", {}))
                    except Exception as exc:  # one malformed record must not stop the writer thread
                        self.failures += 1
                        log.error(json.dumps({"event": "predlog_record_invalid", "error": repr(exc)}))
        labels = [i[1] for i in items if i[0] == "l"]
        if rows or labels:
            for attempt in range(3):
                try:
                    self._db.execute("begin")
                    if rows:
                        write_rows(self._db, rows, inputs, self._segments)
                    if labels:
                        write_labels(self._db, labels)
                    self._db.execute("commit")
                    self._segments.commit()
                    self.written += len(rows)
                    break
                except sqlite3.Error as exc:
                    self._segments.rollback()
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("rollback")
                    if attempt == 2:
                        self.failures += len(rows) + len(labels)
                        log.error(json.dumps({"event": "predlog_write_failed", "rows": len(rows),
                                              "labels": len(labels), "error": str(exc)}))
                    else:
                        time.sleep(0.05 * (attempt + 1))
        for i in items:
            if i[0] == "f":
                i[1].set()

    def _segment_failed(self, rows: int, exc: Exception) -> None:
        log.error(json.dumps({"event": "predlog_segment_failed", "rows": rows, "error": repr(exc)}))


def segment_of(rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any]) -> bytes:
    """The columnar segment (keel.logformat) of rows as :class:`PredictionLog` writes them: the
    :data:`PREDICTION_COLUMNS` fields followed by the feature blob and feature set id; ``inputs`` the records' raw
    input dicts."""
    k = len(PREDICTION_COLUMNS)
    return encode_segment(rows, PREDICTION_COLUMNS, [d if isinstance(d, Mapping) else None for d in inputs],
                          [r[k + 1] for r in rows], [r[k] for r in rows])


class SegmentBuffer:
    """Gathers consecutive write batches into segments of ``size`` rows, written inside the writer's transactions.

    :meth:`stage` (after a batch's rows are inserted) writes a segment when enough rows are gathered or the batch
    does not follow the pending rows; :meth:`commit`/:meth:`rollback` keep or drop what was staged, as the
    transaction did. Rows whose segment is never written (a crash, a failed encoding) are read from their rows.
    """

    def __init__(self, size: int = SEGMENT_ROWS, on_error: Any = None) -> None:
        self.size = max(1, int(size))
        self.on_error = on_error
        self.seq0: int | None = None
        self.rows: list[tuple[Any, ...]] = []
        self.inputs: list[Any] = []
        self._staged: tuple[int | None, list[tuple[Any, ...]], list[Any]] | None = None

    def _current(self) -> tuple[int | None, list[tuple[Any, ...]], list[Any]]:
        return self._staged if self._staged is not None else (self.seq0, self.rows, self.inputs)

    def _write(self, db: sqlite3.Connection, seq0: int | None, rows: list[tuple[Any, ...]], inputs: list[Any]) -> None:
        if seq0 is None or not rows:
            return
        try:
            data = segment_of(rows, inputs)
        except Exception as exc:  # the rows stay readable from the predictions table
            if self.on_error is not None:
                self.on_error(len(rows), exc)
            return
        db.execute(_INSERT_SEGMENT, (seq0, len(rows), data))

    def stage(self, db: sqlite3.Connection, seq0: int, rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any]) -> None:
        p0, prows, pinputs = self._current()
        if prows and p0 is not None and seq0 != p0 + len(prows):  # another writer came in between
            self._write(db, p0, prows, pinputs)
            prows, pinputs = [], []
        if not prows:
            p0 = seq0
        prows, pinputs = [*prows, *rows], [*pinputs, *inputs]
        if len(prows) >= self.size:
            self._write(db, p0, prows, pinputs)
            p0, prows, pinputs = None, [], []
        self._staged = (p0, prows, pinputs)

    def stage_flush(self, db: sqlite3.Connection) -> None:
        """Write the pending rows' segment whatever its size (at close)."""
        p0, prows, pinputs = self._current()
        self._write(db, p0, prows, pinputs)
        self._staged = (None, [], [])

    def commit(self) -> None:
        if self._staged is not None:
            self.seq0, self.rows, self.inputs = self._staged
            self._staged = None

    def rollback(self) -> None:
        self._staged = None


def write_rows(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], inputs: Sequence[Any],
               segments: SegmentBuffer | None) -> None:
    """Insert rows (:data:`PREDICTION_COLUMNS` + feature blob + set id) and the labels already known for them, and
    stage them for a segment, inside the caller's transaction (which makes their ``seq`` consecutive)."""
    db.executemany(_INSERT, rows)
    (last,) = db.execute("select last_insert_rowid()").fetchone()
    seq0 = int(last) - len(rows) + 1
    if segments is not None:
        segments.stage(db, seq0, rows, inputs)
    if db.execute("select exists (select 1 from labels)").fetchone()[0]:  # a label may come before its event
        db.execute(LABEL_ROWS_FOR_PREDICTIONS, (seq0,))


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
    if on not in ("event_time", "time"):
        raise MonitorError(f"iter_predictions(on=...) must be 'event_time' or 'time'. Got {on!r} instead.")
    if batch_rows < 1:
        raise MonitorError(f"iter_predictions(batch_rows=...) must be at least 1. Got {batch_rows} instead.")
    db = _open_read(path)
    try:
        where, params = [], []
        if start is not None:
            where.append(f"{on} >= ?")
            params.append(iso(pd.Timestamp(start)))
        if end is not None:
            where.append(f"{on} < ?")
            params.append(iso(pd.Timestamp(end)))
        last = 0
        columns = ["seq", *PREDICTION_COLUMNS]
        while True:
            # Keyset pagination on seq: constant cost per page, safe while the service keeps appending.
            clause = " and ".join(["seq > ?", *where])
            rows = db.execute(
                f"select {', '.join(columns)} from predictions where {clause} order by seq limit ?",
                (last, *params, batch_rows),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield _frame(rows, columns, expand_features)
            if len(rows) < batch_rows:
                return
    finally:
        db.close()


def _frame(rows: list[tuple[Any, ...]], columns: list[str], expand: bool) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=columns)
    frame["time"] = pd.to_datetime(frame["time"])
    frame["event_time"] = pd.to_datetime(frame["event_time"])
    frame["fallback"] = frame["fallback"].astype(bool)
    frame["stale"] = frame["stale"].astype(bool)
    frame["score"] = frame["score"].astype("float64")
    frame["inputs"] = [json.loads(v) for v in frame["inputs"]]
    if expand:
        decoded = [json.loads(v) if v else {} for v in frame["features"]]
        feats = pd.DataFrame.from_records(decoded, index=frame.index).astype("float64")
        feats.columns = [f"feature_{c}" if c in frame.columns else c for c in feats.columns]
        frame = pd.concat([frame.drop(columns=["features"]), feats], axis=1)
    return frame


def read_predictions(path: str | Path, start: datetime | str | None = None, end: datetime | str | None = None,
                     *, on: str = "event_time") -> pd.DataFrame:
    """All matching predictions in one frame (small logs; use :func:`iter_predictions` for large ones)."""
    frames = list(iter_predictions(path, start, end, on=on))
    if not frames:
        return pd.DataFrame(columns=["seq", *PREDICTION_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def read_labels(path: str | Path) -> pd.DataFrame:
    """Every label received: ``event_id`` (text), ``label`` (float), ``at`` and ``received`` (datetimes)."""
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


__all__ = ["PREDICTION_COLUMNS", "SEGMENT_ROWS", "PredictionLog", "SegmentBuffer", "backfill_segments", "iter_predictions", "read_labels", "read_predictions"]
