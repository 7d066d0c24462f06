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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from keel.errors import MonitorError

if TYPE_CHECKING:  # pandas is imported where used: the log's writer process does without it
    import pandas as pd


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
    import pandas as pd

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
# Every label by event id (what readers match segment-only rows with; a NULL event id joins nothing).
LABELS_BY_EVENT_ID = "select event_id, label, at from labels where event_id is not null"
SEGMENT_MAGIC = b"KSG1"
_SEGMENT_BASE = ("request_id", "item", "time", "event_time", "event_id", "endpoint", "score", "decision",
                 "model_version", "fallback", "fallback_reason", "stale", "latency_ms")
_BASE_KIND = {"request_id": "json", "item": "i8", "time": "t", "event_time": "t", "event_id": "json",
              "endpoint": "cat", "score": "f8", "decision": "cat", "model_version": "cat", "fallback": "u1",
              "fallback_reason": "cat", "stale": "u1", "latency_ms": "f8"}


# A segment whose rows have no row in ``predictions`` (a column batch stored columnar only): ``segment_only`` 1, the
# min/max event time (``t_lo``/``t_hi``, int64 us over the rows that have one; NULL when none has), ``t_null`` 1
# when a row has no event time, and the min/max answer time (``a_lo``/``a_hi``): what readers bound a time range
# with instead of the predictions table's indexes. Segments of rows kept in ``predictions`` leave them NULL.
SEGMENT_ONLY_COLUMNS = ("segment_only", "t_lo", "t_hi", "t_null", "a_lo", "a_hi")
INSERT_SEGMENT_ONLY = ("insert into prediction_segments (seq0, n, data, segment_only, t_lo, t_hi, t_null, a_lo,"
                       " a_hi) values (?, ?, ?, 1, ?, ?, ?, ?, ?)")


def has_segment_only(conn: sqlite3.Connection) -> bool:
    """Whether the log's segments table has the columns of segment-only rows (:data:`SEGMENT_ONLY_COLUMNS`)."""
    cols = {r[1] for r in conn.execute("pragma table_info(prediction_segments)")}
    return set(SEGMENT_ONLY_COLUMNS) <= cols


def segment_only_bounds(event_us: np.ndarray, time_us: np.ndarray) -> tuple[int | None, int | None, int, int, int]:
    """``t_lo, t_hi, t_null, a_lo, a_hi`` of a segment-only batch from its event and answer times (int64 us, NAT:
    none)."""
    t = event_us[event_us != NAT]
    return (int(t.min()) if len(t) else None, int(t.max()) if len(t) else None, int(len(t) < len(event_us)),
            int(time_us.min()), int(time_us.max()))


def has_segments(conn: sqlite3.Connection) -> bool:
    """Whether the log has the segment and label-row tables (a log migrated by :func:`ensure_segment_tables`)."""
    names = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
    return {"prediction_segments", "label_rows"} <= names


def ensure_segment_tables(conn: sqlite3.Connection) -> None:
    """Create ``prediction_segments`` and ``label_rows`` (filled from the labels already there) when missing, and
    add the segment-only columns to an older segments table. Idempotent; call after the ``predictions`` and
    ``labels`` tables exist."""
    try:
        new = not has_segments(conn)
        conn.execute(SEGMENTS_DDL)
        conn.execute(LABEL_ROWS_DDL)
        conn.execute(LABELS_AT_DDL)
        cols = {r[1] for r in conn.execute("pragma table_info(prediction_segments)")}
        for column in SEGMENT_ONLY_COLUMNS:
            if column not in cols:
                try:
                    conn.execute(f"alter table prediction_segments add column {column} integer")
                except sqlite3.OperationalError as exc:  # another process added it in between
                    if "duplicate column" not in str(exc):
                        raise
        if new:
            conn.execute(LABEL_ROWS_FOR_PREDICTIONS, (0,))
    except sqlite3.Error as exc:
        raise MonitorError(f"Cannot add the segment tables to the prediction log: {exc}.") from exc


