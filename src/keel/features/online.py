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
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import compress, repeat
from operator import and_, eq, getitem, itemgetter, not_
from pathlib import Path
from typing import Any

import numpy as np
import orjson
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
from keel.features.offline import ratio_feature, row_value, to_ns
from keel.features.online_pool import NO_LABEL_AT, Pool, window_group
from keel.sqlbatch import execute_chunked

_SCHEMA = """
create table if not exists meta (k text primary key, v text not null);
create table if not exists events (
    seq integer primary key,
    entity text not null, key text not null, event_id text, t integer not null, vals text not null
);
drop index if exists events_by_entity;
create table if not exists labels (event_id text primary key, label real not null, at integer not null);
create table if not exists blocks (
    first integer primary key, n integer not null, entity text not null, cols text not null, rows text not null,
    offs text
);
"""
# A batch's rows of one entity are one ``blocks`` row (seqs ``first .. first + n - 1``): ``cols`` the value columns'
# names, ``rows`` a JSON array of ``[key, event id, t, value...]`` (NaN as null), ``offs`` NULL; once memory
# dropped most of them, the rows still held are written again alone, ``offs`` their offsets from ``first``. A
# commit writes one row per entity and batch instead of a row per event (executemany's binding and B-tree inserts
# were ~20% of the serving process's CPU on /v1/predict/batch).
_INSERT_BLOCK = "insert into blocks (first, n, entity, cols, rows) values (?, ?, ?, ?, ?)"
_DELETE_BLOCK = "delete from blocks where first = ?"
_MAX_SEQ = ("select max(coalesce((select max(seq) from events), 0),"
            " coalesce((select first + n - 1 from blocks order by first desc limit 1), 0))")
# a block written again with only its rows at the positions ?1 (JSON) of what it stores, at offsets ?2: SQLite
# filters the rows' JSON (in C, without the GIL) and copies each kept row's text as it is
_THIN_BLOCK = ("update blocks set rows = (select json_group_array(json(value)) from (select j.value from"
               " json_each(blocks.rows) j where j.key in (select value from json_each(?1)) order by j.key)),"
               " offs = ?2 where first = ?3")
# Seqs a store reserves in the file (meta ``next_seq``) when it first needs one: two stores of one file never hand
# out the same seq, so neither a row nor a block of one can take the place of the other's (2**63 / 2**40: eight
# million reservations)
_SEQ_RANGE = 2**40
_THIN = 4  # a block with at most 1/_THIN of its stored rows alive is written again without the others
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
_DELETE_LABEL = "delete from labels where event_id = ? and at = ?"
_DELETE_MANY = "delete from events where seq in (" + ", ".join("?" * _PARAMS) + ")"


_EPOCH = datetime(1970, 1, 1)
_NO_LABEL_AT = NO_LABEL_AT  # label_at of an event without a label
_ONE_US = timedelta(microseconds=1)
_MISSING = object()
_consume = deque(maxlen=0).extend  # runs an iterator (of C-level ``map`` calls) to its end
_BATCH_MIN = 32  # features_many(stage=True) of at least this many events tries the batch path (online_batch)


