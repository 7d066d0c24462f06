"""The batch path of :meth:`OnlineStore.features_many` with ``stage=True``: a whole batch at once, same numbers.

``features_many(events, stage=True)`` promises, per event in order, ``features(e)`` then ``stage(e)``. When the
batch only appends to its entities' states (per entity key, times never go back, including against the stored
events), brings no event already stored or sent twice, and no label is waiting for its events, that replay
equals a simpler plan: append every event to its states first, then compute each event's windows with the
event at its own position (the path :func:`~keel.features.online_pool.window_group` takes for a stored event).
Later events of the batch lie after the event in time order, so no window of it reaches them; earlier ones lie
before it, exactly as if they had been staged one by one. Prunes run once per entity at the end (the bound
only grows, and an in-order event is never at or before it), and the rows reach SQLite with the next
:meth:`~keel.features.online.OnlineStore.commit_staged` as before.

The states live in one :class:`~keel.features.online_pool.Pool` per entity column, so the appends are a few
fancy assignments over the batch (:meth:`~keel.features.online_pool.Pool.append`) and every event's windows of
one window group are found at once (:func:`~keel.features.online_pool.window_columns`: a vectorised binary search
in each event's region, counts, sums, means and label sums from the exact prefix sums: the exact sum rounded
once, what ``math.fsum`` gives, as on the single-event path). Any other aggregate (std, min, max), a window
holding an infinity, or an event whose label sum must scan (labels that arrived after it) goes through
``window_group`` itself for that event. Anything the plan cannot guarantee returns ``None`` before a state is
touched, and the caller replays the batch event by event.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from itertools import compress, repeat
from operator import is_not
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.features.offline import ratio_feature, row_feature, row_value
from keel.features.online import FeatureBatch, _key, _number, _spans
from keel.features.online_pool import window_columns, window_edges, window_group

if TYPE_CHECKING:
    from keel.features.online import OnlineStore
    from keel.features.online_pool import Pool


class _Entity:
    """One entity column's part of a batch: its pool, each event's slot and (once appended) position."""

    __slots__ = ("entity", "keys", "pool", "pos", "sizes", "slots", "u", "values")

    def __init__(self, entity: str, keys: list[str], pool: Pool) -> None:
        self.entity = entity
        self.keys = keys
        self.pool = pool
        self.u = np.zeros(0, dtype=np.int64)  # per event: its state's slot
        self.slots = np.zeros(0, dtype=np.int64)  # the distinct slots the batch touches
        self.sizes = np.zeros(0, dtype=np.int64)  # their sizes before the batch (for the undo)
        self.pos = np.zeros(0, dtype=np.int64)  # per event: its position once appended
        self.values: list[list[float]] = []  # per value column of the entity, per event


def features_batch(store: OnlineStore, events: Sequence[Mapping[str, Any]]) -> FeatureBatch | None:
    """Features of ``events`` and their staging, as ``features_many(events, stage=True)`` gives them, or None
    when the batch needs the event-by-event replay. Hold ``store._lock``."""
    number = _number
    try:
        times = [store._event_time(e) for e in events]
        ids = [store._event_id(e) for e in events]
        keys = [[store._entity_key(e, entity) for e in events] for entity in store._entities]
        raw = [[number(e.get(d.column)) for e in events] for d in store._raw]
        rows = [[row_value(r, e.get(r.column)) for e in events] for r in store._rows]
    except Exception:  # the replay reports it for the events concerned
        return None

    def column(name: str) -> list[float]:
        return [number(e.get(name)) for e in events]

    return batch_of(store, len(events), times, ids, keys, raw, rows, column)


def batch_of(
    store: OnlineStore,
    n: int,
    times: list[int],
    ids: list[str | None],
    keys: list[list[str]],
    raw: Sequence[Sequence[float]],
    rows: Sequence[Sequence[float]],
    column: Callable[[str], list[float]],
) -> FeatureBatch | None:
    """:func:`features_batch` of a batch given as columns: event times (ns), ids and each entity's keys as
    canonical text, raw and row features per definition, and ``column(name)``: a numeric field as floats
    (NaN where missing). None when the batch needs the event-by-event replay. Hold ``store._lock``."""
    try:
        t_np = np.array(times, dtype=np.int64)
    except OverflowError:  # a time beyond 64-bit nanoseconds: the replay reports it per event
        return None
    reach = max(p.delay_ns + p.window_ns for plans in store._plans.values() for p in plans)
    if n and int(t_np.min()) - reach <= -(2**63):  # a window edge before int64 nanoseconds: the replay
        return None
    if not store._loaded_all:
        store.preload()
    parts = [_Entity(entity, entity_keys, store._pools[entity])
             for entity, entity_keys in zip(store._entities, keys, strict=True)]
    stale = np.zeros(n, dtype=bool)
    for part in parts:
        pool = part.pool
        u = part.u = pool.slots(part.keys)  # (new entities get an empty state)
        # Per state, the batch's times never go back, nor before the state's newest stored event (else the
        # replay inserts in the middle).
        if not pool.appendable(u, t_np):
            return None
        if store._freshness_ns is not None:  # older than the freshness: the state's newest time before the event
            order = np.argsort(u, kind="stable")
            su, st = u[order], t_np[order]
            new_state = np.ones(n, dtype=bool)
            new_state[1:] = su[1:] != su[:-1]
            stored = pool.end[su] > pool.start[su]
            newest = np.where(stored, pool.t[np.maximum(pool.end[su] - 1, 0)], 0)
            _flag_stale(stale, order, st, new_state, newest, stored, store._freshness_ns)
        for c in store._columns[part.entity]:
            values = column(c)
            if math.inf in values or -math.inf in values:  # the replay keeps such a column exact
                return None
            part.values.append(values)
    given = ids if None not in ids else [i for i in ids if i is not None]
    if given:  # none sent twice, already stored, or with its label waiting for it
        seen = set(given)
        # (``any(map(d.__contains__, ...))``: set.isdisjoint(dict) would walk the whole dict)
        if len(seen) != len(given) or any(map(store._owners.__contains__, given)):
            return None
        if store._pending_complete:  # every waiting label is in _pending
            if any(map(store._pending.__contains__, given)):
                return None
        elif any(store._known_label(i) is not None for i in given):
            return None

    staged = len(store._staged_blocks)
    for part in parts:
        part.slots = np.unique(part.u)
        part.sizes = part.pool.end[part.slots] - part.pool.start[part.slots]
    try:
        batch = _stage_and_compute(store, n, parts, times, t_np, ids, raw, rows, column, stale)
    except Exception:  # e.g. a window sum beyond the float range: undo, and the replay reports it per event
        _undo(store, parts, staged, ids)
        return None
    for part in parts:  # compaction steps, now that the batch's positions are used
        part.pool.tidy(ahead=True)
    return batch


def _flag_stale(stale: np.ndarray, order: np.ndarray, st: np.ndarray, new_state: np.ndarray, newest: np.ndarray,
                stored: np.ndarray, fresh: int) -> None:
    """``stale[j]`` for the events (``order``: sorted by state, times ``st``) more than ``fresh`` after the
    newest event of their state before them: the batch's previous one, else the stored newest (if any)."""
    prev = np.empty_like(st)
    prev[1:] = st[:-1]
    prev[new_state] = newest[new_state]
    has = ~new_state | stored
    if not has.any():
        return
    if int(st.max()) - int(prev[has].min()) < 2**63:  # no int64 overflow in the differences
        late = has & (st - np.where(has, prev, st) > fresh)
    else:
        late = has & np.array([int(t) - int(p) > fresh for t, p in zip(st, prev, strict=True)])
    stale[order[late]] = True