def json_default(v: Any) -> Any:
    """What the log's JSON text holds for a value JSON has no type for: times as :func:`iso`, the rest as text."""
    return iso(v) if isinstance(v, datetime) else str(v)  # (a pandas Timestamp is a datetime)


# orjson with the log's rules: times go through json_default (iso), numpy values and non-string keys as the stdlib.
ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

_ENCODE = json.JSONEncoder(default=json_default, separators=(",", ":")).encode


def row_json_slow(value: Any) -> str:
    """:func:`row_json` by the stdlib encoder (what it falls back to)."""
    if isinstance(value, Mapping):
        # JSON has no NaN: missing feature values (an empty window's mean) are stored as null.
        value = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in value.items()}
    return _ENCODE(value)


def row_json(value: Any) -> str:
    """A row's ``inputs``/``features`` text: compact JSON of the dict, non-finite floats as null, times as :func:`iso`.

    orjson writes it (a tenth of the stdlib encoder's cost, the largest part of a log row); values it refuses
    (an int beyond 64 bits) take the stdlib path, which gives the same JSON values. The writer stores this text
    and :func:`segment_rows` rebuilds it from a segment's values."""
    try:
        return orjson.dumps(value, default=json_default, option=ORJSON_OPTIONS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return row_json_slow(value)


def _dumps(values: list[Any]) -> bytes:
    # orjson: a segment's text columns in a fifth of the stdlib's time (the writer holds the GIL meanwhile); the
    # stdlib for what orjson refuses (an int beyond 64 bits), which gives the same JSON values.
    try:
        return orjson.dumps(values, default=json_default, option=ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(values, separators=(",", ":"), default=json_default).encode()


def _time_us(texts: list[str | None]) -> np.ndarray:
    return np.array(texts, dtype="datetime64[us]").view("<i8")


NAT = np.iinfo(np.int64).min  # a missing time in an int64 microseconds column (numpy's NaT)
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Where each digit of "YYYY-MM-DDTHH:MM:SS.ffffff" goes, which field (year, month, day, hour, minute, second,
# microsecond) it comes from and the power of ten it is.
_ISO_DIGITS = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25])
_ISO_FIELD = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 6, 6])
_ISO_DIVISOR = np.array([1000, 100, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1, 10, 1,
                         100_000, 10_000, 1000, 100, 10, 1], dtype="<i8")
_ISO_TEMPLATE = np.frombuffer(b"0000-00-00T00:00:00.000000", dtype="u1")


def iso_us(us: np.ndarray) -> list[str | None]:
    """:func:`iso` of int64 microseconds since 1970 (UTC), all at once: what :func:`iso` gives for each time
    (``NAT``: None), a few numpy operations instead of a Python call per value. Example::

        iso_us(np.array(["2018-04-01T07:00"], dtype="datetime64[us]").view("<i8"))  # ["2018-04-01T07:00:00.000000"]
    """
    us = np.asarray(us, dtype="<i8")
    n = len(us)
    if n <= 16:  # a few times: cheaper one by one than forty numpy calls
        return [None if v == NAT else iso(_EPOCH + v * _MICROSECOND) for v in us.tolist()]
    days, rem = np.divmod(us, 86_400_000_000)
    # The civil date of a day number (H. Hinnant's days-to-civil), in whole arrays.
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    seconds, micro = np.divmod(rem, 1_000_000)
    odd = (year < 1000) | (year > 9999)  # NaT and the years iso() writes another way
    fields = np.stack([np.where(odd, 2000, year), month, day, seconds // 3600, seconds // 60 % 60, seconds % 60,
                       micro], axis=1)
    out = np.empty((n, 26), dtype="u1")
    out[:] = _ISO_TEMPLATE
    out[:, _ISO_DIGITS] = fields[:, _ISO_FIELD] // _ISO_DIVISOR % 10 + 48
    texts: list[str | None] = out.view("S26").ravel().astype("U26").tolist()
    if odd.any():
        for i in np.flatnonzero(odd).tolist():
            v = int(us[i])
            texts[i] = None if v == NAT else iso(_EPOCH + v * _MICROSECOND)
    return texts


