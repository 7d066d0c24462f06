"""Online features: per-entity state in SQLite (WAL), the same window semantics as the offline table, per event.

One definition, two paths: window edges (:func:`~keel.features.offline.window_edges`), row transforms, ratios
and the final aggregate (:func:`~keel.features.offline.finish_aggregate`) are the offline module's own
functions; only the way window statistics are gathered differs (a binary search in one entity's recent events
here, prefix sums over the whole table there). A replay test proves both give the same numbers.

Example::

    store = OnlineStore.from_spec(spec)               # .keel/online.sqlite, WAL
    row = store.features(event)                       # {'tx_amount': 57.16, ..., 'terminal_id_risk_7day_window': 0.0}
    row.stale                                         # True when an entity's state is older than features.freshness
    store.update(event)                               # the event now counts for later events
    store.add_label(event_id, 1, at=when_known)       # counts in label aggregates for events after `at`

``features(event)`` scores an event that is not in the store yet (call it, then ``update``); if the event's id
is already stored it is not counted twice. Labels count for an event at time ``t`` only when the labelled event
lies in the (delayed) window and the label arrived at or before ``t``.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import sqlite3
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import accumulate, compress, repeat
from operator import and_, eq, getitem, is_, not_
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import FeatureError
from keel.features.definitions import (
    Definition,
    RatioDefinition,
    RawDefinition,
    RowDefinition,
    WindowDefinition,
    definitions_hash,
    entities,
    feature_names,
    window_definitions,
)
from keel.features.offline import finish_aggregate, ratio_feature, row_value, to_ns
from keel.sqlbatch import execute_chunked

_SCHEMA = """
create table if not exists meta (k text primary key, v text not null);
create table if not exists events (
    seq integer primary key,
    entity text not null, key text not null, event_id text, t integer not null, vals text not null
);
drop index if exists events_by_entity;
create table if not exists labels (event_id text primary key, label real not null, at integer not null);
"""
_INSERT = "insert into events (seq, entity, key, event_id, t, vals) values (?, ?, ?, ?, ?, ?)"
_DELETE = "delete from events where seq = ?"
_ONE_STATEMENT = 8  # up to this many rows without deletes: one multi-row INSERT
_INSERTS = [_INSERT + ", (?, ?, ?, ?, ?, ?)" * (k - 1) for k in range(_ONE_STATEMENT + 1)]
# A large commit writes statements of up to this many parameters (under SQLite's oldest limit of 999): 150 rows an
# INSERT, 900 seqs a DELETE. One execution per row cost 3.3-4.0 us an insert and 2.3 us a delete of an old row,
# these 1.8-2.5 and 1.7 us (2,000-row commits, thread CPU).
_PARAMS = 900
_INSERT_ROWS = _PARAMS // 6
_INSERT_MANY = _INSERT + ", (?, ?, ?, ?, ?, ?)" * (_INSERT_ROWS - 1)
_DELETE_MANY = "delete from events where seq in (" + ", ".join("?" * _PARAMS) + ")"


_EPOCH = datetime(1970, 1, 1)
_NO_LABEL_AT = 2**62  # label_at of an event without a label
_NEVER_LABELLED = -(2**63)  # _EntityState.late_label of a state that never held a non-zero label
_ONE_US = timedelta(microseconds=1)
_INFINITIES = (math.inf, -math.inf)
_MISSING = object()
_consume = deque(maxlen=0).extend  # runs an iterator (of C-level ``map`` calls) to its end
_BATCH_MIN = 32  # features_many(stage=True) of at least this many events tries the batch path (online_batch)


def _key(value: Any) -> str:
    """Entity values and event ids as canonical text (7, 7.0 and np.int64(7) are the same entity)."""
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is str:
        return value
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _time_ns(value: Any, column: str) -> int:
    if value is None:
        raise FeatureError(f"The event has no {column!r} (its event time); window features need it.")
    if type(value) is pd.Timestamp and value.tzinfo is None:
        return int(value.as_unit("ns").value)
    if type(value) is datetime and value.tzinfo is None:
        return (value - _EPOCH) // _ONE_US * 1000
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"The event's {column!r} value {value!r} is not a timestamp: {exc}.") from None
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    try:
        return int(ts.as_unit("ns").value)
    except (OverflowError, ValueError) as exc:  # outside 1677..2262: nanoseconds do not fit in 64 bits
        raise FeatureError(f"The event's {column!r} value {value!r} is out of range: {exc}.") from None


def _batch_length(cols: Mapping[str, Any]) -> int:
    """The number of events of a column batch (every column has it)."""
    lengths = {len(column) for column in cols.values()}
    if len(lengths) > 1:
        raise FeatureError(f"The columns of the batch differ in length ({sorted(lengths)}).",
                           hint="Give every field one value per event.")
    return lengths.pop() if lengths else 0


def row_view(n: int, cols: Mapping[str, Any], timestamp: str | None) -> list[dict[str, Any]]:
    """The events of a column batch as dicts (what the request models' ``model_dump`` gives): the timestamp as ``datetime`` (microseconds), numpy columns as
    Python values, lists as they are."""
    out: dict[str, list[Any]] = {}
    for name, column in cols.items():
        if name == timestamp and isinstance(column, np.ndarray) and column.dtype.kind == "M":
            out[name] = column.astype("datetime64[us]").astype(datetime).tolist()
        elif isinstance(column, np.ndarray):
            out[name] = column.tolist()
        else:
            out[name] = list(column)
    names = list(out)
    return [dict(zip(names, row, strict=True)) for row in zip(*out.values(), strict=True)] if n else []


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class FeatureRow(dict[str, float]):
    """Feature name -> value, plus freshness: ``stale`` and the entity columns whose state is too old."""

    stale: bool
    stale_entities: tuple[str, ...]
    unknown_entities: tuple[str, ...]

    def __init__(
        self,
        values: Mapping[str, float],
        stale_entities: Sequence[str] = (),
        unknown_entities: Sequence[str] = (),
    ) -> None:
        super().__init__(values)
        self.stale_entities = tuple(stale_entities)
        self.unknown_entities = tuple(unknown_entities)
        self.stale = bool(self.stale_entities)


def _passive_checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    """SQLite's PASSIVE checkpoint of the write-ahead log: ``(busy, log pages, pages checkpointed)``."""
    row = db.execute("pragma wal_checkpoint(passive)").fetchone()
    return int(row[0]), int(row[1]), int(row[2])


class _Checkpointer:
    """Checkpoints the store's write-ahead log from a thread of its own, after every ``rows`` rows written.

    SQLite otherwise checkpoints inside whichever commit crosses 1,000 log pages; SQLite releases the GIL while it
    works, so a checkpoint here costs the serving loop nothing. PASSIVE: it never waits for, nor blocks, writers.
    """

    def __init__(self, path: Path, rows: int) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("pragma busy_timeout=10000")
        self._rows = rows
        self._pending = 0
        self._lock = threading.Lock()  # one checkpoint at a time on this connection
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="keel-store-checkpoint", daemon=True)
        self._thread.start()

    def wrote(self, rows: int) -> None:
        self._pending += rows  # a hint, read and reset by the thread (a lost update delays a checkpoint)
        if self._pending >= self._rows:
            self._wake.set()

    def run(self) -> tuple[int, int, int]:
        with self._lock:
            self._pending = 0
            return _passive_checkpoint(self._db)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            with contextlib.suppress(sqlite3.Error):  # busy or failed: the next one catches up
                self.run()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()
        with contextlib.suppress(sqlite3.Error):
            self.run()
        self._db.close()


