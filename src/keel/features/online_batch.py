"""The batch path of :meth:`OnlineStore.features_many` with ``stage=True``: a whole batch at once, same numbers.

``features_many(events, stage=True)`` promises, per event in order, ``features(e)`` then ``stage(e)``. When the
batch only appends to its entities' states (per entity key, times never go back, including against the stored
events), brings no event already stored or sent twice, and no label is waiting for its events, that replay
equals a simpler plan: append every event to its states first, then compute each event's windows with the
event at its own index (the path :func:`~keel.features.online._window_group` takes for a stored event). Later
events of the batch lie after the event in time order, so no window of it reaches them; earlier ones lie
before it, exactly as if they had been staged one by one. Prunes run once per entity at the end (the bound
only grows, and an in-order event is never at or before it), and the rows reach SQLite with the next
:meth:`~keel.features.online.OnlineStore.commit_staged` as before.

The windows of every event are then found at once per entity: the entity states the batch touches are laid end
to end in one sorted int64 array and each window edge is one ``np.searchsorted``. Counts, sums, means and label
sums read the states' exact prefix sums (Python integers: the window sum is the exact sum rounded once, what
``math.fsum`` gives, as on the single-event path) through C-level ``map`` calls. Any other aggregate (std, min,
max), a state whose column holds infinities, or an event whose label sum must scan (labels that arrived after
it) goes through ``_window_group`` itself for that event. Anything the plan cannot guarantee returns ``None``
before a state is touched, and the caller replays the batch event by event.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from itertools import repeat
from operator import getitem, sub, truediv
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.features.offline import ratio_feature, row_feature, row_value

if TYPE_CHECKING:
    from keel.features.online import FeatureBatch, OnlineStore, _EntityState, _GroupPlan

_VECTOR = frozenset({"count", "sum", "mean", "label_count", "label_rate"})
_NO_LABEL_AT = 2**62  # online._NO_LABEL_AT
_NEVER = -(2**63)  # _EntityState.late_label of a state that never held a non-zero label


class _Entity:
    """One entity column's part of a batch: the states it touches and where each event sits in them."""

    __slots__ = ("entity", "first_keys", "keys", "own", "states", "u", "values")

    def __init__(self, entity: str, keys: list[str]) -> None:
        self.entity = entity
        self.keys = keys
        self.states: list[_EntityState] = []  # distinct, in order of first appearance
        self.first_keys: list[str] = []  # their keys
        self.u: list[int] = []  # per event: its state's index in ``states``
        self.own: list[int] = []  # per event: its index in its state once staged
        self.values: list[list[float]] = []  # per value column of the entity, per event


def features_batch(store: OnlineStore, events: Sequence[Mapping[str, Any]]) -> FeatureBatch | None:
    """Features of ``events`` and their staging, as ``features_many(events, stage=True)`` gives them, or None
    when the batch needs the event-by-event replay. Hold ``store._lock``."""
    from keel.features import online

    number = online._number
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
    from keel.features import online

    parts = [_Entity(entity, entity_keys) for entity, entity_keys in zip(store._entities, keys, strict=True)]
    try:
        t_np = np.array(times, dtype=np.int64)
    except OverflowError:  # a time beyond 64-bit nanoseconds: the replay reports it per event
        return None
    for part in parts:
        index: dict[str, int] = {}
        first = index.setdefault
        part.u = [first(key, len(index)) for key in part.keys]  # each key's state, numbered by first appearance
        entity = part.entity
        part.first_keys = list(index)
        part.states = [store._state(entity, key) for key in part.first_keys]
        # Per state, the batch's times never go back, nor before the state's newest stored event (else the
        # replay inserts in the middle).
        u = np.array(part.u, dtype=np.int64)
        order = np.argsort(u, kind="stable")
        su, st = u[order], t_np[order]
        new_state = np.ones(n, dtype=bool)
        new_state[1:] = su[1:] != su[:-1]
        if not np.all(new_state[1:] | (st[1:] >= st[:-1])):
            return None
        newest = np.array([s.times[-1] if s.times else _NEVER for s in part.states], dtype=np.int64)
        if np.any(st[new_state] < newest):
            return None
        for c in store._columns[part.entity]:
            values = column(c)
            if any(v in online._INFINITIES for v in values):  # the replay keeps such a column exact
                return None
            part.values.append(values)
    given = [i for i in ids if i is not None]
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

    sizes = [[len(s.times) for s in part.states] for part in parts]
    staged = len(store._staged_blocks)
    try:
        return _stage_and_compute(store, n, parts, times, ids, raw, rows, column)
    except Exception:  # e.g. a window sum beyond the float range: undo, and the replay reports it per event
        _undo(store, parts, sizes, staged, ids)
        return None