def datetimes_us(values: Sequence[Any]) -> np.ndarray:
    """Int64 microseconds since 1970 (UTC; naive times are UTC) of datetimes, pandas timestamps or None (``NAT``),
    as the times :func:`iso` writes (parsed back); other values through their :func:`iso` text."""
    out = np.empty(len(values), dtype="<i8")
    for i, v in enumerate(values):
        if type(v) is datetime:
            out[i] = (v - (_EPOCH if v.tzinfo is None else _EPOCH_UTC)) // _MICROSECOND
        elif v is None:
            out[i] = NAT
        else:
            out[i] = _time_us([iso(v)])[0]
    return out


_INT, _FLOATS = {int}, {float, type(None)}
_NONE = type(None)
_NONE_TYPES = {_NONE}


def _kind_of(kinds: set[type]) -> str:
    # Ints mixed with floats are kept as JSON, not float64: a row's text tells 5 from 5.0 (segment_rows rebuilds it).
    if kinds == _INT:
        return "i8"
    if kinds <= _FLOATS and float in kinds:
        return "f8"
    return "json"


class SegmentPart:
    """Consecutive rows of one segment held column by column (what :func:`encode_parts` joins into one segment).

    ``base``: each of the base columns by name (``_SEGMENT_BASE``): ``time``/``event_time`` as int64 microseconds
    (``NAT``: missing), ``item``/``fallback``/``stale``/``score``/``latency_ms`` as sequences or arrays of their
    values (None in ``score``: NaN), the text columns as lists; ``feature_sets``: int32 set ids (-1: none);
    ``blobs``: the rows' feature blobs end to end; ``numeric``: whether every row with feature text has a blob;
    ``feature_texts``: the rows' JSON feature texts (read only when some part is not ``numeric``); ``input_keys``:
    the raw input fields (order of first appearance), ``uniform``: whether every row has exactly those fields;
    ``inputs``: each field's values, a list, or a float64 array where NaN stands for None (how a column batch
    holds numbers; a value missing in a row is None); ``input_types``: the types of a field's values, when the
    caller knows them (saves a pass).
    """

    __slots__ = ("base", "blobs", "feature_sets", "feature_texts", "input_keys", "input_types", "inputs", "n",
                 "numeric", "uniform")

    def __init__(self, n: int, base: Mapping[str, Any], feature_sets: np.ndarray, blobs: bytes, numeric: bool,
                 feature_texts: Sequence[str | None], input_keys: Sequence[str], uniform: bool,
                 inputs: Mapping[str, Any], input_types: Mapping[str, set[type]] | None = None) -> None:
        self.input_types = dict(input_types or {})
        self.n, self.base, self.feature_sets, self.blobs, self.numeric = n, base, feature_sets, blobs, numeric
        self.feature_texts, self.input_keys, self.uniform, self.inputs = feature_texts, input_keys, uniform, inputs


def part_of_rows(rows: Sequence[tuple[Any, ...]], columns: Sequence[str],
                 inputs: Sequence[Mapping[str, Any] | None], feature_sets: Sequence[int | None],
                 blobs: Sequence[bytes | None]) -> SegmentPart:
    """The :class:`SegmentPart` of rows as written (arguments as :func:`encode_segment`)."""
    n = len(rows)
    by_name = dict(zip(columns, zip(*rows, strict=True), strict=False)) if n else dict.fromkeys(columns, ())
    base = {name: list(by_name[name]) for name in _SEGMENT_BASE}
    base["time"], base["event_time"] = _time_us(base["time"]), _time_us(base["event_time"])
    texts = by_name["features"]
    numeric = all(b is not None or t is None for b, t in zip(blobs, texts, strict=True))
    sets = np.array([-1 if s is None else s for s in feature_sets], dtype="<i4")
    keys, uniform, fields = input_fields(inputs)
    return SegmentPart(n, base, sets, b"".join(b for b in blobs if b is not None) if numeric else b"", numeric,
                       list(texts), keys, uniform, fields)