@dataclass(frozen=True)
class FeatureBatch:
    """What :meth:`OnlineStore.features_many` returns: ``matrix`` (events x features, float64), ``stale`` and
    ``failed`` (bool per event) and ``errors`` as ``(index, "features" | "update", exception)``."""

    matrix: np.ndarray
    stale: np.ndarray
    failed: np.ndarray
    errors: list[tuple[int, str, Exception]]


def _scaled(x: float) -> tuple[int, int]:
    """A finite float as ``(n, k)`` with ``x == n / 2**k`` exactly."""
    num, den = x.as_integer_ratio()
    return num, den.bit_length() - 1


class _ExactPrefix:
    """Exact prefix sums of a float column (NaN skipped) as Python integers scaled by ``2**shift``.

    A window's sum is ``(sums[hi] - sums[lo]) / 2**shift``: the exact sum of its values, rounded once (Python's
    int/int division is correctly rounded), which is what ``math.fsum`` returns for the same values. So the
    window sum costs O(1) and is bit-identical to summing the window's values with ``fsum``. A non-finite value
    (only infinities: NaN is skipped) makes the column ``exact = False`` and callers sum the window instead.
    """

    __slots__ = ("exact", "shift", "sums", "valid")

    def __init__(self, values: Sequence[float]) -> None:
        # What push() of each value in turn gives, in one pass: the finest grid any value needs, then each
        # value's integer on it and running sums (no rescaling of the sums built so far).
        ratios = [x.as_integer_ratio() if x == x and x not in _INFINITIES else None for x in values]
        self.exact = not any(x in _INFINITIES for x in values)  # an infinity: callers sum the window instead
        shift = max((den.bit_length() - 1 for _, den in filter(None, ratios)), default=0)
        self.shift = shift
        self.sums = [0, *accumulate(0 if r is None else r[0] << (shift - r[1].bit_length() + 1) for r in ratios)]
        self.valid = array("q", [0, *accumulate(1 if x == x else 0 for x in values)])

    def _term(self, x: float) -> tuple[int, int]:
        """(scaled value, valid) of one value, rescaling the stored sums when it needs a finer grid."""
        if x != x:
            return 0, 0
        if x in (math.inf, -math.inf):
            self.exact = False
            return 0, 1
        n, k = _scaled(x)
        if k > self.shift:
            self._rescale(k)
        return n << (self.shift - k), 1

    def _rescale(self, k: int) -> None:
        up = k - self.shift
        self.sums = [s << up for s in self.sums]
        self.shift = k

    def refine(self, x: float) -> None:
        """Rescale the sums to the grid a finite ``x`` needs, if finer (what :meth:`push` of it does first)."""
        k = _scaled(x)[1]
        if k > self.shift:
            self._rescale(k)

    def push(self, x: float) -> None:
        term, ok = self._term(x)
        self.sums.append(self.sums[-1] + term)
        self.valid.append(self.valid[-1] + ok)

    def insert(self, i: int, x: float) -> None:
        term, ok = self._term(x)
        self.sums.insert(i + 1, self.sums[i] + term)
        self.valid.insert(i + 1, self.valid[i] + ok)
        if term:
            for j in range(i + 2, len(self.sums)):
                self.sums[j] += term
        if ok:
            for j in range(i + 2, len(self.valid)):
                self.valid[j] += ok

    def replace(self, i: int, old: float, new: float) -> None:
        """Value ``i`` changed from ``old`` to ``new`` (both finite)."""
        a, _ = self._term(old)
        b, _ = self._term(new)
        if a != b:
            for j in range(i + 1, len(self.sums)):
                self.sums[j] += b - a

    def drop(self, k: int) -> None:
        del self.sums[:k], self.valid[:k]