def _stage_and_compute(
    store: OnlineStore,
    n: int,
    parts: list[_Entity],
    times: list[int],
    ids: list[str | None],
    raw: Sequence[Sequence[float]],
    rows: Sequence[Sequence[float]],
    column: Callable[[str], list[float]],
) -> FeatureBatch:
    from keel.features import online

    stale = np.zeros(n, dtype=bool)
    for part in parts:
        _stage(store, part, times, ids, stale)
    owners = store._owners
    per_event_states = [list(map(part.states.__getitem__, part.u)) for part in parts]
    for event_id, *states in zip(ids, *per_event_states, strict=True):
        if event_id is not None:
            owners[event_id] = tuple(states)

    names = store._names
    index = {name: i for i, name in enumerate(names)}
    matrix = np.empty((n, len(names)), dtype=np.float64)
    for d, column in zip(store._raw, raw, strict=True):
        matrix[:, index[d.name]] = column
    for r, column in zip(store._rows, rows, strict=True):
        matrix[:, index[r.name]] = column
    for part in parts:
        _windows(store, part, times, matrix, index)
    known = set(index) - {q.name for q in store._ratios}  # a ratio reads the ratios computed before it
    for q in store._ratios:
        num = matrix[:, index[q.numerator]] if q.numerator in known else column(q.numerator)
        den = matrix[:, index[q.denominator]] if q.denominator in known else column(q.denominator)
        matrix[:, index[q.name]] = ratio_feature(num, den)
        known.add(q.name)

    store._staging = True  # the prunes' deletes go with the next commit, after these rows' inserts
    try:
        for part in parts:
            horizon = store._horizon[part.entity]
            for key, state in zip(part.first_keys, part.states, strict=True):
                times = state.times
                if times[0] <= times[-1] - horizon:  # else nothing to prune (the test _prune starts with)
                    store._prune(part.entity, key, state)
    finally:
        store._staging = False
    return online.FeatureBatch(matrix, stale, np.zeros(n, dtype=bool), [])


def _undo(store: OnlineStore, parts: list[_Entity], sizes: list[list[int]], staged: int, ids: list[str | None]
          ) -> None:
    """Take the batch's events back out of their states (appends only: cut every list back to its old length;
    prefix sums rescaled to a finer grid meanwhile stay exact), the owner map and the staged rows."""
    batch_ids = {i for i in ids if i is not None}
    for part, lengths in zip(parts, sizes, strict=True):
        for state, m in zip(part.states, lengths, strict=True):
            del state.times[m:], state.ids[m:], state.labels[m:], state.label_at[m:], state.seqs[m:]
            for column in state.values.values():
                del column[m:]
            for prefix in [*(state.sums or {}).values(), state.label_sums]:
                if prefix is not None:
                    del prefix.sums[m + 1:], prefix.valid[m + 1:]
            state.id_set -= batch_ids
    for event_id in batch_ids:
        store._owners.pop(event_id, None)
    for first, _, keys, *_ in store._staged_blocks[staged:]:
        store._staged_seqs.difference_update(range(first, first + len(keys)))
    del store._staged_blocks[staged:]