def input_fields(inputs: Sequence[Mapping[str, Any] | None]) -> tuple[list[str], bool, dict[str, list[Any]]]:
    """Rows' raw input dicts as columns: the fields (order of first appearance), whether every row has exactly
    those, and each field's values (None where a row lacks it)."""
    first = inputs[0] if inputs and inputs[0] else {}
    keys = first.keys()
    if all(d is not None and d.keys() == keys for d in inputs):  # the usual case: every request has the same fields
        return list(keys), True, {k: list(map(itemgetter(k), inputs)) for k in keys}  # type: ignore[arg-type]
    fields = {k: [None if d is None else d.get(k) for d in inputs] for k in dict.fromkeys(
        k for d in inputs if d for k in d)}
    return list(fields), False, fields


def _types(values: Any, part: SegmentPart | None = None, field: str = "") -> set[type]:
    if part is not None:
        known = part.input_types.get(field)
        if known is None:
            known = part.input_types[field] = _types(values)
        return known
    if isinstance(values, np.ndarray):  # float64, NaN for None
        nan = np.isnan(values)
        return ({_NONE} if nan.any() else set()) | ({float} if not nan.all() else set())
    return set(map(type, values))


def _as_list(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray):
        out = values.tolist()
        if np.isnan(values).any():
            out = [None if v != v else v for v in out]
        return out
    return list(values)


def _nothing() -> None:
    return None


def _numbers(columns: Sequence[Any], dtype: str) -> np.ndarray:
    """Parts' values (lists or arrays; None in a list: NaN) as one array: lists side by side in one conversion."""
    arrays: list[np.ndarray] = []
    pending: list[Any] = []
    for c in columns:
        if isinstance(c, np.ndarray):
            if pending:
                arrays.append(np.array(pending, dtype=dtype))
                pending = []
            arrays.append(c.astype(dtype, copy=False))
        else:
            pending.extend(c)
    if pending or not arrays:
        arrays.append(np.array(pending, dtype=dtype))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _json_values(values: list[Any]) -> bytes:
    # as the row's JSON text has them: NaN and infinities as null, times as iso()
    if float in set(map(type, values)):
        values = [None if type(v) is float and not math.isfinite(v) else v for v in values]
    return _dumps(values)


def _cat(parts: Sequence[Sequence[Any]]) -> tuple[np.ndarray, list[Any]]:
    index: dict[Any, int] = {}
    codes = []
    for values in parts:
        if not len(values):
            continue
        first = values[0]
        if values.count(first) == len(values):  # one value (endpoint, model version, no fallback): no lookups
            code = index.setdefault(first, len(index))
            codes.append(np.full(len(values), code, dtype="<i4"))
        else:
            for v in dict.fromkeys(values):
                index.setdefault(v, len(index))
            codes.append(np.array(list(map(index.__getitem__, values)), dtype="<i4"))
    if len(index) == 1:  # as encode_segment always wrote it
        return np.zeros(sum(map(len, parts)), dtype="<i4"), list(index)
    return (np.concatenate(codes) if codes else np.zeros(0, dtype="<i4")), list(index)


