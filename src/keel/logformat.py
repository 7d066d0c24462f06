"""The prediction log's binary feature column: the contract between the service (writer) and monitoring (reader).

Besides the ``features`` JSON text (kept, for people and old readers), each prediction row may carry its feature
values as one blob, ``features_f64``: little-endian float64, one per feature, in the order of a named *feature
set*; ``feature_set`` is the id of that set in the table ``feature_sets(id, names)`` (``names`` is the JSON list
of feature names). Monitoring then reads a batch of rows with one query and one ``np.frombuffer``, no text to
parse. Rows without a blob (old logs, string-valued features) are read from the JSON text as before.

Writer side (what :mod:`keel.serve.predlog` calls; a top-level module so neither side imports the other)::

    ensure_feature_columns(db)                      # once per connection: migrates an existing log, idempotent
    fs = feature_set_id(db, names)                  # once per distinct list of names (cache it)
    blob = feature_blob(names, record["features"])  # per row; None when a value is not a number
    row = (..., blob, fs if blob is not None else None)
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

import numpy as np
import orjson
import pandas as pd

from keel.errors import MonitorError


def iso(value: datetime | pd.Timestamp | str | None) -> str | None:
    """The log's time text: UTC ISO-8601 without offset, microseconds (naive times are taken as UTC).

    The writer stores every time this way and readers bound their queries with it (text order is time order).
    """
    if value is None:
        return None
    # Plain datetimes (what the request models produce) without pandas: the same text at a tenth of the cost.
    if type(value) is datetime:
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        if value.year >= 1000:
            return value.isoformat(timespec="microseconds")
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%f")


FEATURE_COLUMNS = ("features_f64", "feature_set")
FEATURE_DDL = (
    "alter table predictions add column features_f64 blob",
    "alter table predictions add column feature_set integer",
)
FEATURE_SETS_DDL = "create table if not exists feature_sets (id integer primary key, names text unique)"
NAN = float("nan")


@lru_cache(maxsize=64)
def packer(n: int) -> struct.Struct:
    """The ``struct`` packing ``n`` little-endian float64 values (a feature blob)."""
    return struct.Struct(f"<{n}d")


def feature_blob(names: Sequence[str], values: Mapping[str, Any] | None) -> bytes | None:
    """The values of ``names`` (in that order) as little-endian float64 bytes, ``8 * len(names)`` long.

    A missing or ``None`` value is stored as NaN; booleans as 0/1. Readers take any non-finite value as missing
    (as the JSON text, which stores NaN and infinities as null). Returns None when ``values`` is None or any
    value is not a real number (a string, a list...): such rows keep only their JSON text. Example::

        feature_blob(["tx_amount", "is_night"], {"tx_amount": 76.5, "is_night": True})  # 16 bytes
    """
    if values is None:
        return None
    out = []
    get = values.get
    try:
        for name in names:
            v = get(name)
            if v is None:
                out.append(NAN)
            elif type(v) is float:
                out.append(v)
            elif isinstance(v, bool | int | float | np.integer | np.floating | np.bool_):
                out.append(float(v))
            else:
                return None
    except OverflowError:  # an int beyond float64
        return None
    return packer(len(out)).pack(*out)


def names_text(names: Sequence[str]) -> str:
    """How a feature set's names are stored (and compared): compact JSON."""
    return json.dumps(list(names), separators=(",", ":"))


def has_feature_columns(conn: sqlite3.Connection) -> bool:
    """Whether the log's ``predictions`` table has the binary feature columns (read-only connections too)."""
    cols = {r[1] for r in conn.execute("pragma table_info(predictions)")}
    return set(FEATURE_COLUMNS) <= cols