def _stage(store: OnlineStore, part: _Entity, times: list[int], ids: list[str | None], stale: np.ndarray) -> None:
    """Append each event to its state (as ``_EntityState.insert`` does for an event in time order, prefix sums
    included) and queue its rows for the next commit as one block of columns (the commit builds the rows); flag
    events whose state was older than the freshness."""
    entity = part.entity
    columns = store._columns[entity]
    fresh = store._freshness_ns
    for state in part.states:  # built now if missing, then kept up to date below
        state.prefix()
        state.label_prefix()
    states, values, own = part.states, part.values, part.own
    first = store._next_seq
    store._next_seq = first + len(times)
    store._staged_seqs.update(range(first, first + len(times)))
    store._staged_blocks.append((first, entity, part.keys, ids, times, values))
    for j, (k, t, event_id) in enumerate(zip(part.u, times, ids, strict=True)):
        state = states[k]
        tl = state.times
        if fresh is not None and tl and t - tl[-1] > fresh:
            stale[j] = True
        own.append(len(tl))
        tl.append(t)
        state.seqs.append(first + j)
        state.ids.append(event_id)
        if event_id is not None:
            state.id_set.add(event_id)
        state.labels.append(0.0)
        state.label_at.append(_NO_LABEL_AT)
        labels = state.label_sums
        labels.sums.append(labels.sums[-1])  # a zero label: adds nothing, counts as valid
        labels.valid.append(labels.valid[-1] + 1)
        sums = state.sums
        for m, c in enumerate(columns):
            v = values[m][j]
            state.values[c].append(v)
            prefix = sums[c]
            if v != v:
                prefix.sums.append(prefix.sums[-1])
                prefix.valid.append(prefix.valid[-1])
                continue
            num, den = v.as_integer_ratio()
            k = den.bit_length() - 1
            if k > prefix.shift:
                prefix.push(v)  # rescales the sums built so far to the finer grid
            else:
                prefix.sums.append(prefix.sums[-1] + (num << (prefix.shift - k)))
                prefix.valid.append(prefix.valid[-1] + 1)