def encode_parts(parts: Sequence[SegmentPart], pause: Callable[[], Any] | None = None) -> bytes:
    """Consecutive parts as one columnar segment (format above): the bytes :func:`encode_segment` gives for all
    their rows at once, from columns (a few numpy calls per column, no Python work per row for the usual ones).
    ``pause`` is called between columns (a writer thread lets others have the GIL there)."""
    n = sum(p.n for p in parts)
    pause = pause or _nothing
    header: dict[str, list[Any]] = {}
    chunks: list[bytes] = []
    offset = 0

    def put(name: str, kind: str, data: bytes, extra: Any = None) -> None:
        nonlocal offset
        header[name] = [kind, offset, len(data), extra]
        chunks.append(data)
        offset += len(data)

    def joined(name: str) -> list[Any]:
        if len(parts) == 1:
            return _as_list(parts[0].base[name])
        values: list[Any] = []
        for p in parts:
            values.extend(p.base[name])
        return values

    for name in _SEGMENT_BASE:
        pause()
        kind = _BASE_KIND[name]
        if kind in ("f8", "i8", "u1", "t"):
            put(name, kind, _numbers([p.base[name] for p in parts], _DTYPES[kind]).tobytes())
        elif kind == "cat":
            codes, values = _cat([p.base[name] for p in parts])
            put(name, kind, codes.tobytes(), values)
        else:
            put(name, "json", _json_values(joined(name)))
    if all(p.numeric for p in parts):
        sets = [p.feature_sets for p in parts]
        put("features.set", "i4", (np.concatenate(sets) if sets else np.zeros(0, dtype="<i4")).astype("<i4").tobytes())
        blobs = [p.blobs for p in parts]  # into the segment's join, not joined twice
        header["features.f64"] = ["bytes", offset, sum(map(len, blobs)), None]
        chunks.extend(blobs)
        offset += header["features.f64"][2]
    else:  # a value that is not a number: the rows' JSON texts
        texts = [t for p in parts for t in p.feature_texts]
        put("features.json", "jsonl", ("[" + ",".join("null" if t is None else t for t in texts) + "]").encode())
    live = [p for p in parts if p.n]
    keys = list(live[0].input_keys) if live else []
    if all(p.uniform and set(p.input_keys) == set(keys) for p in live):
        fields = keys
    else:
        fields = list(dict.fromkeys(k for p in live for k in p.input_keys))
    for field in fields:
        pause()
        columns = [p.inputs[field] if field in p.inputs else [None] * p.n for p in live]
        kinds: set[type] = set().union(*(_types(c, p, field) if field in p.inputs else _NONE_TYPES
                                         for c, p in zip(columns, live, strict=True)))
        kind = _kind_of(kinds)
        name = f"input.{field}"
        if kind == "f8":
            put(name, kind, _numbers(columns, "<f8").tobytes())
            continue
        if len(columns) == 1 and isinstance(columns[0], list):
            values = columns[0]
        else:
            values = []
            for c in columns:
                values.extend(_as_list(c) if isinstance(c, np.ndarray) else c)
        if kind == "i8":
            try:
                put(name, kind, np.array(values, dtype="<i8").tobytes())
                continue
            except OverflowError:  # an int beyond int64
                pass
        put(name, "json", _json_values(values))
    head = json.dumps({"n": n, "columns": header}, separators=(",", ":")).encode()
    return b"".join([SEGMENT_MAGIC, struct.pack("<I", len(head)), head, *chunks])


def encode_segment(rows: Sequence[tuple[Any, ...]], columns: Sequence[str], inputs: Sequence[Mapping[str, Any] | None],
                   feature_sets: Sequence[int | None], blobs: Sequence[bytes | None]) -> bytes:
    """One write batch as a columnar segment (format above).

    ``rows``: the predictions rows as written (``columns`` names their fields: the service's
    ``PREDICTION_COLUMNS``), ``inputs``: each row's raw input dict, ``feature_sets``/``blobs``: each row's binary
    feature columns (:func:`feature_blob`; None, None for a row without numeric features)."""
    return encode_parts([part_of_rows(rows, columns, inputs, feature_sets, blobs)])


_DTYPES = {"f8": "<f8", "i8": "<i8", "u1": "u1", "t": "<i8", "cat": "<i4", "i4": "<i4"}


class Segment:
    """A decoded segment header over its bytes; :meth:`column` gives one column (a view, no copy, for arrays)."""

    __slots__ = ("columns", "data", "n", "start")

    def __init__(self, data: bytes | bytearray) -> None:
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
        return json.loads(self.data[lo:lo + size])  # (not orjson: it reads an int beyond 64 bits as a float)