def ensure_feature_columns(conn: sqlite3.Connection) -> None:
    """Add ``features_f64``/``feature_set`` and ``feature_sets`` to a log that lacks them. Idempotent; old rows keep
    NULL there (read from their JSON). Call after the ``predictions`` table exists."""
    try:
        cols = {r[1] for r in conn.execute("pragma table_info(predictions)")}
        if not cols:
            raise MonitorError("The prediction log has no predictions table to add feature columns to.",
                               hint="Create the log's schema first (keel.serve.predlog.connect).")
        for column, ddl in zip(FEATURE_COLUMNS, FEATURE_DDL, strict=True):
            if column not in cols:
                try:
                    conn.execute(ddl)
                except sqlite3.OperationalError as exc:  # another process added it in between
                    if "duplicate column" not in str(exc):
                        raise
        conn.execute(FEATURE_SETS_DDL)
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot add the binary feature columns to the prediction log: {exc}.") from exc


def feature_set_id(conn: sqlite3.Connection, names: Sequence[str]) -> int:
    """The id of this ordered list of feature names in ``feature_sets``, inserted when new (stable across calls)."""
    text = names_text(names)
    try:
        conn.execute("insert or ignore into feature_sets (names) values (?)", (text,))
        (fid,) = conn.execute("select id from feature_sets where names = ?", (text,)).fetchone()
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot record the feature set {text[:80]} in the prediction log: {exc}.",
                           hint="Call ensure_feature_columns(conn) first.") from exc
    return int(fid)


def read_feature_sets(conn: sqlite3.Connection) -> dict[int, list[str]]:
    """Every feature set of the log: ``{id: names}`` (empty for a log without the table)."""
    try:
        rows = conn.execute("select id, names from feature_sets").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {int(i): list(json.loads(t)) for i, t in rows}




# --- columnar segments ---------------------------------------------------------------------------------------
# The service writes its rows in batches (group commit). Beside the rows, each batch is stored once more as one
# columnar *segment*: every base column, feature and raw input field of the batch's rows as a typed array, so
# monitoring reads a million rows as a few thousand blobs and ``np.frombuffer`` views instead of printing and
# parsing a million rows of text. ``prediction_segments(seq0, n, data)`` covers the rows ``seq0 .. seq0 + n - 1``
# (one write transaction gives consecutive ``seq``); rows no segment covers (older logs, a batch whose segment
# could not be built) are read from their row as before. ``label_rows(seq, label, at)`` is the labels table joined
# to the predictions by ``event_id``, kept by the writer in the same transactions, so a reader takes the labels of
# a range of ``seq`` without one index probe per row.
#
# A segment is ``b"KSG1"``, a little-endian uint32 header length, a JSON header
# ``{"n": rows, "columns": {name: [kind, offset, nbytes, extra]}}`` and the column buffers. Kinds:
# ``f8`` float64 (NaN: missing), ``i8`` int64, ``u1`` uint8, ``t`` int64 microseconds since 1970 (NaT: missing),
# ``cat`` int32 codes into ``extra`` (the distinct values, JSON scalars, null included), ``json`` a JSON list of
# the values. Columns: the base columns by name (``seq`` implied), ``features.set`` (int32 feature set id, -1:
# none) with ``features.f64`` (the rows' feature blobs end to end), or ``features.json`` (the rows' JSON texts,
# when a value is not a number), and ``input.<field>`` per raw input field.
SEGMENTS_DDL = ("create table if not exists prediction_segments"
                " (seq0 integer primary key, n integer not null, data blob not null)")
LABEL_ROWS_DDL = ("create table if not exists label_rows"
                  " (seq integer primary key, label real not null, at_us integer not null)")
LABELS_AT_DDL = "create index if not exists labels_by_at on labels (at)"


def _at_us(text: str) -> str:
    """SQL: a time text as iso() writes it (``YYYY-MM-DDTHH:MM:SS.ffffff``) in integer microseconds since 1970."""
    return f"(strftime('%s', substr({text}, 1, 19)) * 1000000 + cast(substr({text}, 21, 6) as integer))"


# Labels of new predictions (a label may arrive first) and predictions of new labels, joined by event id; the
# time a label became known as an integer, so a reader takes a range of them as numbers, not texts to parse.
LABEL_ROWS_FOR_PREDICTIONS = ("insert or replace into label_rows (seq, label, at_us) select p.seq, l.label,"
                              f" {_at_us('l.at')} from predictions p join labels l on l.event_id = p.event_id"
                              " where p.seq >= ?")
