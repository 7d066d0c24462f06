"""Reading the prediction log fast and in bounded memory: what monitoring scans, a batch of rows at a time.

The service also writes its rows as columnar segments (:mod:`keel.logformat`: typed arrays per column, one
segment per few thousand rows) and keeps ``label_rows`` (labels keyed by ``seq``): rows a segment covers are read
from it with ``np.frombuffer``, no text at all, and their labels by a range of ``seq``. What follows is how the
rows no segment covers (older logs, the newest rows of a running service) are read.

The log stores each row's features as one JSON text (``{"tx_amount":76.65,"tx_during_night":1.0,...}``). Decoding
a million of them row by row (Python ``json.loads``, or SQLite's ``json_extract`` once per feature) is what made
monitoring slow. Here SQLite does no JSON parsing on the common path: for a range of ``seq`` it concatenates, in
C, one CSV line per row, with the base columns (reals printed with 17 significant digits, so they round-trip
exactly) and the feature text stripped of its braces and with ``:`` turned into ``,``, i.e.
``"tx_amount",76.65,"tx_during_night",1.0``. Arrow's CSV reader then parses the numbers of the whole batch at
once, by position. The positions are trusted only when they are right:

* SQLite marks the rows whose text has exactly the expected keys in the expected order (a ``GLOB`` pattern) —
  the others (no features, another model's features) are decoded one by one from their JSON;
* the batch's feature text holds exactly two quotes per key per row (so no value is a string, whose content
  ``:`` -> ``,`` could alter) and every row has the same number of fields (Arrow checks);

otherwise the whole batch is decoded the slow, general way (``json_extract`` per field). Either way the frame is
the same. A background thread runs the next batch's query while this one is parsed (SQLite releases the GIL
during the query), and at most two batches wait, so memory is a few batches whatever the size of the log.

Example::

    for frame in read_log(".keel/predictions.sqlite", features=["tx_amount"], end=as_of):
        frame["event_time"], frame["score"], frame["tx_amount"]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from keel.errors import MonitorError
from keel.logformat import (
    LABELS_BY_EVENT_ID,
    Segment,
    has_feature_columns,
    has_segment_only,
    has_segments,
    iso,
    iso_us,
    read_feature_sets,
)

# Base columns monitoring reads, and how one printf() per row prints each into the batch's CSV: reals with 17
# significant digits (they round-trip exactly) and a null flag (printf prints NULL as 0), texts SQL-quoted
# ('it''s', NULL unquoted), which is CSV with ' as the quote character. One printf is several times cheaper
# than concatenating a dozen expressions with ||.
_REAL, _TEXT = "%!.17g,%d", "%Q"
BASE_COLUMNS: dict[str, tuple[str, tuple[str, ...], pa.DataType]] = {
    "seq": ("%d", ("p.seq",), pa.int64()),
    "event_time": ("%s", ("ifnull(p.event_time, '')",), pa.timestamp("ns")),
    "time": ("%s", ("p.time",), pa.timestamp("ns")),
    "score": (_REAL, ("p.score", "p.score is null"), pa.float64()),
    "latency_ms": (_REAL, ("p.latency_ms", "p.latency_ms is null"), pa.float64()),
    "fallback": ("%d", ("p.fallback",), pa.int8()),
    "stale": ("%d", ("p.stale",), pa.int8()),
    "decision": (_TEXT, ("p.decision",), pa.string()),
    "fallback_reason": (_TEXT, ("p.fallback_reason",), pa.string()),
    "event_id": (_TEXT, ("p.event_id",), pa.string()),
    "model_version": (_TEXT, ("p.model_version",), pa.string()),
    "request_id": (_TEXT, ("p.request_id",), pa.string()),
}
LABEL_COLUMNS = {"label": (_REAL, ("l.label", "l.label is null"), pa.float64()),
                 "at": ("%s", ("ifnull(l.at, '')",), pa.timestamp("ns"))}
# Rows whose features are in the binary column (logformat): their feature set id (-1: none), with the base columns.
_HAS_BLOB = "(p.features_f64 is not null and p.feature_set is not null)"
_SET_COLUMN = ("%d", ("case when " + _HAS_BLOB + " then p.feature_set else -1 end",), pa.int64())
MONITOR_COLUMNS = ("seq", "event_time", "score", "decision", "fallback", "fallback_reason", "stale", "latency_ms")


def _json_key(name: str) -> str:
    return json.dumps(name)  # how the service's json.dumps writes the key


def _glob_literal(text: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", text)


def _json_path(name: str) -> str:
    return '$."' + name.replace('"', '\\"') + '"'


def features_pattern(features: Sequence[str]) -> str:
    """GLOB matching a feature text with exactly these keys first-to-last in this order (extra keys are caught
    by the field count)."""
    return "{" + ",".join(_glob_literal(_json_key(f)) + ":*" for f in features) + "}"


@dataclass
class _Batch:
    lo: int
    hi: int
    rows: int
    irregular: int
    base: bytes
    feats: bytes | None
    inputs: bytes | None
    blobs: bytes | None = None
    labelled_inputs: bytes | None = None


@dataclass
class _SegmentBatch:
    """Consecutive segments covering ``lo <= seq < hi`` as fetched (decoded by the consumer), and their label rows."""

    lo: int
    hi: int
    segments: list[tuple[int, int, bytes]]
    labels: tuple[np.ndarray, np.ndarray, np.ndarray]  # seq, label, at_us of the rows with a label (any order)

    @property
    def rows(self) -> int:
        return sum(n for _, n, _ in self.segments)


class _Query:
    """The SQL of one reader: the rows ``lo <= seq < hi`` (and in the time range) as CSV blobs, in one query."""

    def __init__(self, path: Path, features: Sequence[str], inputs: Sequence[str], columns: Sequence[str],
                 labels: bool, start: str | None, end: str | None, *, blobs: bool = False,
                 sets: dict[int, list[str]] | None = None, labelled_inputs: Sequence[str] = ()) -> None:
        self.path, self.features, self.inputs = path, list(features), list(inputs)
        self.labelled_inputs = list(labelled_inputs) if labels else []
        self.labels, self.start, self.end = labels, start, end
        self.segment_only = False  # whether the log has segment-only rows' columns (set by read_log)
        self._label_index: _LabelIndex | None = None  # the labels by event id, read once (segment-only rows)
        self._label_lock = threading.Lock()
        self.blobs = blobs and bool(self.features)
        self.sets = dict(sets or {})
        self.columns = [*columns, *(LABEL_COLUMNS if labels else ()), *(["feature_set"] if self.blobs else [])]
        exprs = {**BASE_COLUMNS, **LABEL_COLUMNS, "feature_set": _SET_COLUMN}
        # CSV fields: a column's value, and after each real its null flag (``<name>.null``).
        self.fields = [f for c in self.columns for f in ([c, f"{c}.null"] if exprs[c][0] == _REAL else [c])]
        self.types = {c: exprs[c][2] for c in self.columns} | {f: pa.int8() for f in self.fields if f.endswith(".null")}
        base = ("printf('" + ",".join(exprs[c][0] for c in self.columns) + "', "
                + ", ".join(a for c in self.columns for a in exprs[c][1]) + ")")
        where = ["p.seq >= :lo", "p.seq < :hi"]
        self.params: dict[str, Any] = {}
        if start is not None:
            where.append("p.event_time >= :start")
            self.params["start"] = start
        if end is not None:
            where.append("p.event_time < :end")
            self.params["end"] = end
        self.where = " and ".join(where)
        join = " left join labels l on l.event_id = p.event_id" if labels else ""
        k = len(self.features)
        has = _HAS_BLOB if self.blobs else "0"
        if k:
            self.params["fill"] = "{" + "," * (2 * k - 1) + "}"
            self.params["pattern"] = features_pattern(self.features)
            ok = f"case when {has} then 1 else coalesce(p.features glob :pattern, 0) end"
            # Rows with a blob print no feature text at all (group_concat skips NULLs): nothing to parse.
            feat = "case when h then null when ok then f else :fill end"
        else:
            ok, feat = "1", "''"
        blob = f"case when {has} then p.features_f64 end" if self.blobs else "null"
        self.not_blob = f" and not {_HAS_BLOB}" if self.blobs else ""
        # json_extract with two or more paths returns a JSON array of the values, from one parse per row.
        inp = self._extract("in", self.inputs) if self.inputs else "''"
        # Fields only labelled rows need (the Card Precision@k entity): parsed for those rows only (group_concat
        # skips the NULLs of the others).
        linp = (f"case when l.label is not null then {self._extract('li', self.labelled_inputs)} end"
                if self.labelled_inputs else "null")
        self.sql = ("select count(*), sum(ok = 0), cast(group_concat(b, char(10)) as blob),"
                    f" cast(group_concat({feat}, char(10)) as blob), cast(group_concat(i, char(10)) as blob),"
                    f" cast(group_concat(fb, '') as blob), cast(group_concat(li, char(10)) as blob)"
                    f" from (select {base} as b, p.features as f, {has} as h, {ok} as ok, {inp} as i, {blob} as fb,"
                    f" {linp} as li"
                    f" from predictions p{join} where {self.where})")

    def _extract(self, prefix: str, names: Sequence[str]) -> str:
        """SQL giving the fields as the tail of a JSON array (``76.65,944]``): one parse of the row's inputs."""
        # json_extract with two or more paths returns a JSON array of the values, from one parse per row.
        paths = [*names, *names[:1]] if len(names) == 1 else list(names)
        for i, c in enumerate(paths):
            self.params[f"{prefix}{i}"] = _json_path(c)
        return ("substr(json_extract(ifnull(p.inputs, '{}'), " + ", ".join(f":{prefix}{i}" for i in range(len(paths)))
                + "), 2)")

    def run(self, db: sqlite3.Connection, lo: int, hi: int) -> _Batch:
        try:
            n, irregular, base, feats, inputs, blobs, linputs = db.execute(
                self.sql, {**self.params, "lo": lo, "hi": hi}).fetchone()
        except sqlite3.Error as exc:
            raise MonitorError(f"Cannot read the prediction log {self.path}: {exc}.") from exc
        return _Batch(lo, hi, int(n), int(irregular or 0), base or b"", feats, inputs, blobs, linputs)

    def fetch(self, db: sqlite3.Connection, task: tuple[Any, ...]) -> _Batch | _SegmentBatch:
        """One planned task: a range of rows (``"rows"``) or of consecutive segments (``"segments"``)."""
        kind, lo, hi = task[:3]
        if kind == "rows":
            return self.run(db, lo, hi)
        only = "segment_only" if self.segment_only else "null"
        try:
            wanted = set(task[3])
            found = [r for r in db.execute(f"select seq0, n, data, {only} from prediction_segments where seq0 >= ?"
                                           " and seq0 < ? order by seq0", (lo, hi)) if r[0] in wanted]
            labels = _label_arrays(db.execute("select seq, label, at_us from label_rows where seq >= ? and seq < ?"
                                              " order by seq", (lo, hi)).fetchall() if self.labels else [])
            if self.labels and any(r[3] == 1 for r in found):  # (label seqs need no order: _segment_frame)
                got = self.label_index(db).match([r[:3] for r in found if r[3] == 1])
                labels = tuple(np.concatenate([a, b]) for a, b in zip(labels, got, strict=True))
        except sqlite3.Error as exc:
            raise MonitorError(f"Cannot read the prediction log {self.path}: {exc}.") from exc
        return _SegmentBatch(lo, hi, [r[:3] for r in found], labels)

    def label_index(self, db: sqlite3.Connection) -> _LabelIndex:
        """The log's labels by event id, read at the first segment-only batch (prefetch threads share it)."""
        with self._label_lock:
            if self._label_index is None:
                self._label_index = _LabelIndex(db)
            return self._label_index

    def set_names(self, ids: Sequence[int]) -> dict[int, list[str]]:
        """Names of these feature sets (re-read when the service registered a new one since the reader opened)."""
        if any(i not in self.sets for i in ids):
            with contextlib.closing(_connect(self.path)) as db:
                self.sets = read_feature_sets(db)
        missing = [i for i in ids if i not in self.sets]
        if missing:
            raise MonitorError(f"The prediction log {self.path} has rows of feature sets {missing} that its "
                               "feature_sets table does not name.",
                               hint="The log was edited by hand or is damaged; restore feature_sets.")
        return {i: self.sets[i] for i in ids}

    def slow(self, lo: int, hi: int, source: str, names: Sequence[str], *, irregular_only: bool = False,
             text_rows: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``seq`` and the named fields of ``source`` (features or inputs) decoded per row by SQLite (for features,
        ``text_rows``: only the rows without a feature blob)."""
        params: dict[str, Any] = {**self.params, "lo": lo, "hi": hi}
        params.update({f"f{i}": _json_path(c) for i, c in enumerate(names)})
        sel = ", ".join(f"json_extract(p.{source}, :f{i})" for i in range(len(names)))
        where = self.where + (self.not_blob if source == "features" and text_rows else "")
        where += " and coalesce(p.features glob :pattern, 0) = 0" if irregular_only else ""
        with contextlib.closing(_connect(self.path)) as db:
            try:
                rows = db.execute(f"select p.seq, {sel} from predictions p where {where} order by p.seq",
                                  params).fetchall()
            except sqlite3.Error as exc:
                raise MonitorError(f"Cannot read the prediction log {self.path}: {exc}.") from exc
        seqs = np.array([r[0] for r in rows], dtype=np.int64)
        return seqs, {c: _convert([r[i + 1] for r in rows]) for i, c in enumerate(names)}


def _csv(blob: bytes, names: list[str], types: dict[str, pa.DataType], *, include: list[str] | None = None,
         nullable_quoted: bool = True, sql_quoted: bool = False) -> pa.Table:
    """Parse CSV text; ``sql_quoted``: texts quoted by printf's %Q (``'it''s'``, ``NULL`` unquoted for null)."""
    convert = (pacsv.ConvertOptions(column_types=types, include_columns=include or names, null_values=["NULL", ""],
                                    strings_can_be_null=True, quoted_strings_can_be_null=False) if sql_quoted
               else pacsv.ConvertOptions(column_types=types, include_columns=include or names,
                                         strings_can_be_null=True, quoted_strings_can_be_null=nullable_quoted))
    return pacsv.read_csv(
        io.BytesIO(blob),
        read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(quote_char="'") if sql_quoted else None,
        convert_options=convert,
    )


def _convert(values: list[Any]) -> np.ndarray:
    """A column decoded from JSON: float64 when every present value is a number, else the values as objects."""
    s = pd.Series(values, dtype=object)
    num = pd.to_numeric(s.map(lambda v: int(v) if isinstance(v, bool) else v), errors="coerce")
    if num.notna().sum() == s.notna().sum():
        return num.to_numpy(dtype=np.float64)
    return s.to_numpy()


def _as_objects(values: np.ndarray) -> np.ndarray:
    """Floats as objects, NaN as None (how an object column spells missing)."""
    out = values.astype(object)
    out[np.isnan(values)] = None
    return out


def _place(n: int, pos: np.ndarray, values: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
    if into is None:
        into = np.full(n, np.nan) if values.dtype == np.float64 else np.full(n, None, dtype=object)
    elif values.dtype != np.float64 and into.dtype == np.float64:
        into = _as_objects(into)
    into[pos] = values
    return into


_TO_CSV = bytes.maketrans(b":", b",")


def _features(q: _Query, b: _Batch, seqs: np.ndarray, sets: np.ndarray | None) -> dict[str, np.ndarray]:
    """The batch's feature columns: from the blobs of the rows that have one, from the JSON text of the others."""
    if sets is None:
        return _text_features(q, b, seqs)
    has = sets >= 0
    n, nb = len(seqs), int(has.sum())
    blob = _blob_features(q, b, sets[has]) if nb else None
    if blob is None and nb:  # blobs of the wrong length: decode every row's JSON instead
        got, cols = q.slow(b.lo, b.hi, "features", q.features, text_rows=False)
        return {f: _place(n, np.searchsorted(seqs, got), v) for f, v in cols.items()}
    if nb == n:
        assert blob is not None
        return blob
    text = _text_features(q, b, seqs[~has])
    if not nb:
        return text
    assert blob is not None
    pos_text, pos_blob = np.flatnonzero(~has), np.flatnonzero(has)
    return {f: _place(n, pos_text, text[f], _place(n, pos_blob, blob[f])) for f in q.features}


def _blob_features(q: _Query, b: _Batch, sets: np.ndarray) -> dict[str, np.ndarray] | None:
    """Columns of the rows with a blob (``sets``: their feature set ids, in row order); None when the blobs' total
    length is not what their feature sets imply."""
    values = np.frombuffer(b.blobs or b"", dtype="<f8") if len(b.blobs or b"") % 8 == 0 else None
    ids = np.unique(sets)
    names = q.set_names(ids.tolist())
    width = {i: len(names[i]) for i in ids.tolist()}
    m = len(sets)
    if len(ids) == 1:
        w = width[int(ids[0])]
        if values is None or len(values) != m * w:
            return None
        matrix = values.reshape(m, w)
        cols = {}
        where = {c: j for j, c in enumerate(names[int(ids[0])])}
        for f in q.features:
            cols[f] = matrix[:, where[f]] if f in where else np.full(m, np.nan)
    else:  # several feature sets in one batch (the model changed): rows of different widths
        lengths = np.array([width[i] for i in ids.tolist()])[np.searchsorted(ids, sets)]
        if values is None or int(lengths.sum()) != len(values):
            return None
        starts = np.cumsum(lengths) - lengths
        cols = {f: np.full(m, np.nan) for f in q.features}
        for i in ids.tolist():
            rows = np.flatnonzero(sets == i)
            for j, c in enumerate(names[i]):
                if c in cols:
                    cols[c][rows] = values[starts[rows] + j]
    # The JSON text stores NaN and infinities as null: the same missing value here.
    out = {}
    for f, v in cols.items():
        v = np.ascontiguousarray(v)
        bad = ~np.isfinite(v)
        if bad.any() and not np.isnan(v[bad]).all():
            v = np.where(bad, np.nan, v)
        out[f] = v
    return out


def _text_features(q: _Query, b: _Batch, seqs: np.ndarray) -> dict[str, np.ndarray]:
    """Feature columns of the rows without a blob (``seqs``), from the batch's CSV text or per row."""
    k, n = len(q.features), len(seqs)
    assert b.feats is not None or n == 0
    if n == 0:
        return {f: np.zeros(0) for f in q.features}
    assert b.feats is not None
    regular = n - b.irregular
    table = None
    # Positions are trusted only without strings (two quotes per key per row) and escapes in the text.
    if b.feats.count(b'"') == 2 * k * regular and b.feats.count(b"\\") == 0:
        names = [f"c{i}" for i in range(2 * k)]
        with contextlib.suppress(pa.ArrowInvalid):
            # Braces out, `:` -> `,`: `"tx_amount",76.65,"tx_during_night",1.0` (bytes.translate is C-fast).
            table = _csv(b.feats.translate(_TO_CSV, b"{}"), names, {c: pa.float64() for c in names[1::2]}, include=names[1::2])
    if table is None or table.num_rows != n:
        got, cols = q.slow(b.lo, b.hi, "features", q.features)
        return {f: _place(n, np.searchsorted(seqs, got), v) for f, v in cols.items()}
    out = {f: table.column(i).to_numpy() for i, f in enumerate(q.features)}
    if b.irregular:
        got, cols = q.slow(b.lo, b.hi, "features", q.features, irregular_only=True)
        pos = np.searchsorted(seqs, got)
        out = {f: _place(n, pos, cols[f], np.array(v, dtype=np.float64)) for f, v in out.items()}
    return out


def _inputs(q: _Query, b: _Batch, seqs: np.ndarray, fields: Sequence[str], blob: bytes | None,
            rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Raw input fields: the tails of the JSON arrays SQLite built (``76.65,944]``), or per row when unusual.

    ``rows``: the positions the text holds fields for (all rows when None); the others get None/NaN."""
    n = len(seqs)
    m = n if rows is None else len(rows)
    text = blob or b""
    if m == 0:
        return {c: np.full(n, None, dtype=object) for c in fields}
    if not any(ch in text for ch in (b"\\", b"[", b"{")):
        names = [f"c{i}" for i in range(max(2, len(fields)))]
        with contextlib.suppress(pa.ArrowInvalid):
            table = _csv(text.translate(None, b"]"), names, dict.fromkeys(names, pa.string()), nullable_quoted=False)
            if table.num_rows == m:
                cols = {c: _convert_text(table.column(i)) for i, c in enumerate(fields)}
                return cols if rows is None else {c: _place(n, rows, v) for c, v in cols.items()}
    got, cols = q.slow(b.lo, b.hi, "inputs", fields)
    return {c: _place(n, np.searchsorted(seqs, got), v) for c, v in cols.items()}


def _convert_text(col: pa.ChunkedArray) -> np.ndarray:
    """Text fields as the JSON decoder would give them: integers (as Python ints), floats, or strings.

    Arrow's casts do the checking in C++: a field is numeric only when every present value casts.
    """
    for target in (pa.int64(), pa.float64()):
        with contextlib.suppress(pa.ArrowInvalid):
            cast = pc.cast(col, target)
            if target == pa.float64():
                return cast.to_numpy()
            return cast.to_pandas().astype("Int64").to_numpy(dtype=object, na_value=None)
    return col.to_pandas().to_numpy(dtype=object)


def _to_frame(q: _Query, b: _Batch) -> pd.DataFrame:
    table = _csv(b.base, q.fields, q.types, sql_quoted=True)
    sets = None
    if q.blobs:
        sets = table.column("feature_set").fill_null(-1).to_numpy()
        table = table.drop_columns(["feature_set"])
    flags = [f for f in table.column_names if f.endswith(".null")]
    for f in flags:  # printf printed a NULL real as 0: make it null again
        c = f[: -len(".null")]
        isnull = pc.equal(table.column(f), 1)
        if pc.any(isnull).as_py():
            i = table.column_names.index(c)
            table = table.set_column(i, c, pc.if_else(isnull, pa.scalar(None, pa.float64()), table.column(c)))
    frame = table.drop_columns(flags).to_pandas()
    for c in ("fallback", "stale"):
        if c in frame:
            frame[c] = frame[c].astype(bool)
    seqs = frame["seq"].to_numpy()
    extra: dict[str, np.ndarray] = {}
    if q.features:
        extra.update(_features(q, b, seqs, sets))
    if q.inputs:
        extra.update({f"input.{c}": v for c, v in _inputs(q, b, seqs, q.inputs, b.inputs).items()})
    if q.labelled_inputs:
        rows = np.flatnonzero(frame["label"].notna().to_numpy())
        got = _inputs(q, b, seqs, q.labelled_inputs, b.labelled_inputs, rows)
        extra.update({f"input.{c}": v for c, v in got.items() if f"input.{c}" not in extra})
    if extra:
        frame = pd.concat([frame, pd.DataFrame(extra, index=frame.index)], axis=1)
    return frame


# --- the columnar segments (keel.logformat) -------------------------------------------------------------------
_NAT = np.iinfo(np.int64).min


def _us(text: str | None) -> int | None:
    return None if text is None else int(np.datetime64(text, "us").astype(np.int64))


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _seg_base(segs: list[Segment], name: str) -> np.ndarray:
    """One base column of consecutive segments, as the row path types it."""
    kind = segs[0].kind(name)
    if kind == "cat":
        index: dict[Any, int] = {}
        parts = []
        for s in segs:
            codes, values = s.column(name)
            parts.append(np.array([index.setdefault(v, len(index)) for v in values], dtype=np.int64)[codes])
        return _objects(list(index))[np.concatenate(parts)]
    if kind == "json":
        return _objects([v for s in segs for v in s.column(name)])
    arr = np.concatenate([s.column(name) for s in segs])
    if kind == "t":
        return arr.view("datetime64[us]").astype("datetime64[ns]")
    if kind == "u1":
        return arr.astype(bool)
    return arr


def _seg_features(q: _Query, segs: list[Segment]) -> dict[str, np.ndarray]:
    """Feature columns of consecutive segments: their float64 blobs (rows without features: NaN), or the JSON text
    of a segment whose values are not all numbers."""
    if all(s.kind("features.set") for s in segs):
        one = _one_set_features(q, segs)
        if one is not None:
            return one
        sets = np.concatenate([s.column("features.set") for s in segs]).astype(np.int64)
        blob = b"".join(s.column("features.f64") for s in segs)
        n, has = len(sets), sets >= 0
        cols = _blob_features(q, _Batch(0, 0, n, 0, b"", None, None, blob), sets[has]) if has.any() else {}
        if cols is None:
            raise MonitorError(f"A segment of the prediction log {q.path} holds feature blobs of the wrong length.",
                               hint="The log is damaged; delete its prediction_segments table to read the rows.")
        if has.all():
            return cols
        return {f: _place(n, np.flatnonzero(has), cols[f]) if cols else np.full(n, np.nan) for f in q.features}
    if len(segs) > 1:
        parts = [_seg_features(q, [s]) for s in segs]
        out = {}
        for f in q.features:
            arrays = [p[f] for p in parts]
            if any(a.dtype != np.float64 for a in arrays):
                arrays = [a if a.dtype != np.float64 else _as_objects(a) for a in arrays]
            out[f] = np.concatenate(arrays)
        return out
    records = [d if isinstance(d, dict) else {} for d in segs[0].column("features.json")]
    frame = pd.DataFrame.from_records(records, columns=q.features) if records else pd.DataFrame(columns=q.features)
    return {f: _convert([None if v != v else v for v in frame[f].tolist()]) for f in q.features}


def _one_set_features(q: _Query, segs: list[Segment]) -> dict[str, np.ndarray] | None:
    """The usual case, every row in one feature set: each column gathered straight from the segments' matrices."""
    first = segs[0].column("features.set")
    if not len(first) or first[0] < 0:
        return None
    sid = int(first[0])
    if not all((s.column("features.set") == sid).all() for s in segs):
        return None
    names = q.set_names([sid])[sid]
    w = len(names)
    blobs = [s.column("features.f64") for s in segs]
    if any(len(b) != 8 * w * s.n for b, s in zip(blobs, segs, strict=True)):
        return None
    n = sum(s.n for s in segs)
    # Feature-major, one segment's block at a time (cache-friendly): each feature then is a contiguous row.
    matrix = np.empty((w, n))
    at = 0
    for b, s in zip(blobs, segs, strict=True):
        matrix[:, at:at + s.n] = np.frombuffer(b, dtype="<f8").reshape(s.n, w).T
        at += s.n
    bad = ~np.isfinite(matrix)  # the JSON text stores NaN and infinities as null: the same missing value here
    if bad.any():
        matrix[bad] = np.nan
    where = {c: j for j, c in enumerate(names)}
    return {f: matrix[where[f]] if f in where else np.full(n, np.nan) for f in q.features}


def _seg_input(segs: list[Segment], name: str) -> np.ndarray:
    """One raw input field of consecutive segments, as the row path types it (ints as Python ints)."""
    # Infinities are missing, as in the rows' JSON text (null), which the row path reads.
    kinds = {s.kind(f"input.{name}") for s in segs}
    if kinds <= {"i8", "f8"}:
        arr = np.concatenate([s.column(f"input.{name}") for s in segs])
        if kinds == {"i8"}:
            return arr.astype(object)
        out = arr.astype(np.float64)
        out[np.isinf(out)] = np.nan
        return out
    values: list[Any] = []
    for s in segs:
        kind = s.kind(f"input.{name}")
        if kind == "f8":
            values += [None if v in (np.inf, -np.inf) else v for v in s.column(f"input.{name}").tolist()]
        else:
            values += [None] * s.n if kind is None else s.column(f"input.{name}").tolist() if kind == "i8" \
                else s.column(f"input.{name}")
    if values and all(type(v) is int for v in values):
        return _objects(values)
    return _convert(values)


def _segment_frame(q: _Query, b: _SegmentBatch) -> pd.DataFrame:
    segs = [Segment(data) for _, _, data in b.segments]
    seq = np.concatenate([np.arange(s0, s0 + n, dtype=np.int64) for s0, n, _ in b.segments])
    keep = None
    if q.start is not None or q.end is not None:
        t = np.concatenate([s.column("event_time") for s in segs])
        keep = t != _NAT
        if q.start is not None:
            keep &= t >= _us(q.start)
        if q.end is not None:
            keep &= t < _us(q.end)
        keep = None if keep.all() else np.flatnonzero(keep)

    def cut(a: np.ndarray) -> np.ndarray:
        return a if keep is None else a[keep]

    n = len(seq) if keep is None else len(keep)
    out: dict[str, np.ndarray] = {}
    for c in q.columns:
        if c == "seq":
            out[c] = cut(seq)
        elif c in BASE_COLUMNS:
            out[c] = cut(_seg_base(segs, c))
    if q.labels:
        label, at = np.full(len(seq), np.nan), np.full(len(seq), _NAT, dtype=np.int64)
        lseq, llabel, lat = b.labels
        if len(lseq):
            pos = np.searchsorted(seq, lseq)
            label[pos] = llabel
            at[pos] = lat
        out["label"] = cut(label)
        out["at"] = cut(at.view("datetime64[us]").astype("datetime64[ns]"))
    if q.features:
        out.update({f: cut(v) for f, v in _seg_features(q, segs).items()})
    for name in q.inputs:
        out[f"input.{name}"] = cut(_seg_input(segs, name))
    if q.labelled_inputs:
        rows = np.flatnonzero(~np.isnan(out["label"]))
        for name in q.labelled_inputs:
            if f"input.{name}" not in out:
                values = cut(_seg_input(segs, name))[rows]
                out[f"input.{name}"] = _place(n, rows, values) if len(rows) else np.full(n, None, dtype=object)
    return pd.DataFrame(out, copy=False)


def _label_arrays(rows: list[tuple[int, float, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label_rows' ``(seq, label, at_us)`` rows as three arrays."""
    if not rows:
        return _NO_SEQ, np.empty(0), _NO_SEQ
    seq, label, at = zip(*rows, strict=True)
    return np.array(seq, dtype=np.int64), np.array(label, dtype=np.float64), np.array(at, dtype=np.int64)


class _LabelIndex:
    """Every label of the log (``event_id -> label, at``), to match segment-only rows by event id at read time:
    what ``label_rows`` holds for rows kept in ``predictions``, i.e. the join ``labels.event_id = event_id``
    (segment-only rows have no event-id index to keep label rows at write time). Read once per reader, in
    chunks; the ids in a dict (their position), the labels and times in arrays: one lookup per row instead of a
    probe of the labels table's key (~5 us per row)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        ids: list[Any] = []
        labels, ats = [np.empty(0)], [np.empty(0, dtype=np.int64)]
        cursor = db.execute(LABELS_BY_EVENT_ID)
        while chunk := cursor.fetchmany(65_536):
            ids += [r[0] for r in chunk]
            labels.append(np.array([r[1] for r in chunk], dtype=np.float64))
            # (iso() texts: the integer microseconds label_rows holds, parsed in one numpy pass)
            ats.append(np.array([r[2] for r in chunk], dtype="datetime64[us]").view(np.int64))
        self.ids = dict(zip(ids, range(len(ids)), strict=True))  # (unique: event_id is the table's key)
        self.label, self.at = np.concatenate(labels), np.concatenate(ats)

    def match(self, segments: Sequence[tuple[int, int, bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``seq``, label and ``at_us`` of the segments' rows that have a label (arrays)."""
        seqs, hits = [_NO_SEQ], [_NO_SEQ]
        if len(self.ids):
            get = self.ids.get
            for s0, _, data in segments:
                pos = np.array([get(e, -1) for e in Segment(data).column("event_id")], dtype=np.int64)
                rows = np.flatnonzero(pos >= 0)
                seqs.append(rows + s0)
                hits.append(pos[rows])
        hit = np.concatenate(hits)
        return np.concatenate(seqs), self.label[hit], self.at[hit]


_NO_SEQ = np.empty(0, dtype=np.int64)


def _plan(db: sqlite3.Connection, first: int, last: int, batch_rows: int) -> list[tuple[Any, ...]]:
    """The tasks reading ``first <= seq <= last`` in order: runs of consecutive segments of about ``batch_rows``
    rows (with the ``seq0`` of each), and ranges of the rows no segment covers. A segment overlapping the one
    before it (two writers that both covered some rows) is left out: the rows it adds are read from the rows."""
    segments = db.execute("select seq0, n from prediction_segments where seq0 <= ? and seq0 + n > ? order by seq0",
                          (last, first)).fetchall()
    tasks: list[tuple[Any, ...]] = []

    def rows(lo: int, hi: int) -> None:
        tasks.extend(("rows", a, min(a + batch_rows, hi)) for a in range(lo, hi, batch_rows))

    at = first
    run: list[int] = []
    run_rows, prev_end = 0, None
    for s0, n in segments:
        if prev_end is not None and s0 < prev_end:
            continue
        if run and (s0 > at or run_rows + n > batch_rows):
            tasks.append(("segments", run[0], at, tuple(run)))
            run, run_rows = [], 0
        if s0 > at:
            rows(at, s0)
        run.append(s0)
        run_rows += n
        at = prev_end = max(at, s0 + n)
    if run:
        tasks.append(("segments", run[0], at, tuple(run)))
    rows(at, last + 1)
    return tasks


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


def _only_range(db: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> tuple[Any, ...]:
    """min(seq0), max(last seq), min(t_lo), max(t_hi), max(t_null) of the segment-only segments (Nones if none)."""
    if not has_segment_only(db):
        return (None, None, None, None, None)
    return db.execute("select min(seq0), max(seq0 + n - 1), min(t_lo), max(t_hi), max(t_null) from"
                      f" prediction_segments where segment_only = 1{where}", params).fetchone()


def _union(a: Any, b: Any, pick: Any) -> Any:
    return b if a is None else a if b is None else pick(a, b)


def event_time_range(db: sqlite3.Connection) -> tuple[str | None, str | None]:
    """(first, last) ``event_time`` text of the log's rows, those of segment-only rows included (None: none)."""
    # One subquery per bound: SQLite answers a lone min() or max() from the index, both at once by a scan.
    t_lo, t_hi = db.execute("select (select min(event_time) from predictions),"
                            " (select max(event_time) from predictions)").fetchone()
    _, _, s_lo, s_hi, _ = _only_range(db)
    s_lo_t, s_hi_t = (iso_us(np.array([s_lo, s_hi], dtype="<i8")) if s_lo is not None else (None, None))
    return _union(t_lo, s_lo_t, min), _union(t_hi, s_hi_t, max)


def seq_bounds(path: str | Path, start: str | None = None, end: str | None = None) -> tuple[int, int] | None:
    """(first, last) ``seq`` of the rows with ``start <= event_time < end`` (the event-time index answers). With
    segment-only rows, the bounds take in every such segment whose time range meets ``[start, end)`` whole
    (readers cut its rows by time)."""
    where, params = [], []
    if start is not None:
        where.append("event_time >= ?")
        params.append(start)
    if end is not None:
        where.append("event_time < ?")
        params.append(end)
    with contextlib.closing(_connect(Path(path))) as db:
        # Lone min()/max() are index look-ups, a bounded min(seq) scans the event-time index: bound only when the
        # bounds leave a row out.
        whole = True
        if where:
            t_lo, t_hi = event_time_range(db)
            if t_lo is None:
                return None
            whole = ((start is None or start <= t_lo) and (end is None or end > t_hi) and not db.execute(
                "select exists (select 1 from predictions where event_time is null)").fetchone()[0]
                and not _only_range(db)[4])
        if whole:
            lo, hi = db.execute("select (select min(seq) from predictions), (select max(seq) from predictions)"
                                ).fetchone()
            s_lo, s_hi = _only_range(db)[:2]
        else:
            sql = "select min(seq), max(seq) from predictions where " + " and ".join(where)
            lo, hi = db.execute(sql, params).fetchone()
            cut, args = " and t_lo is not null", []
            if start is not None:
                cut += " and t_hi >= ?"
                args.append(_us(start))
            if end is not None:
                cut += " and t_lo < ?"
                args.append(_us(end))
            s_lo, s_hi = _only_range(db, cut, args)[:2]
        lo, hi = _union(lo, s_lo, min), _union(hi, s_hi, max)
    return None if lo is None else (int(lo), int(hi))


def read_log(path: str | Path, *, features: Sequence[str] = (), inputs: Sequence[str] = (),
             start: datetime | str | None = None, end: datetime | str | None = None, batch_rows: int = 200_000,
             columns: Sequence[str] = MONITOR_COLUMNS, labels: bool = False, labelled_inputs: Sequence[str] = (),
             prefetch: bool = True) -> Iterator[pd.DataFrame]:
    """Stream the log's rows with ``start <= event_time < end`` in ``seq`` order, ``batch_rows`` at most per frame.

    Each frame has ``columns`` (of :data:`BASE_COLUMNS`; ``event_time`` as datetimes, ``fallback``/``stale`` as
    bool), with ``labels`` the joined ``label`` and ``at`` (NaN/NaT when none), one float column per feature (or
    object, when a feature's values are not all numbers) and one column ``input.<name>`` per raw input field.
    ``labelled_inputs`` (with ``labels``): more input fields, read only for the rows with a label (None/NaN
    elsewhere; parsing each row's inputs is the costly part).
    Memory stays at a few batches. Example::

        for frame in read_log(path, features=list(profile.features), end=as_of):
            accumulator.update(frame)
    """
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"No prediction log at {p}.",
                           hint="Serve some traffic first (`keel serve`), or check serving.prediction_log.")
    if batch_rows < 1:
        raise MonitorError(f"read_log(batch_rows=...) must be at least 1. Got {batch_rows} instead.")
    unknown = sorted(set(columns) - set(BASE_COLUMNS))
    if unknown:
        raise MonitorError(f"read_log(columns=...) names unknown log columns {unknown}.",
                           hint=f"Choose among {sorted(BASE_COLUMNS)}.")
    cols = list(dict.fromkeys(["seq", *columns]))
    lo_t = iso(pd.Timestamp(start)) if start is not None else None
    hi_t = iso(pd.Timestamp(end)) if end is not None else None
    bounds = seq_bounds(p, lo_t, hi_t)
    if bounds is None:
        return
    with contextlib.closing(_connect(p)) as db:
        blobs = has_feature_columns(db)
        sets = read_feature_sets(db) if blobs else {}
        tasks = (_plan(db, bounds[0], bounds[1], batch_rows) if has_segments(db) else
                 [("rows", a, min(a + batch_rows, bounds[1] + 1)) for a in range(bounds[0], bounds[1] + 1, batch_rows)])
        only = has_segment_only(db)
    q = _Query(p, features, inputs, cols, labels, lo_t, hi_t, blobs=blobs, sets=sets,
               labelled_inputs=[c for c in labelled_inputs if c not in set(inputs)])
    q.segment_only = only
    for batch in _batches(p, q, tasks, prefetch):
        if batch.rows:
            frame = _segment_frame(q, batch) if isinstance(batch, _SegmentBatch) else _to_frame(q, batch)
            if len(frame):
                yield frame if "seq" in columns else frame.drop(columns=["seq"])


def _batches(path: Path, q: _Query, ranges: list[tuple[Any, ...]], prefetch: bool
             ) -> Iterator[_Batch | _SegmentBatch]:
    """The ranges' batches in order. With ``prefetch``, worker threads (one per core, at most two) query them
    ahead, each its own connection and every other range (SQLite releases the GIL while it runs), and hand
    them over in order; each holds at most one finished batch, so memory stays a few batches."""
    workers = min(2, os.cpu_count() or 1, len(ranges)) if prefetch else 1
    if workers < 2 and (not prefetch or len(ranges) < 2):
        with contextlib.closing(_connect(path)) as db:
            for task in ranges:
                yield q.fetch(db, task)
        return
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=1) for _ in range(workers)]
    stop = threading.Event()

    def hand(i: int, item: Any) -> None:  # wait for room unless the consumer has stopped
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                queues[i].put(item, timeout=0.1)
                return

    def work(i: int) -> None:
        try:
            with contextlib.closing(_connect(path)) as db:
                for task in ranges[i::workers]:
                    if stop.is_set():
                        return
                    hand(i, q.fetch(db, task))
        except BaseException as exc:  # handed to the consumer, which raises it
            hand(i, exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"keel-logread-{i}", daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    try:
        for k in range(len(ranges)):
            item = queues[k % workers].get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for qu in queues:
            with contextlib.suppress(queue.Empty):
                while True:
                    qu.get_nowait()
        for t in threads:
            t.join(timeout=5)


__all__ = ["BASE_COLUMNS", "MONITOR_COLUMNS", "event_time_range", "features_pattern", "read_log", "seq_bounds"]