@dataclass(slots=True)
class _EntityState:
    """One entity's recent events, in (time, arrival) order, as compact columns (``array``: 8 bytes a value).

    ``sums`` (per value column) and ``label_sums`` are exact prefix sums built on first use and kept up to date
    by every change made through the methods below; ``late_label`` is the latest arrival time of any non-zero
    label (an upper bound): events at or after it see every label, so their label sums come from the prefix.
    """

    times: array = field(default_factory=lambda: array("q"))  # int64 nanoseconds
    ids: list[str | None] = field(default_factory=list)
    values: dict[str, array] = field(default_factory=dict)  # float64 per value column
    labels: array = field(default_factory=lambda: array("d"))
    label_at: array = field(default_factory=lambda: array("q"))
    id_set: set[str] = field(default_factory=set)
    seqs: array = field(default_factory=lambda: array("q"))  # per event, its row's seq on disk (once written)
    sums: dict[str, _ExactPrefix] | None = None
    label_sums: _ExactPrefix | None = None
    late_label: int = _NEVER_LABELLED

    def append(self, t: int, event_id: str | None, vals: Mapping[str, float], label: float, at: int,
               seq: int) -> None:
        """Add a stored event known to be the latest so far (loading in time order)."""
        self.times.append(t)
        self.seqs.append(seq)
        self.ids.append(event_id)
        if event_id is not None:
            self.id_set.add(event_id)
        for c, column in self.values.items():
            column.append(vals.get(c, math.nan))
        self.labels.append(label)
        self.label_at.append(at)
        self._note_label(label, at)
        self.sums = self.label_sums = None  # rebuilt on first use

    def insert(self, t: int, event_id: str | None, vals: Mapping[str, float], seq: int) -> int:
        times = self.times
        if not times or times[-1] <= t:  # the usual case, events in time order: appends only
            i = len(times)
            times.append(t)
            self.seqs.append(seq)
            self.ids.append(event_id)
            if event_id is not None:
                self.id_set.add(event_id)
            sums = self.sums
            for c, column in self.values.items():
                v = vals.get(c, math.nan)
                column.append(v)
                if sums is not None:
                    prefix = sums[c]
                    if v == v and v not in _INFINITIES:  # push(v) without the call, on the state's grid
                        num, den = v.as_integer_ratio()
                        k = den.bit_length() - 1
                        if k <= prefix.shift:
                            prefix.sums.append(prefix.sums[-1] + (num << (prefix.shift - k)))
                            prefix.valid.append(prefix.valid[-1] + 1)
                            continue
                    prefix.push(v)
            self.labels.append(0.0)
            self.label_at.append(_NO_LABEL_AT)
            label_sums = self.label_sums
            if label_sums is not None:  # push(0.0): a finite zero adds nothing and counts as valid
                label_sums.sums.append(label_sums.sums[-1])
                label_sums.valid.append(label_sums.valid[-1] + 1)
            return i
        i = bisect.bisect_right(times, t)
        self.times.insert(i, t)
        self.seqs.insert(i, seq)
        self.ids.insert(i, event_id)
        if event_id is not None:
            self.id_set.add(event_id)
        for c, column in self.values.items():
            v = vals.get(c, math.nan)
            column.insert(i, v)
            if self.sums is not None:
                if i == len(column) - 1:
                    self.sums[c].push(v)
                else:
                    self.sums[c].insert(i, v)
        self.labels.insert(i, 0.0)
        self.label_at.insert(i, 2**62)
        if self.label_sums is not None:
            self.label_sums.insert(i, 0.0)
        return i

    def set_label(self, i: int, label: float, at: int) -> None:
        old = self.labels[i]
        self.labels[i], self.label_at[i] = label, at
        self._note_label(label, at)
        if self.label_sums is not None:
            if math.isfinite(old) and math.isfinite(label):
                self.label_sums.replace(i, old, label)
            else:
                self.label_sums = None

    def _note_label(self, label: float, at: int) -> None:
        if label != 0.0:  # a non-finite label keeps every label sum on the scanning path
            self.late_label = max(self.late_label, at if math.isfinite(label) else 2**63)

    def prune(self, before: int) -> int:
        """Drop events with time <= before; return how many."""
        k = bisect.bisect_right(self.times, before)
        if k:
            self.drop_first(k)
        return k

    def drop_first(self, k: int) -> None:
        """Drop the ``k`` oldest events."""
        if k == len(self.ids):
            self.id_set.clear()
        else:
            self.id_set.difference_update(self.ids[:k])
        del self.times[:k], self.ids[:k], self.labels[:k], self.label_at[:k], self.seqs[:k]
        for column in self.values.values():
            del column[:k]
        for prefix in (self.sums or {}).values():
            prefix.drop(k)
        if self.label_sums is not None:
            self.label_sums.drop(k)

    def prefix(self) -> dict[str, _ExactPrefix]:
        if self.sums is None:
            self.sums = {c: _ExactPrefix(column) for c, column in self.values.items()}
        return self.sums

    def label_prefix(self) -> _ExactPrefix:
        if self.label_sums is None:
            self.label_sums = _ExactPrefix(self.labels)
        return self.label_sums


def _exact_total(prefix: _ExactPrefix, lo: int, hi: int, current: float | None) -> tuple[float, int]:
    """(sum, non-null count) of a window's values plus ``current``, as ``math.fsum`` of them would give."""
    total = prefix.sums[hi] - prefix.sums[lo]
    valid = prefix.valid[hi] - prefix.valid[lo]
    shift = prefix.shift
    if current is not None and current == current:
        n, k = _scaled(current)
        if k > shift:
            total <<= k - shift
            shift = k
        total += n << (shift - k)
        valid += 1
    return (total / (1 << shift) if total else 0.0), valid


@dataclass(frozen=True)
class _GroupPlan:
    """One window shared by some definitions of one entity, with its edges in integer nanoseconds."""

    defs: tuple[WindowDefinition, ...]
    delay_ns: int
    window_ns: int
    zero_delay: bool
    include_current: bool
    # (name, aggregate, column, reads_label) per definition: plain tuples, read once per event and window
    items: tuple[tuple[str, str, str | None, bool], ...]

    @classmethod
    def of(cls, defs: Sequence[WindowDefinition]) -> _GroupPlan:
        first = defs[0]
        return cls(tuple(defs), to_ns(first.delay), to_ns(first.window), first.delay == timedelta(0),
                   first.include_current, tuple((d.name, d.aggregate, d.column, d.reads_label) for d in defs))