LABEL_ROWS_FOR_LABEL = ("insert or replace into label_rows (seq, label, at_us)"
                        f" select seq, :label, {_at_us(':at')} from predictions where event_id = :event_id")
SEGMENT_MAGIC = b"KSG1"
_SEGMENT_BASE = ("request_id", "item", "time", "event_time", "event_id", "endpoint", "score", "decision",
                 "model_version", "fallback", "fallback_reason", "stale", "latency_ms")
_BASE_KIND = {"request_id": "json", "item": "i8", "time": "t", "event_time": "t", "event_id": "json",
              "endpoint": "cat", "score": "f8", "decision": "cat", "model_version": "cat", "fallback": "u1",
              "fallback_reason": "cat", "stale": "u1", "latency_ms": "f8"}


def has_segments(conn: sqlite3.Connection) -> bool:
    """Whether the log has the segment and label-row tables (a log migrated by :func:`ensure_segment_tables`)."""
    names = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
    return {"prediction_segments", "label_rows"} <= names


def ensure_segment_tables(conn: sqlite3.Connection) -> None:
    """Create ``prediction_segments`` and ``label_rows`` (filled from the labels already there) when missing.
    Idempotent; call after the ``predictions`` and ``labels`` tables exist."""
    try:
        new = not has_segments(conn)
        conn.execute(SEGMENTS_DDL)
        conn.execute(LABEL_ROWS_DDL)
        conn.execute(LABELS_AT_DDL)
        if new:
            conn.execute(LABEL_ROWS_FOR_PREDICTIONS, (0,))
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot add the segment tables to the prediction log: {exc}.") from exc


def json_default(v: Any) -> Any:
    """What the log's JSON text holds for a value JSON has no type for: times as :func:`iso`, the rest as text."""
    return iso(v) if isinstance(v, datetime | pd.Timestamp) else str(v)