def read_segment_columns(db: sqlite3.Connection, seq0: int, names: Sequence[str]) -> Segment:
    """The segment at ``seq0`` with only these columns' bytes read (SQLite's incremental blob I/O: a reader that
    needs two columns of a segment does not read it whole); its other columns must not be asked for."""
    with db.blobopen("prediction_segments", "data", seq0, readonly=True) as blob:
        head = blob.read(8)
        if head[:4] != SEGMENT_MAGIC:
            raise MonitorError("A prediction log segment does not start with its format mark.",
                               hint="The log was written by a newer Keel or is damaged.")
        (size,) = struct.unpack_from("<I", head, 4)
        data = bytearray(len(blob))
        data[:8 + size] = head + blob.read(size)
        seg = Segment(data)
        for name in names:
            if name in seg.columns:
                _, offset, length, _ = seg.columns[name]
                blob.seek(seg.start + offset)
                data[seg.start + offset:seg.start + offset + length] = blob.read(length)
    return seg


def _finite_or_none(values: np.ndarray) -> list[Any]:
    out = values.tolist()
    if not np.isfinite(values).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _cat_values(seg: Segment, name: str, pick: Any) -> list[Any]:
    codes, values = seg.column(name)
    if len(values) <= 1:
        return [values[0] if values else None] * (seg.n if pick is None else len(pick))
    return [values[c] for c in (codes if pick is None else codes[pick]).tolist()]


_PLAIN = (str, int, bool, type(None))


def _plain(values: list[Any]) -> bool:
    """Whether ``json.loads(row_json(v)) == v`` for each value alone: strings, ints, bools, None, finite floats
    (not a container, whose nested non-finite floats the texts turn into null)."""
    return all(isinstance(v, _PLAIN) or (type(v) is float and math.isfinite(v)) for v in values)