def _stage_and_compute(
    store: OnlineStore,
    n: int,
    parts: list[_Entity],
    times: list[int],
    t_np: np.ndarray,
    ids: list[str | None],
    raw: Sequence[Sequence[float]],
    rows: Sequence[Sequence[float]],
    column: Callable[[str], list[float]],
    stale: np.ndarray,
) -> FeatureBatch:
    entities = len(store._entities)
    owners = []
    for part in parts:
        # the rows reach SQLite with the next commit, as one block of columns (the commit builds the rows)
        first = store._seqs(n)
        store._stage_block(first, part.entity, part.keys, ids, times, part.values)
        values = {c: np.array(v, dtype=np.float64) for c, v in zip(store._columns[part.entity], part.values,
                                                                    strict=True)}
        part.pos = part.pool.append(part.u, t_np, values, np.arange(first, first + n, dtype=np.int64), ids)
        owners.append((part.u * entities + store._entity_index[part.entity]).tolist())
    per_event_owners = zip(*owners, strict=True)
    if None not in ids:
        store._owners.update(zip(ids, per_event_owners, strict=True))
    else:
        store._owners.update(compress(zip(ids, per_event_owners, strict=True), map(is_not, ids, repeat(None))))

    names = store._names
    index = {name: i for i, name in enumerate(names)}
    matrix = np.empty((n, len(names)), dtype=np.float64)
    for d, values in zip(store._raw, raw, strict=True):
        matrix[:, index[d.name]] = values
    for r, values in zip(store._rows, rows, strict=True):
        matrix[:, index[r.name]] = values
    for part in parts:
        _windows(store, part, times, t_np, matrix, index)
    known = set(index) - {q.name for q in store._ratios}  # a ratio reads the ratios computed before it
    for q in store._ratios:
        num = matrix[:, index[q.numerator]] if q.numerator in known else column(q.numerator)
        den = matrix[:, index[q.denominator]] if q.denominator in known else column(q.denominator)
        matrix[:, index[q.name]] = ratio_feature(num, den)
        known.add(q.name)

    store._staging = True  # the prunes' deletes go with the next commit, after these rows' inserts
    try:
        for part in parts:
            _prune(store, part)
    finally:
        store._staging = False
    return FeatureBatch(matrix, stale, np.zeros(n, dtype=bool), [])