def _windows(store: OnlineStore, part: _Entity, times: list[int], matrix: np.ndarray, index: dict[str, int]) -> None:
    """Every window feature of one entity for every event of the batch, with C-level ``map`` calls over the
    events (``bisect_right`` in each event's state, the exact prefix sums at the window's edges)."""
    from keel.features.online import _window_group

    n = len(times)
    states = part.states
    per_event = list(map(states.__getitem__, part.u))
    state_times = [s.times for s in per_event]
    own = np.array(part.own, dtype=np.int64)
    t_np = np.array(times, dtype=np.int64)
    scan: list[tuple[_GroupPlan, list[int]]] = []  # (window group, events) for _window_group
    prefixes: dict[str | None, tuple[list[list[int]], list[list[int]], list[int], np.ndarray]] = {}

    def prefix_of(column: str | None) -> tuple[list[list[int]], list[list[int]], list[int], np.ndarray]:
        """Per event: its state's exact prefix sums, valid counts and ``2**shift`` of a column (None: labels),
        and whether they can give the window sum."""
        if column not in prefixes:
            chosen = [s.label_sums if column is None else s.sums[column] for s in states]  # type: ignore[index]
            ok = np.array([p.exact for p in chosen], dtype=bool)[part.u]  # type: ignore[union-attr]
            if column is None:  # labels that arrived after an event: scanned with their arrival times
                ok &= t_np >= np.array([min(s.late_label, 2**63 - 1) for s in per_event], dtype=np.int64)
            per = list(map(chosen.__getitem__, part.u))
            prefixes[column] = ([p.sums for p in per], [p.valid for p in per],  # type: ignore[union-attr]
                                [1 << p.shift for p in per], ok)  # type: ignore[union-attr]
        return prefixes[column]

    for plan in store._plans[part.entity]:
        items = plan.items
        if not all(a in _VECTOR and (column or a not in ("sum", "mean")) for _, a, column, _ in items):
            scan.append((plan, list(range(n))))
            continue
        end = [t - plan.delay_ns for t in times]
        if plan.zero_delay:
            hi = own + 1 if plan.include_current else own
        else:
            hi = np.fromiter(map(bisect_right, state_times, end), dtype=np.int64, count=n)
        start = map(sub, end, repeat(plan.window_ns))
        lo = np.minimum(np.fromiter(map(bisect_right, state_times, start), dtype=np.int64, count=n), hi)
        count = hi - lo
        hi_l, lo_l = hi.tolist(), lo.tolist()
        missed = np.zeros(n, dtype=bool)
        label_total = None
        for name, aggregate, column, reads_label in items:
            col = index[name]
            if aggregate == "count":
                matrix[:, col] = count
                continue
            sums, valid, scale, ok = prefix_of(None if reads_label else column)
            missed |= ~ok
            if reads_label:
                if label_total is None:
                    label_total = _label_sums(per_event, sums, lo_l, hi_l, scale)
                with np.errstate(divide="ignore", invalid="ignore"):
                    matrix[:, col] = (np.where(count > 0, label_total / count, 0.0) if aggregate == "label_rate"
                                      else label_total)
                continue
            total = _range_sums(sums, lo_l, hi_l, scale)
            n_valid = np.fromiter(map(sub, map(getitem, valid, hi_l), map(getitem, valid, lo_l)),
                                  dtype=np.int64, count=n)
            with np.errstate(divide="ignore", invalid="ignore"):
                if aggregate == "mean":
                    matrix[:, col] = np.where(n_valid > 0, total / n_valid, math.nan)
                else:
                    matrix[:, col] = np.where(n_valid > 0, total, 0.0)
        if missed.any():
            scan.append((plan, np.flatnonzero(missed).tolist()))
    for plan, todo in scan:  # the event-at-a-time path for what the arrays above do not cover
        for j in todo:
            row: dict[str, float] = {}
            _window_group(per_event[j], plan, times[j], None, part.own[j], row)
            for name, value in row.items():
                matrix[j, index[name]] = value


def _label_sums(
    per_event: list[_EntityState], sums: list[list[int]], lo: list[int], hi: list[int], scale: list[int]
) -> np.ndarray:
    """:func:`_range_sums` of the labels, 0.0 without a look for events whose state never held a non-zero label
    (its ``late_label`` was never raised: every prefix sum is 0, and the window's sum is the 0.0 the division
    would give)."""
    some = [j for j, s in enumerate(per_event) if s.late_label != _NEVER]
    if len(some) == len(per_event):
        return _range_sums(sums, lo, hi, scale)
    out = np.zeros(len(per_event), dtype=np.float64)
    if some:
        pick = [sums[j] for j in some], [lo[j] for j in some], [hi[j] for j in some], [scale[j] for j in some]
        out[some] = _range_sums(*pick)
    return out


def _range_sums(sums: list[list[int]], lo: list[int], hi: list[int], scale: list[int]) -> np.ndarray:
    """``(sums[j][hi[j]] - sums[j][lo[j]]) / scale[j]`` per event, in Python integers: the exact sum rounded once
    (0.0 for an empty window, as on the single-event path)."""
    exact = map(sub, map(getitem, sums, hi), map(getitem, sums, lo))
    return np.fromiter(map(truediv, exact, scale), dtype=np.float64, count=len(lo))


def columns_batch(store: OnlineStore, n: int, cols: Mapping[str, Any]) -> FeatureBatch | None:
    """:func:`features_batch` of a column batch (the timestamp as ``datetime64``, float fields as float64
    arrays, other fields as lists of validated values), without a dict per event; None when the batch needs the
    event-by-event replay (the caller replays its row view). Hold ``store._lock``."""
    from keel.features import online

    key = online._key
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
        return list(map(online._number, values))

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