# orjson with the log's rules: times go through json_default (iso), numpy values and non-string keys as the stdlib.
ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _dumps(values: list[Any]) -> bytes:
    # orjson: a segment's text columns in a fifth of the stdlib's time (the writer holds the GIL meanwhile); the
    # stdlib for what orjson refuses (an int beyond 64 bits), which gives the same JSON values.
    try:
        return orjson.dumps(values, default=json_default, option=ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(values, separators=(",", ":"), default=json_default).encode()


def _time_us(texts: list[str | None]) -> np.ndarray:
    return np.array(texts, dtype="datetime64[us]").view("<i8")


_INT, _NUMBERS = {int}, {int, float, type(None)}


def _field_kind(values: Sequence[Any]) -> str:
    kinds = set(map(type, values))
    if kinds == _INT:
        return "i8"
    if kinds <= _NUMBERS and float in kinds:
        return "f8"
    return "json"


def encode_segment(rows: Sequence[tuple[Any, ...]], columns: Sequence[str], inputs: Sequence[Mapping[str, Any] | None],
                   feature_sets: Sequence[int | None], blobs: Sequence[bytes | None]) -> bytes:
    """One write batch as a columnar segment (format above).

    ``rows``: the predictions rows as written (``columns`` names their fields: the service's
    ``PREDICTION_COLUMNS``), ``inputs``: each row's raw input dict, ``feature_sets``/``blobs``: each row's binary
    feature columns (:func:`feature_blob`; None, None for a row without numeric features)."""
    n = len(rows)
    by_name = dict(zip(columns, zip(*rows, strict=True), strict=False)) if n else dict.fromkeys(columns, ())
    header: dict[str, list[Any]] = {}
    parts: list[bytes] = []
    offset = 0

    def put(name: str, kind: str, data: bytes, extra: Any = None) -> None:
        nonlocal offset
        header[name] = [kind, offset, len(data), extra]
        parts.append(data)
        offset += len(data)

    def put_values(name: str, kind: str, values: Sequence[Any]) -> None:
        if kind == "f8":  # None -> NaN
            put(name, kind, np.array(values, dtype="<f8").tobytes())
        elif kind == "i8":
            put(name, kind, np.array(values, dtype="<i8").tobytes())
        elif kind == "u1":
            put(name, kind, np.array(values, dtype="u1").tobytes())
        elif kind == "t":
            put(name, kind, _time_us(list(values)).tobytes())
        elif kind == "cat":
            index = {v: i for i, v in enumerate(dict.fromkeys(values))}
            codes = np.zeros(n, dtype="<i4") if len(index) == 1 else np.array(list(map(index.__getitem__, values)),
                                                                                  dtype="<i4")
            put(name, kind, codes.tobytes(), list(index))
        else:  # as the row's JSON text has them: NaN and infinities as null, times as iso()
            put(name, "json", _dumps([None if type(v) is float and not math.isfinite(v) else v for v in values]))

    for name in _SEGMENT_BASE:
        put_values(name, _BASE_KIND[name], by_name[name])
    texts = by_name["features"]
    if all(b is not None or t is None for b, t in zip(blobs, texts, strict=True)):
        put("features.set", "i4", np.array([-1 if s is None else s for s in feature_sets], dtype="<i4").tobytes())
        put("features.f64", "bytes", b"".join(b for b in blobs if b is not None))
    else:  # a value that is not a number: the rows' JSON texts
        put("features.json", "jsonl", ("[" + ",".join("null" if t is None else t for t in texts) + "]").encode())
    first = inputs[0] if n and inputs[0] else {}
    keys = first.keys()
    if all(d is not None and d.keys() == keys for d in inputs):  # the usual case: every request has the same fields
        fields: dict[str, list[Any]] = {k: list(map(itemgetter(k), inputs)) for k in keys}  # type: ignore[arg-type]
    else:
        fields = {k: [None if d is None else d.get(k) for d in inputs] for k in dict.fromkeys(
            k for d in inputs if d for k in d)}
    for field, values in fields.items():
        try:
            put_values(f"input.{field}", _field_kind(values), values)
        except OverflowError:  # an int beyond int64
            put_values(f"input.{field}", "json", values)
    head = json.dumps({"n": n, "columns": header}, separators=(",", ":")).encode()
    return b"".join([SEGMENT_MAGIC, struct.pack("<I", len(head)), head, *parts])


_DTYPES = {"f8": "<f8", "i8": "<i8", "u1": "u1", "t": "<i8", "cat": "<i4", "i4": "<i4"}


class Segment:
    """A decoded segment header over its bytes; :meth:`column` gives one column (a view, no copy, for arrays)."""

    __slots__ = ("columns", "data", "n", "start")

    def __init__(self, data: bytes) -> None:
        if data[:4] != SEGMENT_MAGIC:
            raise MonitorError("A prediction log segment does not start with its format mark.",
                               hint="The log was written by a newer Keel or is damaged.")
        (size,) = struct.unpack_from("<I", data, 4)
        head = json.loads(data[8:8 + size])
        self.data, self.start, self.n, self.columns = data, 8 + size, int(head["n"]), head["columns"]

    def kind(self, name: str) -> str | None:
        c = self.columns.get(name)
        return None if c is None else c[0]

    def column(self, name: str) -> Any:
        """``f8/i8/u1/t/cat/i4``: the array (``cat``: ``(codes, values)``); ``json``/``jsonl``: the decoded list;
        ``bytes``: a view of the raw bytes."""
        kind, offset, size, extra = self.columns[name]
        lo = self.start + offset
        if kind in _DTYPES:
            dtype = np.dtype(_DTYPES[kind])
            arr = np.frombuffer(self.data, dtype=dtype, count=size // dtype.itemsize, offset=lo)
            return (arr, extra) if kind == "cat" else arr
        if kind == "bytes":
            return memoryview(self.data)[lo:lo + size]
        return json.loads(self.data[lo:lo + size])


__all__ = [
    "FEATURE_COLUMNS",
    "FEATURE_DDL",
    "FEATURE_SETS_DDL",
    "LABEL_ROWS_FOR_LABEL",
    "LABEL_ROWS_FOR_PREDICTIONS",
    "Segment",
    "encode_segment",
    "ensure_feature_columns",
    "ensure_segment_tables",
    "feature_blob",
    "feature_set_id",
    "has_feature_columns",
    "has_segments",
    "iso",
    "read_feature_sets",
]