def _window_group(
    state: _EntityState,
    plan: _GroupPlan,
    t: int,
    current: Mapping[str, float] | None,
    own: int | None,
    out: dict[str, float],
    scaled: dict[str, tuple[int, int] | None] | None = None,
) -> None:
    """Window features sharing one window (same delay, length, include_current) for an event at ``t``.

    ``current`` is the event itself when it is not stored yet; ``own`` its index when it is. Counts, sums,
    means and label sums come from exact prefix sums (O(1) per window, the same numbers as ``math.fsum`` over
    the window); std, min and max (and columns holding infinities) scan the window. ``scaled`` caches the
    current event's values as :func:`_scaled` gives them, shared by the event's windows (NaN: None).
    """
    times = state.times
    end = t - plan.delay_ns  # window_edges(): (t - delay - window, t - delay]
    if plan.zero_delay and own is not None:
        hi = own + 1 if plan.include_current else own
    else:
        hi = bisect.bisect_right(times, end)
    lo = bisect.bisect_right(times, end - plan.window_ns)
    if lo > hi:
        lo = hi
    with_current = current is not None and plan.zero_delay and plan.include_current
    count = hi - lo + 1 if with_current else hi - lo
    values: dict[str, list[float]] = {}
    label_total: float | None = None
    sums: dict[str, _ExactPrefix] | None = None
    for name, aggregate, column, reads_label in plan.items:
        if aggregate == "count":
            out[name] = float(count)
            continue
        if column and (aggregate == "mean" or aggregate == "sum"):
            if sums is None:
                sums = state.sums if state.sums is not None else state.prefix()
            prefix = sums[column]
            if prefix.exact:
                # _exact_total(prefix, lo, hi, current value) with the value's scaled form computed once
                psums = prefix.sums
                total = psums[hi] - psums[lo]
                pvalid = prefix.valid
                valid = pvalid[hi] - pvalid[lo]
                shift = prefix.shift
                if with_current:
                    if scaled is None:
                        scaled = {}
                    if column in scaled:
                        term = scaled[column]
                    else:
                        v = current.get(column, math.nan)  # type: ignore[union-attr]
                        term = scaled[column] = _scaled(v) if v == v else None
                    if term is not None:
                        n, k = term
                        if k > shift:
                            total <<= k - shift
                            shift = k
                        total += n << (shift - k)
                        valid += 1
                value = total / (1 << shift) if total else 0.0
                # _finish_scalar's rules for these two, without the call
                if aggregate == "mean":
                    out[name] = value / valid if valid > 0 else math.nan
                else:
                    out[name] = value if valid else 0.0
                continue
        total = m2 = mn = mx = 0.0
        valid = 0
        if column:  # the scanning path: std, min, max, and sums over a column holding infinities
            if column not in values:
                window = [v for v in state.values[column][lo:hi] if v == v]  # v == v drops NaN
                if with_current:
                    v = current.get(column, math.nan)  # type: ignore[union-attr]
                    if v == v:
                        window.append(v)
                values[column] = window
            vals = values[column]
            valid = len(vals)
            if aggregate in ("sum", "mean"):
                total = math.fsum(vals)
            elif aggregate == "std" and valid:
                mean = math.fsum(vals) / valid
                m2 = math.fsum((v - mean) ** 2 for v in vals)
            elif aggregate == "min" and valid:
                mn = min(vals)
            elif aggregate == "max" and valid:
                mx = max(vals)
        if reads_label and label_total is None and state.late_label == _NEVER_LABELLED:
            label_total = 0.0  # only zero labels: the sum the prefix gives, without building it
        if reads_label and label_total is None:
            labels = (state.label_sums or state.label_prefix()) if t >= state.late_label else None
            if labels is not None and labels.exact:
                label_total = _exact_total(labels, lo, hi, None)[0]
            else:
                label_total = math.fsum(
                    y for y, at in zip(state.labels[lo:hi], state.label_at[lo:hi], strict=True) if at <= t
                )
        if aggregate == "label_rate":
            out[name] = float(label_total or 0.0) / count if count > 0 else 0.0
            continue
        out[name] = finish_aggregate(aggregate, count, valid, total, m2, mn, mx, label_total or 0.0)