def segment_rows(seg: Segment, feature_sets: Mapping[int, Sequence[str]], *, rows: Sequence[int] | None = None,
                 input_dicts: bool = False, feature_dicts: bool = False) -> list[tuple[Any, ...]]:
    """The rows a segment stands for, as the writer inserts them into ``predictions`` (without ``seq``): the
    service's ``PREDICTION_COLUMNS`` (``request_id, item, time, event_time, event_id, endpoint, inputs, features,
    score, decision, model_version, fallback, fallback_reason, stale, latency_ms``) then ``features_f64`` and
    ``feature_set``, the same values and types, the texts byte for byte (:func:`row_json`, :func:`iso_us`).

    Exact for the rows of a column batch (every row has every input field, ints and floats of one field apart):
    what the writer may store as a segment alone. A row lacking an input field that others have gets it as null.
    ``feature_sets``: the log's ``{id: names}`` (:func:`read_feature_sets`). ``rows``: only these rows (indexes
    into the segment, in that order). ``input_dicts``/``feature_dicts``: the ``inputs``/``features`` column holds
    what ``json.loads`` gives of the text (a dict; features None where the text is NULL) instead of the text,
    built from the values without writing and parsing it (what a reader that parses the text wants).
    Example::

        rows = segment_rows(Segment(data), read_feature_sets(db))   # rows[0][6]: the first row's inputs text
    """
    pick = None if rows is None else np.asarray(rows, dtype=np.intp)
    m = seg.n if pick is None else len(pick)

    def take(values: Any) -> Any:
        if pick is None:
            return values
        return values[pick] if isinstance(values, np.ndarray) else [values[i] for i in pick.tolist()]

    request_ids = take(seg.column("request_id"))
    items = take(seg.column("item")).tolist()
    times = iso_us(take(seg.column("time")))
    event_times = iso_us(take(seg.column("event_time")))
    event_ids = take(seg.column("event_id"))
    endpoints = _cat_values(seg, "endpoint", pick)
    scores = _finite_or_none(take(seg.column("score")))
    decisions = _cat_values(seg, "decision", pick)
    versions = _cat_values(seg, "model_version", pick)
    fallback = take(seg.column("fallback")).tolist()
    reasons = _cat_values(seg, "fallback_reason", pick)
    stale = take(seg.column("stale")).tolist()
    latency = take(seg.column("latency_ms")).tolist()
    fields = [name[6:] for name in seg.columns if name.startswith("input.")]
    values = []
    plain = True
    for field in fields:
        kind = seg.kind(f"input.{field}")
        column = take(seg.column(f"input.{field}"))
        if kind == "f8":
            values.append(_finite_or_none(column))
        elif kind == "i8":
            values.append(column.tolist())
        else:
            values.append(column)
            plain = plain and input_dicts and _plain(column)
    if not fields:
        inputs: list[Any] = [{} for _ in range(m)] if input_dicts else ["{}"] * m
    elif input_dicts and plain:  # the values are what parsing the text gives
        inputs = [dict(zip(fields, row, strict=True)) for row in zip(*values, strict=True)]
    else:
        inputs = [row_json(dict(zip(fields, row, strict=True))) for row in zip(*values, strict=True)]
        if input_dicts:
            inputs = [json.loads(t) for t in inputs]
    blobs: list[bytes | None] = [None] * m
    sets: list[int | None] = [None] * m
    texts: list[Any] = [None] * m
    if seg.kind("features.set"):
        ids = seg.column("features.set")
        width = np.zeros(len(ids), dtype=np.int64)  # float64 values of each row in features.f64
        for fs in np.unique(ids[ids >= 0]).tolist():
            width[ids == fs] = len(feature_sets[fs])
        starts, chosen = take(np.cumsum(width) - width), take(ids)
        values_f8 = np.frombuffer(seg.column("features.f64"), dtype="<f8")
        for fs in np.unique(chosen[chosen >= 0]).tolist():  # the rows of each feature set as one matrix
            names = feature_sets[fs]
            k = len(names)
            where = np.flatnonzero(chosen == fs)
            matrix = values_f8[starts[where][:, None] + np.arange(k)]
            raw, size = matrix.tobytes(), 8 * k
            lists = matrix.tolist()
            for j in np.flatnonzero(~np.isfinite(matrix).all(axis=1)).tolist():  # JSON's null
                lists[j] = [v if math.isfinite(v) else None for v in lists[j]]
            for a, (j, row) in enumerate(zip(where.tolist(), lists, strict=True)):
                blobs[j], sets[j] = raw[a * size:(a + 1) * size], fs
                d = dict(zip(names, row, strict=True))
                texts[j] = d if feature_dicts else row_json(d)
    else:
        for j, d in enumerate(take(seg.column("features.json"))):
            if d is not None:
                texts[j] = json.loads(row_json(d)) if feature_dicts else row_json(d)
    return list(zip(request_ids, items, times, event_times, event_ids, endpoints, inputs, texts, scores, decisions,
                    versions, fallback, reasons, stale, latency, blobs, sets, strict=True))


__all__ = [
    "FEATURE_COLUMNS",
    "FEATURE_DDL",
    "FEATURE_SETS_DDL",
    "INSERT_SEGMENT_ONLY",
    "LABELS_BY_EVENT_ID",
    "LABEL_ROWS_FOR_LABEL",
    "LABEL_ROWS_FOR_PREDICTIONS",
    "NAT",
    "SEGMENT_ONLY_COLUMNS",
    "Segment",
    "SegmentPart",
    "datetimes_us",
    "encode_parts",
    "encode_segment",
    "ensure_feature_columns",
    "ensure_segment_tables",
    "feature_blob",
    "feature_set_id",
    "has_feature_columns",
    "has_segment_only",
    "has_segments",
    "input_fields",
    "iso",
    "iso_us",
    "part_of_rows",
    "read_feature_sets",
    "read_segment_columns",
    "row_json",
    "row_json_slow",
    "segment_only_bounds",
    "segment_rows",
]