def _prune(store: OnlineStore, part: _Entity) -> None:
    """Drop the events no window can reach any more from every state the batch touched (at or before its newest
    event's time - horizon), with their rows and owners, as ``OnlineStore._prune`` does per state."""
    pool, slots = part.pool, part.slots
    before = pool.t[pool.end[slots] - 1] - store._horizon[part.entity]
    old = pool.t[pool.start[slots]] <= before  # (else nothing to prune)
    if not old.any():
        return
    slots = slots[old]
    first, stop = pool.prune(slots, before[old])
    dropped = _spans(first, stop)
    store._drop_rows(pool.seq[dropped].tolist())
    mine = np.repeat(slots * len(store._entities) + store._entity_index[part.entity], stop - first).tolist()
    store._disown(mine, pool.ids[dropped].tolist(), pool.label_at[dropped].tolist())


def _undo(store: OnlineStore, parts: list[_Entity], staged: int, ids: list[str | None]) -> None:
    """Take the batch's events back out of their states (each touched slot back to its size before the batch;
    prefix sums rescaled to a finer grid meanwhile stay exact), the owner map and the staged rows."""
    for part in parts:
        part.pool.truncate(part.slots, part.sizes)
    for event_id in {i for i in ids if i is not None}:
        store._owners.pop(event_id, None)
    store._unstage_blocks(staged)


def _windows(store: OnlineStore, part: _Entity, times: list[int], t_np: np.ndarray, matrix: np.ndarray,
             index: dict[str, int]) -> None:
    """Every window feature of one entity for every event of the batch: :func:`window_columns` per window group,
    then :func:`window_group` for the events it leaves (per event, at its own position)."""
    pool, u, pos = part.pool, part.u, part.pos
    plans = store._plans[part.entity]
    offsets = {p.delay_ns + p.window_ns for p in plans} | {p.delay_ns for p in plans if not p.zero_delay}
    edges = window_edges(pool, offsets, u, t_np, pos)  # every window edge of the entity in one search
    for plan in plans:
        out: dict[str, np.ndarray] = {}
        missed = window_columns(pool, plan, u, t_np, pos, out, edges)
        for name, values in out.items():
            matrix[:, index[name]] = values
        if missed.any():
            u_list, pos_list = u.tolist(), pos.tolist()
            for j in np.flatnonzero(missed).tolist():
                row: dict[str, float] = {}
                window_group(pool, u_list[j], plan, times[j], None, pos_list[j], row)
                for name, value in row.items():
                    matrix[j, index[name]] = value


def columns_batch(store: OnlineStore, n: int, cols: Mapping[str, Any]) -> FeatureBatch | None:
    """:func:`features_batch` of a column batch (the timestamp as ``datetime64``, float fields as float64
    arrays, other fields as lists of validated values), without a dict per event; None when the batch needs the
    event-by-event replay (the caller replays its row view). Hold ``store._lock``."""
    key = _key
    stamp = cols.get(store.timestamp) if store.timestamp else None
    if not isinstance(stamp, np.ndarray) or stamp.dtype.kind != "M" or len(stamp) != n:
        return None
    us = stamp.astype("datetime64[us]").view(np.int64)  # what the row view's datetimes hold
    if n and (us.min() < _MIN_US or us.max() > _MAX_US):  # NaT, or nanoseconds beyond 64 bits
        return None
    times = (us * 1000).tolist()
    if store.id_column is None or store.id_column not in cols:
        ids: list[str | None] = [None] * n
    else:
        ids = _texts(cols[store.id_column], key, nullable=True)
    keys = []
    for entity in store._entities:
        if entity not in cols:
            return None  # the replay names the missing entity per event
        keys.append(_texts(cols[entity], key, nullable=False))

    def column(name: str) -> list[float]:
        values = cols.get(name)
        if values is None:
            return [math.nan] * n
        if isinstance(values, np.ndarray) and values.dtype == np.float64:
            return values.tolist()
        return list(map(_number, values))

    raw = [column(d.column) for d in store._raw]
    rows: list[Sequence[float]] = []
    stamps: list[Any] | None = None
    for r in store._rows:
        if r.column == store.timestamp and r.kind in ("is_weekend", "is_night", "hour", "weekday"):
            rows.append(row_feature(r, us.view("datetime64[us]")))  # the offline table's arithmetic
            continue
        values = cols.get(r.column)
        if r.column == store.timestamp:
            if stamps is None:
                stamps = stamp.astype("datetime64[us]").astype(datetime).tolist()
            values = stamps
        elif isinstance(values, np.ndarray):
            values = values.tolist()
        rows.append([row_value(r, v) for v in (values if values is not None else [None] * n)])
    return batch_of(store, n, times, ids, keys, raw, rows, column)


_MIN_US = -(2**63 - 1) // 1000
_MAX_US = (2**63 - 1) // 1000


def _texts(values: Sequence[Any], key: Callable[[Any], str], *, nullable: bool) -> list[Any]:
    """``_key`` of each value (``None`` stays ``None`` when ``nullable``), with one ``map(str)`` for plain ints."""
    kinds = set(map(type, values))
    if kinds <= {str}:
        return list(values)
    if kinds == {int}:
        return list(map(str, values))
    if nullable:
        return [None if v is None else key(v) for v in values]
    return list(map(key, values))