def _spans(first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The positions of the ranges ``[first[j], stop[j])``, one after another."""
    size = stop - first
    return np.repeat(first - np.cumsum(size) + size, size) + np.arange(int(size.sum()), dtype=np.int64)


class _Blocks:
    """The store's blocks (on disk or staged: seqs ``first .. first + n - 1``) and which of their rows memory still
    holds. Memory dropping a block's row only marks it here: a block none of whose rows is left is deleted with the
    next commit, and one with at most 1/_THIN of the rows it stores left is written again with those alone (so
    the file holds at most _THIN times the rows memory does, and a rewrite is paid once per _THIN-fold shrink)."""

    def __init__(self) -> None:
        self.alive: dict[int, np.ndarray] = {}  # first -> bool per row
        self.count: dict[int, int] = {}  # first -> rows alive
        self.offsets: dict[int, np.ndarray | None] = {}  # first -> the offsets of the rows it stores (None: all)
        self.firsts: list[int] = []  # sorted
        self.ends: list[int] = []  # first + n, in the same order
        self.dead: set[int] = set()
        self.thin: set[int] = set()
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, first: int, n: int, offsets: Sequence[int] | None = None) -> None:
        """Track a block of seqs ``first .. first + n - 1`` that stores the rows at ``offsets`` (all if None)."""
        i = bisect.bisect_right(self.firsts, first)
        self.firsts.insert(i, first)
        self.ends.insert(i, first + n)
        if offsets is None:
            self.alive[first] = np.ones(n, dtype=bool)
        else:
            self.alive[first] = np.zeros(n, dtype=bool)
            self.alive[first][np.asarray(offsets, dtype=np.int64)] = True
        self.count[first] = int(np.count_nonzero(self.alive[first]))
        self.offsets[first] = None if offsets is None else np.flatnonzero(self.alive[first])
        if not self.count[first]:
            self.dead.add(first)
        self._arrays = None

    def remove(self, first: int) -> None:
        i = bisect.bisect_left(self.firsts, first)
        if i < len(self.firsts) and self.firsts[i] == first:
            del self.firsts[i], self.ends[i]
            del self.alive[first], self.count[first], self.offsets[first]
            self.dead.discard(first)
            self.thin.discard(first)
            self._arrays = None

    def drop(self, seqs: Sequence[int]) -> list[int]:
        """Mark the rows of ``seqs`` that are in blocks as dropped; return the other seqs (rows of the events
        table), in order."""
        firsts = self.firsts
        if not firsts:
            return list(seqs)
        if len(seqs) <= 16:  # the single-event path: a row or two per call
            rest = []
            for seq in seqs:
                i = bisect.bisect_right(firsts, seq) - 1
                if i >= 0 and seq < self.ends[i]:
                    self._mark(firsts[i], seq - firsts[i])
                else:
                    rest.append(seq)
            return rest
        if self._arrays is None:
            self._arrays = np.array(firsts, dtype=np.int64), np.array(self.ends, dtype=np.int64)
        first, end = self._arrays
        arr = np.asarray(seqs, dtype=np.int64)
        at = np.searchsorted(first, arr, side="right") - 1
        inside = at >= 0
        inside[inside] = arr[inside] < end[at[inside]]
        if not inside.any():
            return list(seqs)
        hits, which = arr[inside], at[inside]
        order = np.argsort(which, kind="stable")
        hits, which = hits[order], which[order]
        cuts = np.flatnonzero(which[1:] != which[:-1]) + 1
        for part in np.split(np.arange(len(hits)), cuts):
            f = int(first[which[part[0]]])
            self._mark(f, hits[part] - f)
        return arr[~inside].tolist()

    def _mark(self, first: int, offsets: Any) -> None:
        alive = self.alive[first]
        if isinstance(offsets, int):  # the single-event path: one row (a numpy call costs more than the work)
            if not alive[offsets]:
                return
            newly = 1
        else:
            newly = int(np.count_nonzero(alive[offsets]))
            if not newly:
                return
        alive[offsets] = False
        left = self.count[first] - newly
        self.count[first] = left
        if left == 0:
            self.dead.add(first)
            self.thin.discard(first)
        elif left * _THIN <= self.stored(first):
            self.thin.add(first)

    def stored(self, first: int) -> int:
        """How many rows the block stores on disk."""
        offsets = self.offsets[first]
        return len(self.alive[first]) if offsets is None else len(offsets)

    def take(self) -> tuple[list[int], list[tuple[int, np.ndarray, np.ndarray]]]:
        """The blocks to delete (no longer tracked) and those to write again with the rows memory holds: their
        offsets (from now on what they store) and those rows' positions in what they store now."""
        dead = sorted(self.dead)
        thin = []
        for first in sorted(self.thin):
            keep, stored = np.flatnonzero(self.alive[first]), self.offsets[first]
            thin.append((first, keep, keep if stored is None else np.searchsorted(stored, keep)))
            self.offsets[first] = keep
        for first in dead:
            self.remove(first)
        self.thin = set()
        return dead, thin


def stored_rows(db: sqlite3.Connection) -> list[tuple[int, str, str, str | None, int, str]]:
    """Every event row a store's file holds, rows of the events table and of blocks alike, in seq order, as the
    events table has them: ``(seq, entity, key, event id, t, values as JSON text)`` (NaN as null)."""
    out = list(db.execute("select seq, entity, key, event_id, t, vals from events"))
    for first, entity, cols, text, offs in db.execute("select first, entity, cols, rows, offs from blocks"):
        names, rows = orjson.loads(cols), orjson.loads(text)
        for i, row in zip(range(len(rows)) if offs is None else orjson.loads(offs), rows, strict=True):
            out.append((first + i, entity, row[0], row[1], row[2], json.dumps(dict(zip(names, row[3:], strict=True)))))
    return sorted(out, key=itemgetter(0))


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

    Under steady traffic a commit always lands while the checkpoint copies, so the log was never wholly copied when
    the next write began and SQLite never restarted it: it grew by every commit (88 MB after 20,000 single
    events). So once the log holds ``restart_pages`` pages, the few pages committed while the bulk was copied are
    copied holding ``writer_lock`` (the store's commits wait for it: 4-6 ms with its fsyncs, measured), and the
    next commit writes the log from its start again.
    """

    def __init__(self, path: Path, rows: int, writer_lock: Any = None, restart_pages: int = 8192) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("pragma busy_timeout=10000")
        self._writer_lock = writer_lock
        self._restart_pages = restart_pages
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
            done = _passive_checkpoint(self._db)
            if self._writer_lock is not None and not done[0] and done[1] >= self._restart_pages:
                with self._writer_lock:  # the pages committed while the bulk was copied: a short copy, or none
                    done = _passive_checkpoint(self._db)
            return done

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


class OnlineStore:
    """Per-entity feature state for serving, in SQLite (WAL) with a write-through in-memory cache.

    Parameters: ``path`` of the SQLite file; ``definitions`` from
    :func:`~keel.features.definitions.resolve_definitions`; ``timestamp``/``label``/``id_column`` name the event
    fields; ``freshness`` flags entity state older than this (``None``: never stale). Thread-safe (one lock).
    """

    # Rows written (inserted or deleted) by commit_staged between two background checkpoints of the log.
    CHECKPOINT_ROWS = 5_000
    # Log pages (4 KiB) past which a background checkpoint also copies the pages committed while it ran, holding
    # the writer's lock, so that SQLite restarts the log (see _Checkpointer): it stays near 32 MiB under any traffic.
    WAL_RESTART_PAGES = 8192
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
        self._raw = [d for d in self.definitions if isinstance(d, RawDefinition)]
        self._rows = [d for d in self.definitions if isinstance(d, RowDefinition)]
        self._ratios = [d for d in self.definitions if isinstance(d, RatioDefinition)]
        self._freshness_ns = None if freshness is None else to_ns(freshness)
        self._vals_json = {e: [(c, json.dumps(c)) for c in cols] for e, cols in self._columns.items()}
        # Labels whose event is in no in-memory entity state (labels that came before their event, or after it left
        # every state; a label its event held when it left is forgotten, see _disown):
        # a new event finds its label here instead of querying SQLite. Complete only once every entity's state is
        # in memory (after preload); until then a miss falls back to the labels table.
        self._pending: dict[str, tuple[float, int]] = {}
        self._pending_complete = False
        self._horizon = {
            e: max(to_ns(d.horizon) for d in self._windows if d.entity == e) for e in self._entities
        }
        if self._windows and not timestamp:
            raise FeatureError("Window features need an event time, but no timestamp column was given.")
        # Every entity column's states in one pool (online_pool: column arrays, a slot per entity key)
        self._pools: dict[str, Pool] = {e: Pool(self._columns[e]) for e in self._entities}
        # event id -> the in-memory states holding it (one per entity column), each as an owner code
        # ``slot * len(entities) + the entity's index`` (see _owner)
        self._owners: dict[str, tuple[int, ...]] = {}
        self._entity_index = {e: i for i, e in enumerate(self._entities)}
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
        self._staged_seqs: set[int] = set()  # seqs of the rows in _staged
        self._block_index = _Blocks()  # the blocks on disk and in _staged_blocks
        self._skipped: set[int] = set()  # staged rows memory dropped before their commit: never written
        # seqs the latest commit took (being written, or written): dropped, they are deleted with the next commit
        self._in_flight: set[int] = set()
        self._staged_deletes: list[tuple[int]] = []  # seqs of written rows memory has dropped
        # labels of events that can never count again (event id -> known at), deleted with the row deletes
        self._staged_label_deletes: dict[str, int] = {}
        self._loaded_all = False  # every entity's state is in memory (preload ran)
        self._writer: sqlite3.Connection | None = None
        self._writer_lock = threading.Lock()
        self._checkpointer: _Checkpointer | None = None
        self._check_definitions()
        self._next_seq = self._seq_end = 0  # no seqs reserved yet (see _seqs)

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
    def _state(self, entity: str, key: str) -> int:
        """An entity's state (its slot in the entity column's pool): every state is loaded at once on the first
        miss (:meth:`preload`; the events table has no per-entity index, which would cost most of each commit),
        after which a miss is a new entity (an empty state)."""
        slot = self._pools[entity].index.get(key)
        if slot is not None:
            return slot
        if not self._loaded_all:
            self.preload()
        return self._pools[entity].slot(key)

    def _owner(self, entity: str, slot: int) -> int:
        """The owner code of a state in :attr:`_owners`."""
        return slot * len(self._entities) + self._entity_index[entity]

    def _owned(self, code: int) -> tuple[Pool, int]:
        """The pool and slot of an owner code."""
        slot, e = divmod(code, len(self._entities))
        return self._pools[self._entities[e]], slot

    def _forget(self) -> None:
        """Drop the in-memory state (reloaded from SQLite on next use) after a failed write."""
        self._pools = {e: Pool(self._columns[e]) for e in self._entities}
        self._owners.clear()
        self._pending.clear()
        self._pending_complete = False
        self._loaded_all = False
        self._staged_deletes.clear()  # rows left on disk are pruned again when loaded: keeping them is safe
        self._staged_label_deletes.clear()  # (labels left on disk wait for their events again: safe too)
        self._seq_end = 0  # (a rolled-back transaction may have taken the reservation back: reserve again)
        self._block_index = _Blocks()  # (the load registers the blocks on disk again)
        for first, _, keys, *_ in self._staged_blocks:
            self._block_index.add(first, len(keys))

    def preload(self) -> int:
        """Load every entity's state into memory in one pass over the events table and the blocks; returns how
        many entities.

        A service calls it at start; a store that did not is loaded whole on its first request. Each loaded
        state is pruned as it would have been in memory (rows at or before its newest time - horizon), so rows
        whose deletion had not reached disk yet change nothing.
        """
        with self._lock:
            labels = {event_id: (float(label), int(at))
                      for event_id, label, at in self._db.execute("select event_id, label, at from labels")}
            found: dict[str, tuple[list[str], list[int], list[str | None], list[int], list[list[float]]]] = {
                e: ([], [], [], [], [[] for _ in cols]) for e, cols in self._columns.items()}
            for entity, key, seq, event_id, t, vals in self._db.execute(
                    "select entity, key, seq, event_id, t, vals from events"):
                part = found.get(entity)
                if part is None:
                    continue
                keys, seqs, ids, times, columns = part
                keys.append(key)
                seqs.append(seq)
                ids.append(event_id)
                times.append(t)
                decoded = json.loads(vals)
                for c, column in zip(self._columns[entity], columns, strict=True):
                    column.append(_number(decoded.get(c)))
            for first, n, entity, cols, text, offs in self._db.execute(
                    "select first, n, entity, cols, rows, offs from blocks"):
                offsets = None if offs is None else orjson.loads(offs)
                if first not in self._block_index.alive:
                    self._block_index.add(first, n, offsets)
                part = found.get(entity)
                if part is None:
                    continue
                keys, seqs, ids, times, columns = part
                rows = orjson.loads(text)
                n = len(rows)
                keys += map(itemgetter(0), rows)
                ids += map(itemgetter(1), rows)
                times += map(itemgetter(2), rows)
                seqs += range(first, first + n) if offsets is None else (first + o for o in offsets)
                at = {c: 3 + j for j, c in enumerate(orjson.loads(cols))}
                for c, column in zip(self._columns[entity], columns, strict=True):
                    if c in at:
                        column += (math.nan if v is None else v for v in map(itemgetter(at[c]), rows))
                    else:
                        column += repeat(math.nan, n)
            loaded = 0
            owners = self._owners
            staging, self._staging = self._staging, True  # deletes of rows left on disk: with the next commit
            try:
                for entity, (keys, seqs, ids, times, columns) in found.items():
                    pool = self._pools[entity]
                    if pool.index:  # (states already in memory keep theirs)
                        fresh = [k not in pool.index for k in keys]
                        keys, seqs, ids, times = (list(compress(a, fresh)) for a in (keys, seqs, ids, times))
                        columns = [list(compress(c, fresh)) for c in columns]
                    if not keys:
                        continue
                    u = pool.slots(keys)
                    loaded += len(np.unique(u))
                    t_np, seq_np = np.array(times, dtype=np.int64), np.array(seqs, dtype=np.int64)
                    order = np.lexsort((seq_np, t_np, u))  # each state's events in (time, arrival) order
                    ids_sorted = [ids[i] for i in order.tolist()]
                    known = list(map(labels.get, ids_sorted))
                    pool.append(u[order], t_np[order],
                                {c: np.array(v, dtype=np.float64)[order]
                                 for c, v in zip(self._columns[entity], columns, strict=True)},
                                seq_np[order], ids_sorted,
                                np.array([0.0 if k is None else k[0] for k in known], dtype=np.float64),
                                np.array([_NO_LABEL_AT if k is None else k[1] for k in known], dtype=np.int64))
                    slots = np.unique(u)
                    first, stop = pool.prune(slots, pool.t[pool.end[slots] - 1] - self._horizon[entity])
                    dropped = _spans(first, stop)
                    if len(dropped):
                        self._drop_rows(pool.seq[dropped].tolist())
                    live = pool.rows(slots)
                    codes = np.repeat(slots * len(self._entities) + self._entity_index[entity],
                                      pool.end[slots] - pool.start[slots]).tolist()
                    for event_id, code in zip(pool.ids[live].tolist(), codes, strict=True):
                        if event_id is not None:
                            owners[event_id] = (*owners.get(event_id, ()), code)
                    # packed, with room in every state and spare rows at the tail: the first requests' inserts
                    # neither move regions nor regrow every row array
                    pool.compact()
            finally:
                self._staging = staging
            self._pending = {event_id: known for event_id, known in labels.items() if event_id not in owners}
            self._pending_complete = True
            self._loaded_all = True
            return loaded

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
        for code in self._owners.get(event_id, ()):  # the event is in another entity's window: its label is there
            pool, slot = self._owned(code)
            i = pool.find(slot, event_id)
            if i is not None and pool.label_at_view[i] != _NO_LABEL_AT:
                return pool.label_view[i], pool.label_at_view[i]
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
        owners = self._owners
        for entity, key, slot, vals in parts:
            pool = self._pools[entity]
            code = slot * len(self._entities) + self._entity_index[entity]
            if event_id is not None and code in owners.get(event_id, ()):
                continue  # idempotent: the same event twice counts once
            if vals is None:
                vals = {c: _number(event.get(c)) for c in self._columns[entity]}
            if event_id is not None and not looked:  # one look-up per event, whatever the number of entities
                known = self._known_label(event_id)
                looked = True
            seq = self._seqs(1)
            i = pool.insert(slot, t, vals, seq, event_id)
            row = (seq, entity, key, event_id, t, self._vals_text(entity, vals))
            if self._staging:  # with the next commit_staged
                self._staged.append(row)
                self._staged_seqs.add(seq)
            else:
                self._db.execute(_INSERT, row)
            if event_id is not None:
                owners[event_id] = (*owners.get(event_id, ()), code)
                self._pending.pop(event_id, None)
                if known is not None:
                    pool.set_label(slot, i, known[0], known[1])
            tv = pool.t_view
            if tv[pool.start_view[slot]] <= tv[pool.end_view[slot] - 1] - self._horizon[entity]:
                self._prune(entity, slot)  # (else nothing to drop)
            pool.tidy()  # (a compaction step: this call uses no position of this pool any more)

    def _prune(self, entity: str, slot: int) -> None:
        """Drop the events no window can reach any more: at or before the newest event's time - horizon."""
        pool = self._pools[entity]
        first, stop = pool.prune_one(slot, pool.t_view[pool.end_view[slot] - 1] - self._horizon[entity])
        code = self._owner(entity, slot)
        if stop - first == 1:  # the usual case once a state spans its horizon: each new event pushes one out
            self._drop_rows([pool.seq_view[first]])
            self._disown([code], [pool.ids[first]], [pool.label_at_view[first]])
        elif stop > first:
            self._drop_rows(pool.seq[first:stop].tolist())
            self._disown([code] * (stop - first), pool.ids[first:stop].tolist(), pool.label_at[first:stop].tolist())

    def _disown(self, mine: list[int], ids: list[str | None], label_at: Sequence[int]) -> None:
        """The states ``mine`` (owner codes, one per event) pruned the events ``ids``: take them out of their
        owners. An event no state holds any more can never count again (each of its states has moved a horizon past
        it, a state's newest time never goes back, so a copy sent again is pruned as it arrives): its label, if it
        has one (``label_at``), is forgotten, in memory and in the file (:meth:`_drop_labels`)."""
        owners = self._owners
        held = list(map(owners.get, ids)) if len(ids) > 4 else None  # (a few: the loop below is cheaper)
        if held is not None and None not in held:  # the usual case of a batch, as C-level maps: all have owners
            lens = list(map(len, held))
            last = list(map(eq, lens, repeat(1)))  # this state was the last to hold the event
            shared = list(map(not_, last))
            if set(lens) <= {1, 2}:
                alone = list(compress(held, last))
                pairs = list(compress(held, shared))
                ours = list(compress(mine, shared))
                if all(map(eq, map(getitem, alone, repeat(0)), compress(mine, last))):
                    for at, rest in ((0, slice(1, None)), (1, slice(0, 1))):  # held by two: the other one stays
                        if all(map(eq, map(getitem, pairs, repeat(at)), ours)):
                            owners.update(zip(compress(ids, shared), map(getitem, pairs, repeat(rest)),
                                              strict=True))
                            _consume(map(owners.__delitem__, compress(ids, last)))
                            if label_at.count(_NO_LABEL_AT) != len(label_at):
                                self._drop_labels([(old, at_ns) for old, at_ns, gone in zip(ids, label_at, last,
                                                                                           strict=True)
                                                   if gone and at_ns != _NO_LABEL_AT])
                            return
        dropped = []
        for old, code, at_ns in zip(ids, mine, label_at, strict=False):
            codes = owners.get(old)  # (None for an event without id)
            if codes is None:
                continue
            rest = () if codes == (code,) else tuple(o for o in codes if o != code)
            if rest:
                owners[old] = rest
            else:
                del owners[old]
                if at_ns != _NO_LABEL_AT:
                    dropped.append((old, at_ns))
        if dropped:
            self._drop_labels(dropped)

    def _drop_labels(self, labels: list[tuple[str, int]]) -> None:
        """Forget the labels ``(event id, known at)`` of events that can never count again: deleted from the file
        with the next commit's deletes when staging, else now (only that label: one recorded later stays)."""
        if self._staging:
            self._staged_label_deletes.update(labels)
        else:
            self._db.executemany(_DELETE_LABEL, labels)

    def _seqs(self, n: int) -> int:
        """The first of ``n`` fresh seqs (in arrival order), from the range this store reserved in the file."""
        first = self._next_seq
        if first + n > self._seq_end:
            first = self._reserve_seqs(n)
        self._next_seq = first + n
        return first

    def _reserve_seqs(self, n: int) -> int:
        """Reserve the next range of seqs in the file (in the open transaction if there is one: a rollback takes
        it back, and :meth:`_forget` makes the store reserve again); return its first."""
        db = self._db
        own = not db.in_transaction
        if own:
            db.execute("begin immediate")
        try:
            row = db.execute("select v from meta where k = 'next_seq'").fetchone()
            first = max(int(row[0]) if row else 0, int(db.execute(_MAX_SEQ).fetchone()[0]) + 1, self._next_seq)
            end = first + max(n, _SEQ_RANGE)
            db.execute("insert or replace into meta values ('next_seq', ?)", (str(end),))
            if own:
                db.execute("commit")
        except BaseException:
            if own:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("rollback")
            raise
        self._seq_end = end
        return first

    def _stage_block(self, first: int, entity: str, keys: list[str], ids: list[str | None], times: list[int],
                     columns: list[list[float]]) -> None:
        """Stage a batch's rows of one entity (seqs ``first`` on; value columns in ``_columns[entity]`` order,
        finite or NaN) as one block for the next commit."""
        self._staged_blocks.append((first, entity, keys, ids, times, columns))
        self._block_index.add(first, len(keys))

    def _unstage_blocks(self, staged: int) -> None:
        """Take back the blocks staged after the first ``staged`` (a batch undone)."""
        for first, *_ in self._staged_blocks[staged:]:
            self._block_index.remove(first)
        del self._staged_blocks[staged:]

    def _drop_rows(self, seqs: Sequence[int]) -> None:
        """Delete the rows of events memory dropped (housekeeping: a load prunes them again anyway). A row of a
        block is marked dropped in the block index. A row still staged is never written; one the latest commit
        took is deleted with the next commit; any other is deleted now, or after the next commit's inserts when
        staging."""
        seqs = self._block_index.drop(seqs)
        if not seqs:
            return
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
        """Write every staged row and block in one transaction on a connection of its own (one ``executemany`` for
        the rows, one INSERT per block, then the blocks memory no longer needs, and the deletes of rows memory has
        dropped once :attr:`DELETE_ROWS` are due or with ``deletes=True``); return how many rows of events memory
        holds were written, plus the row deletes. A few rows with nothing else go in one INSERT statement, its own
        transaction.

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
                if flush or len(self._staged_deletes) + len(self._staged_label_deletes) >= self.DELETE_ROWS:
                    deletes, self._staged_deletes = self._staged_deletes, []
                    label_deletes = list(self._staged_label_deletes.items())
                    self._staged_label_deletes = {}
                else:
                    deletes, label_deletes = [], []
                self._in_flight, self._staged_seqs = self._staged_seqs, set()
                skipped, self._skipped = self._skipped, set()
                count = self._block_index.count  # rows of a block memory still holds are what it writes of it
                held = sum(count.get(block[0], 0) for block in blocks)
                dead, thin = self._block_index.take()
            live = [row for row in taken if row[0] not in skipped] if skipped else taken
            if not live and not deletes and not label_deletes and not blocks and not dead and not thin:
                return 0
            if self._writer is None:
                self._writer = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
                self._writer.execute("pragma synchronous=normal")
                self._writer.execute("pragma busy_timeout=10000")
                # No checkpoint inside a commit: a service commits on its event loop, and copying the log into
                # the database file (with an fsync) stalled a request for up to 22 ms once per ~200 commits.
                self._writer.execute("pragma wal_autocheckpoint=0")
                self._checkpointer = _Checkpointer(self.path, self.CHECKPOINT_ROWS, self._writer_lock,
                                                   self.WAL_RESTART_PAGES)
            db = self._writer
            written = len(live) + held
            try:
                if (not deletes and not label_deletes and not blocks and not dead and not thin
                        and len(live) <= _ONE_STATEMENT):
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
                    if blocks:
                        db.executemany(_INSERT_BLOCK, map(self._block_row, blocks))
                except sqlite3.IntegrityError:  # a writer that reserves no seqs (an older store) took these
                    db.execute("rollback")  # (the rows before the clash were inserted)
                    db.execute("begin immediate")
                    self._write_renumbered(db, live + [row for block in blocks for row in self._block_rows(*block)])
                    deletes, dead, thin = [], [], []  # the reload prunes those rows again
                if thin:  # (after the inserts: a block staged with this commit is on disk now)
                    db.executemany(_THIN_BLOCK, [(orjson.dumps(at.tolist()), orjson.dumps(keep.tolist()), first)
                                                 for first, keep, at in thin])
                if dead:
                    db.executemany(_DELETE_BLOCK, zip(dead))
                if deletes:  # after the inserts: a seq freed here is not handed out again in this commit
                    execute_chunked(db, _DELETE, _DELETE_MANY, deletes, _PARAMS)
                if label_deletes:
                    db.executemany(_DELETE_LABEL, label_deletes)
                db.execute("commit")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("rollback")
                with self._lock:
                    self._forget()
                raise
            if self._checkpointer is not None:
                self._checkpointer.wrote(written + len(deletes) + len(label_deletes) + len(dead) + len(thin))
            return written + len(deletes)

    def _block_row(self, block: tuple[int, str, list[str], list[str | None], list[int], list[list[float]]]
                   ) -> tuple[int, int, str, bytes, bytes]:
        """The ``blocks`` row of a staged block (NaN values as null; a block never holds an infinity)."""
        first, entity, keys, ids, times, columns = block
        return (first, len(keys), entity, orjson.dumps(self._columns[entity]),
                orjson.dumps(list(zip(keys, ids, times, *columns, strict=True))))

    def _block_rows(self, first: int, entity: str, keys: list[str], ids: list[str | None], times: list[int],
                    columns: list[list[float]]) -> list[tuple[Any, ...]]:
        """A block's rows as rows of the events table."""
        n = len(keys)
        return list(zip(range(first, first + n), repeat(entity, n), keys, ids, times,
                        self._vals_texts(entity, columns, n), strict=True))

    def _write_renumbered(self, db: sqlite3.Connection, live: list[tuple[Any, ...]]) -> None:
        """Insert ``live`` after the last row on disk, in the open transaction, when their seqs were taken by
        another writer of the file that reserves none; memory is then dropped and reloaded from disk on next use
        (so its seqs, and the other writer's events, match the file)."""
        base = int(db.execute(_MAX_SEQ).fetchone()[0]) + 1
        db.executemany(_INSERT, [(base + i, *row[1:]) for i, row in enumerate(live)])
        with self._lock:
            self._next_seq = max(self._next_seq, base + len(live))
            self._forget()  # (the next seq is reserved after these rows)

    def add_label(self, event_id: Any, label: float, at: datetime | pd.Timestamp | str) -> bool:
        """Record that ``event_id``'s label became known at ``at``; return whether the event is in the store.

        The label counts in label-based aggregates of events at or after ``at`` (and only while the labelled
        event is inside their delayed window). A label for an event no state holds waits for it (labels may come
        first). Once its event has left every state the label is forgotten, in memory and in the file, because it
        can never count again, so a long-running store keeps the labels of about its longest horizon.
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
            for code in self._owners.get(key, ()):
                pool, slot = self._owned(code)
                i = pool.find(slot, key)
                if i is not None:
                    pool.set_label(slot, i, value, at_ns)
                    found = True
            self._staged_label_deletes.pop(key, None)  # (this label is newer than a forgotten one)
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
        again: ``[t, event_id, (entity, key, slot, current values or None when stored), ...]``.
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
            owners = self._owners
            for entity in self._entities:
                value = event.get(entity, _MISSING)
                key = self._entity_key(event, entity) if value is _MISSING else (
                    value if type(value) is str else _key(value))
                pool = self._pools[entity]
                slot = pool.index.get(key)
                if slot is None:
                    slot = self._state(entity, key)
                    pool = self._pools[entity]
                end = pool.end_view[slot]
                if end == pool.start_view[slot]:
                    unknown.append(entity)
                elif fresh is not None and t - pool.t_view[end - 1] > fresh:
                    stale.append(entity)
                own = None
                if event_id is not None and event_id in owners and (
                        slot * len(self._entities) + self._entity_index[entity] in owners[event_id]):
                    own = pool.find(slot, event_id)
                current = None
                if own is None:
                    current = {c: _number(event.get(c)) for c in self._columns[entity]}
                for plan in self._plans[entity]:
                    window_group(pool, slot, plan, t, current, own, out, scaled)
                if seen is not None:
                    seen.append((entity, key, slot, current))
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
                "select count(*) from (select entity, key from events union"
                " select b.entity, j.value ->> 0 from blocks b, json_each(b.rows) j)"
            ).fetchone()
        return int(row[0])


__all__ = ["FeatureBatch", "FeatureRow", "OnlineStore", "row_view", "stored_rows"]