class OnlineStore:
    """Per-entity feature state for serving, in SQLite (WAL) with a write-through in-memory cache.

    Parameters: ``path`` of the SQLite file; ``definitions`` from
    :func:`~keel.features.definitions.resolve_definitions`; ``timestamp``/``label``/``id_column`` name the event
    fields; ``freshness`` flags entity state older than this (``None``: never stale). Thread-safe (one lock).
    """

    # Rows written (inserted or deleted) by commit_staged between two background checkpoints of the log.
    CHECKPOINT_ROWS = 5_000
    # Deletes of pruned rows (housekeeping: a load prunes those rows again) wait until this many are due, so most
    # small commits are one INSERT statement (its own transaction) instead of begin + inserts + deletes + commit.
    DELETE_ROWS = 256

    def __init__(
        self,
        path: str | Path,
        definitions: Sequence[Definition],
        *,
        timestamp: str | None,
        label: str | None = None,
        id_column: str | None = None,
        freshness: timedelta | None = None,
    ) -> None:
        self.path = Path(path)
        self.definitions = list(definitions)
        self.timestamp = timestamp
        self.label = label
        self.id_column = id_column
        self.freshness = freshness
        self._windows = window_definitions(self.definitions)
        self._entities = entities(self.definitions)
        self._names = feature_names(self.definitions)
        self._columns = {
            e: sorted({d.column for d in self._windows if d.entity == e and d.column}) for e in self._entities
        }
        self._groups: dict[str, list[list[WindowDefinition]]] = {}
        for d in self._windows:
            groups = self._groups.setdefault(d.entity, [])
            for group in groups:
                g = group[0]
                if (g.delay, g.window, g.include_current) == (d.delay, d.window, d.include_current):
                    group.append(d)
                    break
            else:
                groups.append([d])
        self._plans = {e: [_GroupPlan.of(g) for g in groups] for e, groups in self._groups.items()}
        # entities whose windows read labels: their states that ever held a non-zero label keep label prefix sums
        self._label_entities = {e for e, plans in self._plans.items() if any(r for p in plans for *_, r in p.items)}
        self._raw = [d for d in self.definitions if isinstance(d, RawDefinition)]
        self._rows = [d for d in self.definitions if isinstance(d, RowDefinition)]
        self._ratios = [d for d in self.definitions if isinstance(d, RatioDefinition)]
        self._freshness_ns = None if freshness is None else to_ns(freshness)
        self._vals_json = {e: [(c, json.dumps(c)) for c in cols] for e, cols in self._columns.items()}
        # Labels whose event is in no in-memory entity state (labels that came first, or whose event was pruned):
        # a new event finds its label here instead of querying SQLite. Complete only once every entity's state is
        # in memory (after preload); until then a miss falls back to the labels table.
        self._pending: dict[str, tuple[float, int]] = {}
        self._pending_complete = False
        self._horizon = {
            e: max(to_ns(d.horizon) for d in self._windows if d.entity == e) for e in self._entities
        }
        if self._windows and not timestamp:
            raise FeatureError("Window features need an event time, but no timestamp column was given.")
        self._cache: dict[tuple[str, str], _EntityState] = {}
        # event id -> the in-memory states holding it (one per entity column)
        self._owners: dict[str, tuple[_EntityState, ...]] = {}
        self._lock = threading.RLock()
        self._depth = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute("pragma busy_timeout=10000")  # the group-commit connection may hold the write lock
        self._db.executescript(_SCHEMA)
        self._staging = False
        # Rows ``(seq, entity, key, event_id, t, vals)`` for the next commit_staged; each row's seq is chosen when
        # it is staged (the states keep plain int seqs, no per-row handle waiting for SQLite's rowid).
        self._staged: list[tuple[Any, ...]] = []
        # The batch path's rows as columns, built into rows by the commit: (first seq, entity, keys, event ids,
        # times, value columns in _columns[entity] order); the rows' seqs run from the first on.
        self._staged_blocks: list[tuple[int, str, list[str], list[str | None], list[int], list[list[float]]]] = []
        self._staged_seqs: set[int] = set()  # seqs of the rows in _staged and _staged_blocks
        self._skipped: set[int] = set()  # staged rows memory dropped before their commit: never written
        # seqs the latest commit took (being written, or written): dropped, they are deleted with the next commit
        self._in_flight: set[int] = set()
        self._staged_deletes: list[tuple[int]] = []  # seqs of written rows memory has dropped
        self._loaded_all = False  # every entity's state is in memory (preload ran)
        self._writer: sqlite3.Connection | None = None
        self._writer_lock = threading.Lock()
        self._checkpointer: _Checkpointer | None = None
        self._check_definitions()
        self._next_seq = int(self._db.execute("select coalesce(max(seq), 0) + 1 from events").fetchone()[0])

    @classmethod
    def from_spec(cls, spec: Any, path: str | Path | None = None) -> OnlineStore:
        """Open the store a :class:`keel.spec.Spec` names (``features.store`` under the state dir)."""
        from keel.features.definitions import resolve_definitions

        defs = resolve_definitions(spec.features, spec.data)
        return cls(
            path if path is not None else spec.store_path(spec.features.store),
            defs,
            timestamp=spec.data.timestamp,
            label=spec.data.label,
            id_column=spec.data.id_column,
            freshness=spec.features.freshness,
        )

    def _check_definitions(self) -> None:
        digest = definitions_hash(self.definitions)
        row = self._db.execute("select v from meta where k = 'definitions_hash'").fetchone()
        if row is None:
            self._db.execute("insert into meta values ('definitions_hash', ?)", (digest,))
        elif row[0] != digest:
            raise FeatureError(
                f"The online store {self.path} was built for other feature definitions "
                f"(hash {row[0][:12]}, now {digest[:12]}).",
                hint="Rebuild it (delete the file and replay recent events) after changing [features].",
            )

    def close(self) -> None:
        self.commit_staged(deletes=True)
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
            self._db.close()

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy what the write-ahead log holds into the database file without blocking writers (SQLite's PASSIVE
        checkpoint); returns SQLite's ``(busy, log pages, pages checkpointed)``. The staged-row commits leave this
        to a background thread (see :meth:`commit_staged`)."""
        checkpointer = self._checkpointer
        if checkpointer is not None:
            return checkpointer.run()
        return _passive_checkpoint(self._db)

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- state --------------------------------------------------------------------------------------------
    def _state(self, entity: str, key: str) -> _EntityState:
        """An entity's state: every state is loaded at once on the first miss (:meth:`preload`; the events table
        has no per-entity index, which would cost most of each commit), after which a miss is a new entity."""
        cached = self._cache.get((entity, key))
        if cached is not None:
            return cached
        if not self._loaded_all:
            self.preload()
            cached = self._cache.get((entity, key))
            if cached is not None:
                return cached
        state = self._cache[(entity, key)] = _EntityState(values={c: array("d") for c in self._columns[entity]})
        return state

    def _forget(self) -> None:
        """Drop the in-memory state (reloaded from SQLite on next use) after a failed write."""
        self._cache.clear()
        self._owners.clear()
        self._pending.clear()
        self._pending_complete = False
        self._loaded_all = False
        self._staged_deletes.clear()  # rows left on disk are pruned again when loaded: keeping them is safe

    def _append_stored(self, state: _EntityState, entity: str, key: str, row: Sequence[Any]) -> None:
        """Add one stored event (seq, event_id, t, vals, label, at) to an entity's in-memory state."""
        seq, event_id, t, vals, label, at = row
        decoded = json.loads(vals)
        state.append(t, event_id, {c: _number(decoded.get(c)) for c in state.values},
                     0.0 if label is None else float(label), 2**62 if at is None else int(at), seq)
        if event_id is not None:
            self._owners[event_id] = (*self._owners.get(event_id, ()), state)

    def preload(self) -> int:
        """Load every entity's state into memory in one ordered pass; returns how many entities.

        A service calls it at start; a store that did not is loaded whole on its first request. Each loaded
        state is pruned as it would have been in memory (rows at or before its newest time - horizon), so rows
        whose deletion had not reached disk yet change nothing.
        """
        with self._lock:
            rows = self._db.execute(
                "select e.entity, e.key, e.seq, e.event_id, e.t, e.vals, l.label, l.at from events e left join"
                " labels l on l.event_id = e.event_id order by e.entity, e.key, e.t, e.seq"
            ).fetchall()
            loaded: dict[tuple[str, str], _EntityState] = {}
            for entity, key, *row in rows:
                if entity not in self._columns or (entity, key) in self._cache:
                    continue
                state = loaded.get((entity, key))
                if state is None:
                    state = loaded[(entity, key)] = _EntityState(values={c: array("d") for c in self._columns[entity]})
                self._append_stored(state, entity, key, row)
            self._cache.update(loaded)
            staging, self._staging = self._staging, True  # deletes of rows left on disk: with the next commit
            try:
                for (entity, key), state in loaded.items():
                    self._prune(entity, key, state)
            finally:
                self._staging = staging
            for (entity, _), state in self._cache.items():  # prefix sums now, not on each entity's first request
                state.prefix()
                if entity in self._label_entities and state.late_label != _NEVER_LABELLED:
                    state.label_prefix()
            owners = self._owners
            self._pending = {
                event_id: (float(label), int(at))
                for event_id, label, at in self._db.execute("select event_id, label, at from labels")
                if event_id not in owners
            }
            self._pending_complete = True
            self._loaded_all = True
            return len(loaded)

    def _event_time(self, event: Mapping[str, Any]) -> int:
        assert self.timestamp is not None
        return _time_ns(event.get(self.timestamp), self.timestamp)

    def _event_id(self, event: Mapping[str, Any]) -> str | None:
        if self.id_column is None or event.get(self.id_column) is None:
            return None
        return _key(event[self.id_column])

    def _entity_key(self, event: Mapping[str, Any], entity: str) -> str:
        if entity not in event:
            raise FeatureError(
                f"The event has no {entity!r}, the entity of feature "
                f"{next(d.name for d in self._windows if d.entity == entity)!r}.",
                hint="Send every entity column the [features.windows] blocks group by.",
            )
        return _key(event[entity])

    # --- public API -----------------------------------------------------------------------------------------
    def update(self, event: Mapping[str, Any]) -> None:
        """Add an event to its entities' state (write-through to SQLite, one transaction)."""
        self.update_many([event])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[OnlineStore]:
        """Group updates and labels into one SQLite transaction (nested calls join the outer one).

        On an error everything since the outermost ``transaction()`` is rolled back and the in-memory cache is
        dropped, so memory and disk never disagree.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            self._db.execute("begin")
            self._depth = 1
            try:
                yield self
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                self._forget()
                raise
            finally:
                self._depth = 0

    def update_many(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Add events in order, in one transaction; return how many were added."""
        added = 0
        with self.transaction():
            for event in events:
                self._add(event)
                added += 1
        return added

    def _known_label(self, event_id: str) -> tuple[float, int] | None:
        """The label already recorded for an event entering a state, without a query when memory knows it."""
        pending = self._pending.get(event_id)
        if pending is not None:
            return pending
        for state in self._owners.get(event_id, ()):  # the event is in another entity's window: its label is there
            i = state.ids.index(event_id)
            if state.label_at[i] != _NO_LABEL_AT:
                return state.labels[i], state.label_at[i]
            if self._pending_complete:
                return None
        if self._pending_complete:
            return None
        row = self._db.execute("select label, at from labels where event_id = ?", (event_id,)).fetchone()
        return None if row is None else (float(row[0]), int(row[1]))

    def _vals_text(self, entity: str, vals: Mapping[str, float]) -> str:
        """``json.dumps`` of an event's stored values (NaN as null), by hand for finite floats."""
        parts = []
        for c, name in self._vals_json[entity]:
            v = vals[c]
            if v != v:
                parts.append(f"{name}: null")
            elif v in (math.inf, -math.inf):
                parts.append(f"{name}: {json.dumps(v)}")
            else:
                parts.append(f"{name}: {v!r}")
        return "{" + ", ".join(parts) + "}"

    def _vals_texts(self, entity: str, columns: Sequence[Sequence[float]], n: int) -> list[str]:
        """:meth:`_vals_text` of ``n`` events given as value columns (finite floats or NaN)."""
        names = self._vals_json[entity]
        if not names:
            return ["{}"] * n
        if all(all(map(eq, column, column)) for column in columns):  # no NaN: one %-format per event
            template = "{" + ", ".join(name.replace("%", "%%") + ": %r" for _, name in names) + "}"
            return list(map(template.__mod__, columns[0] if len(columns) == 1 else zip(*columns, strict=True)))
        parts = [[f"{name}: null" if v != v else f"{name}: {v!r}" for v in column]
                 for (_, name), column in zip(names, columns, strict=True)]
        if len(parts) == 1:
            return ["{" + p + "}" for p in parts[0]]
        return ["{" + ", ".join(p) + "}" for p in zip(*parts, strict=True)]

    def _add(self, event: Mapping[str, Any], seen: list[Any] | None = None) -> None:
        """Add an event to its entities' state; ``seen`` is what :meth:`_compute` just saw of it (same lock
        hold, nothing changed since), else everything is looked up here."""
        if not self._windows:
            return
        if seen:
            t, event_id, *parts = seen
        else:
            t = self._event_time(event)
            event_id = self._event_id(event)
            parts = [(entity, key, self._state(entity, key), None)
                     for entity, key in ((e, self._entity_key(event, e)) for e in self._entities)]
        known: tuple[float, int] | None = None
        looked = False
        for entity, key, state, vals in parts:
            if event_id is not None and event_id in state.id_set:
                continue  # idempotent: the same event twice counts once
            if vals is None:
                vals = {c: _number(event.get(c)) for c in self._columns[entity]}
            if event_id is not None and not looked:  # one look-up per event, whatever the number of entities
                known = self._known_label(event_id)
                looked = True
            seq = self._next_seq
            self._next_seq = seq + 1
            i = state.insert(t, event_id, vals, seq)
            row = (seq, entity, key, event_id, t, self._vals_text(entity, vals))
            if self._staging:  # with the next commit_staged
                self._staged.append(row)
                self._staged_seqs.add(seq)
            else:
                self._db.execute(_INSERT, row)
            if event_id is not None:
                self._owners[event_id] = (*self._owners.get(event_id, ()), state)
                self._pending.pop(event_id, None)
                if known is not None:
                    state.set_label(i, known[0], known[1])
            times = state.times
            if times[0] <= times[-1] - self._horizon[entity]:  # else _prune has nothing to drop
                self._prune(entity, key, state)

    def _prune(self, entity: str, key: str, state: _EntityState) -> None:
        """Drop the events no window can reach any more: at or before the newest event's time - horizon."""
        times = state.times
        before = times[-1] - self._horizon[entity]
        if times[0] <= before:
            k = bisect.bisect_right(times, before)
            ids, seqs, label_at = state.ids[:k], state.seqs[:k], state.label_at[:k]
            labels = state.labels[:k] if label_at.count(_NO_LABEL_AT) != k else None
            state.drop_first(k)
            self._drop_rows(seqs)
            self._disown(state, ids, labels, label_at)

    def _disown(self, state: _EntityState, ids: list[str | None], labels: Sequence[float] | None,
                label_at: Sequence[int]) -> None:
        """``state`` no longer holds the events ``ids``: take it out of their owners; an event no state holds any
        more goes back to waiting with its label (``labels``: None when none has one), as it may be sent again."""
        owners = self._owners
        held = list(map(owners.get, ids))
        if None not in held:  # the usual case, as C-level maps: every event has owners
            lens = list(map(len, held))
            last = list(map(eq, lens, repeat(1)))  # this state was the last to hold the event
            shared = list(map(not_, last))
            if set(lens) <= {1, 2}:
                alone = list(compress(held, last))
                pairs = list(compress(held, shared))
                if all(map(is_, map(getitem, alone, repeat(0)), repeat(state))):
                    for at, rest in ((0, slice(1, None)), (1, slice(0, 1))):  # held by two: the other one stays
                        if all(map(is_, map(getitem, pairs, repeat(at)), repeat(state))):
                            owners.update(zip(compress(ids, shared), map(getitem, pairs, repeat(rest)),
                                              strict=True))
                            _consume(map(owners.__delitem__, compress(ids, last)))
                            if labels is not None:
                                for old, label, at_ns, gone in zip(ids, labels, label_at, last, strict=True):
                                    if gone and at_ns != _NO_LABEL_AT:
                                        self._pending[old] = (label, at_ns)
                            return
        for old, label, at_ns in zip(ids, repeat(0.0) if labels is None else labels, label_at, strict=False):
            if old is not None and old in owners:
                rest = tuple(o for o in owners[old] if o is not state)
                if rest:
                    owners[old] = rest
                else:
                    del owners[old]
                    if at_ns != _NO_LABEL_AT:  # back to waiting: the event may be sent again
                        self._pending[old] = (label, at_ns)

    def _drop_rows(self, seqs: Sequence[int]) -> None:
        """Delete the rows of events memory dropped (housekeeping: a load prunes them again anyway). A row still
        staged is never written; one the latest commit took is deleted with the next commit; any other is deleted
        now, or after the next commit's inserts when staging."""
        staged, in_flight = self._staged_seqs, self._in_flight
        if staged.isdisjoint(seqs) and in_flight.isdisjoint(seqs):  # rows written before the latest commit
            gone = list(zip(seqs))
        else:  # (staged and in-flight seqs never meet: a commit takes every staged seq)
            skip = staged.intersection(seqs)
            staged -= skip
            self._skipped |= skip
            flying = list(map(in_flight.__contains__, seqs))
            self._staged_deletes.extend(zip(compress(seqs, flying)))
            kept = map(not_, map(skip.__contains__, seqs))
            gone = list(zip(compress(seqs, map(and_, kept, map(not_, flying)))))
        if gone:
            if self._staging:
                self._staged_deletes.extend(gone)
            else:
                self._db.executemany(_DELETE, gone)

    def stage(self, event: Mapping[str, Any]) -> None:
        """Add an event to its entities' in-memory state now; its rows reach SQLite with the next
        :meth:`commit_staged` (group commit: one transaction for every event staged meanwhile).

        A service stages each event before answering and answers only after a commit that holds it, so an
        answered event is on disk, at a fraction of one transaction per event under concurrent load.
        """
        with self._lock:
            self._staging = True
            try:
                self._add(event)
            finally:
                self._staging = False

    def commit_staged(self, *, deletes: bool = False) -> int:
        """Write every staged row in one transaction on a connection of its own (one ``executemany`` for the
        inserts, then one for the deletes of rows memory has dropped, once :attr:`DELETE_ROWS` are due or with
        ``deletes=True``); return how many rows were written. A few rows without deletes go in one INSERT
        statement, its own transaction.

        Thread-safe, and it holds the store's lock only to take the staged rows, so
        features keep being computed while SQLite writes. A staged row whose event was pruned before the
        commit is not written at all (a load would prune it again). On a failure the in-memory state is dropped
        (it is reloaded from disk on next use, so memory and disk never disagree) and the error is raised.
        """
        flush = deletes
        with self._writer_lock:
            with self._lock:
                taken, self._staged = self._staged, []
                blocks, self._staged_blocks = self._staged_blocks, []
                if flush or len(self._staged_deletes) >= self.DELETE_ROWS:
                    deletes, self._staged_deletes = self._staged_deletes, []
                else:
                    deletes = []
                self._in_flight, self._staged_seqs = self._staged_seqs, set()
                skipped, self._skipped = self._skipped, set()
            live = taken
            for first, entity, keys, ids, times, columns in blocks:
                n = len(keys)
                live += zip(range(first, first + n), repeat(entity, n), keys, ids, times,
                            self._vals_texts(entity, columns, n), strict=True)
            if skipped:
                live = [row for row in live if row[0] not in skipped]
            if not live and not deletes:
                return 0
            if self._writer is None:
                self._writer = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
                self._writer.execute("pragma synchronous=normal")
                self._writer.execute("pragma busy_timeout=10000")
                # No checkpoint inside a commit: a service commits on its event loop, and copying the log into
                # the database file (with an fsync) stalled a request for up to 22 ms once per ~200 commits.
                self._writer.execute("pragma wal_autocheckpoint=0")
                self._checkpointer = _Checkpointer(self.path, self.CHECKPOINT_ROWS)
            db = self._writer
            try:
                if not deletes and len(live) <= _ONE_STATEMENT:
                    try:
                        db.execute(_INSERTS[len(live)], [v for row in live for v in row])
                    except sqlite3.IntegrityError:  # (nothing written: one statement)
                        db.execute("begin immediate")
                        self._write_renumbered(db, live)
                        db.execute("commit")
                    if self._checkpointer is not None:
                        self._checkpointer.wrote(len(live))
                    return len(live)
                db.execute("begin immediate")
                try:
                    if live:
                        execute_chunked(db, _INSERT, _INSERT_MANY, live, _INSERT_ROWS)
                except sqlite3.IntegrityError:  # another store wrote these seqs to the same file meanwhile
                    db.execute("rollback")  # (the rows before the clash were inserted)
                    db.execute("begin immediate")
                    self._write_renumbered(db, live)
                    deletes = []  # the reload prunes those rows again
                if deletes:  # after the inserts: a seq freed here is not handed out again in this commit
                    execute_chunked(db, _DELETE, _DELETE_MANY, deletes, _PARAMS)
                db.execute("commit")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("rollback")
                with self._lock:
                    self._forget()
                raise
            if self._checkpointer is not None:
                self._checkpointer.wrote(len(live) + len(deletes))
            return len(live) + len(deletes)

    def _write_renumbered(self, db: sqlite3.Connection, live: list[tuple[Any, ...]]) -> None:
        """Insert ``live`` after the last row on disk, in the open transaction, when their seqs were taken by
        another writer of the file; memory is then dropped and reloaded from disk on next use (so its seqs, and
        the other writer's events, match the file)."""
        base = int(db.execute("select coalesce(max(seq), 0) + 1 from events").fetchone()[0])
        db.executemany(_INSERT, [(base + i, *row[1:]) for i, row in enumerate(live)])
        with self._lock:
            self._next_seq = max(self._next_seq, base + len(live))
            self._forget()

    def add_label(self, event_id: Any, label: float, at: datetime | pd.Timestamp | str) -> bool:
        """Record that ``event_id``'s label became known at ``at``; return whether the event is in the store.

        The label counts in label-based aggregates of events at or after ``at`` (and only while the labelled
        event is inside their delayed window).
        """
        key = _key(event_id)
        at_ns = _time_ns(at, "at")
        value = float(label)
        with self.transaction():
            self._db.execute(
                "insert into labels (event_id, label, at) values (?, ?, ?) on conflict(event_id)"
                " do update set label = excluded.label, at = excluded.at",
                (key, value, at_ns),
            )
            found = False
            for state in self._owners.get(key, ()):
                for i, stored in enumerate(state.ids):
                    if stored == key:
                        state.set_label(i, value, at_ns)
                        found = True
            if found:
                self._pending.pop(key, None)
            else:  # the event comes later (or comes back): it finds its label in memory
                self._pending[key] = (value, at_ns)
            return found

    def features(self, event: Mapping[str, Any]) -> FeatureRow:
        """The feature values for ``event`` at its own time, exactly as the offline table computes them."""
        with self._lock:
            values, stale, unknown = self._compute(event)
        return FeatureRow(dict(zip(self._names, values, strict=True)), stale, unknown)

    def _compute(self, event: Mapping[str, Any], seen: list[Any] | None = None
                 ) -> tuple[list[float], list[str], list[str]]:
        """(feature values in ``feature_names`` order, stale entities, unknown entities); hold the lock.

        ``seen`` (a list) receives what :meth:`_add` needs to stage the event right after without looking it up
        again: ``[t, event_id, (entity, key, state, current values or None when stored), ...]``.
        """
        out: dict[str, float] = {}
        stale: list[str] = []
        unknown: list[str] = []
        for d in self._raw:
            out[d.name] = _number(event.get(d.column))
        for r in self._rows:
            out[r.name] = row_value(r, event.get(r.column))
        if self._windows:
            t = self._event_time(event)
            event_id = self._event_id(event)
            if seen is not None:
                seen += (t, event_id)
            fresh = self._freshness_ns
            scaled: dict[str, tuple[int, int] | None] = {}  # the event's values, scaled once for every window
            for entity in self._entities:
                value = event.get(entity, _MISSING)
                key = self._entity_key(event, entity) if value is _MISSING else (
                    value if type(value) is str else _key(value))
                state = self._cache.get((entity, key)) or self._state(entity, key)
                if not state.times:
                    unknown.append(entity)
                elif fresh is not None and t - state.times[-1] > fresh:
                    stale.append(entity)
                own = None
                if event_id is not None and event_id in state.id_set:
                    own = state.ids.index(event_id)
                current = None
                if own is None:
                    current = {c: _number(event.get(c)) for c in self._columns[entity]}
                for plan in self._plans[entity]:
                    _window_group(state, plan, t, current, own, out, scaled)
                if seen is not None:
                    seen.append((entity, key, state, current))
        for q in self._ratios:
            num = out[q.numerator] if q.numerator in out else _number(event.get(q.numerator))
            den = out[q.denominator] if q.denominator in out else _number(event.get(q.denominator))
            out[q.name] = float(ratio_feature(num, den))
        return [out[name] for name in self._names], stale, unknown

    def features_many(self, events: Sequence[Mapping[str, Any]], *, stage: bool = False) -> FeatureBatch:
        """Features of events as if each were sent alone, in order: ``features(e)`` then (``stage=True``)
        :meth:`stage` ``(e)`` for each, so an event sees the earlier events of the same call.

        One lock hold and one pass for the whole sequence; the values are those :meth:`features` returns
        (bit for bit), as a float64 matrix in :attr:`feature_names` order. An event whose features cannot be
        computed gets a NaN row, ``failed[i]`` set and is not staged (as a service does with a single event);
        a failed staging is reported in ``errors`` and does not stop the others.

        With ``stage=True`` and at least 32 events, a batch that only appends to its entities' states (in time
        order per entity, no event stored or sent twice, no label waiting for its event) is computed as a whole
        (:mod:`keel.features.online_batch`: array searches over every event at once); any other batch is
        replayed event by event.
        """
        with self._lock:
            if stage and len(events) >= _BATCH_MIN and self._windows:
                from keel.features.online_batch import features_batch

                batch = features_batch(self, events)
                if batch is not None:
                    return batch
            return self._replay(events, stage)

    def features_columns(self, cols: Mapping[str, Any], *, stage: bool = True) -> FeatureBatch:
        """:meth:`features_many` of a column batch, the same result bit for bit (matrix, flags, errors, staged
        rows): ``cols`` maps the event fields to columns of equal length, the timestamp as a ``datetime64``
        array (naive UTC), float fields as float64 arrays and every other field as a list of its values.

        The columns go to the batch path without a dict per event; a batch it cannot take (see
        :meth:`features_many`) is replayed event by event on its row view (the timestamp as ``datetime``).
        """
        n = _batch_length(cols)
        with self._lock:
            if stage and n >= _BATCH_MIN and self._windows:
                from keel.features.online_batch import columns_batch

                batch = columns_batch(self, n, cols)
                if batch is not None:
                    return batch
            return self._replay(row_view(n, cols, self.timestamp), stage)

    def _replay(self, events: Sequence[Mapping[str, Any]], stage: bool) -> FeatureBatch:
        """:meth:`features_many` event by event; hold the lock."""
        n = len(events)
        rows: list[list[float]] = []
        stale = np.zeros(n, dtype=bool)
        failed = np.zeros(n, dtype=bool)
        errors: list[tuple[int, str, Exception]] = []
        nan_row = [math.nan] * len(self._names)
        for i, event in enumerate(events):
            seen: list[Any] | None = [] if stage else None
            try:
                values, st, _ = self._compute(event, seen)
            except Exception as exc:
                rows.append(nan_row)
                failed[i] = True
                errors.append((i, "features", exc))
                continue
            rows.append(values)
            stale[i] = bool(st)
            if stage:
                self._staging = True
                try:
                    self._add(event, seen)
                except Exception as exc:
                    errors.append((i, "update", exc))
                finally:
                    self._staging = False
        matrix = np.array(rows, dtype=np.float64).reshape(n, len(self._names))
        return FeatureBatch(matrix, stale, failed, errors)

    @property
    def feature_names(self) -> list[str]:
        """The column order of :meth:`features_many` matrices."""
        return list(self._names)

    def entity_count(self) -> int:
        """How many entity states the store holds (all entity columns together)."""
        with self._lock:
            row = self._db.execute(
                "select count(*) from (select distinct entity, key from events)"
            ).fetchone()
        return int(row[0])


__all__ = ["FeatureBatch", "FeatureRow", "OnlineStore", "row_view"]
