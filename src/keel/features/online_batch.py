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
from array import array
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from itertools import compress, count, repeat
from operator import add, attrgetter, eq, getitem, is_, is_not, le, ne, not_, sub, truediv
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.features.offline import ratio_feature, row_feature, row_value
from keel.features.online import (
    _NEVER_LABELLED,
    _NO_LABEL_AT,
    FeatureBatch,
    _consume,
    _key,
    _number,
    _window_group,
)

if TYPE_CHECKING:
    from keel.features.online import OnlineStore, _EntityState, _ExactPrefix, _GroupPlan

_VECTOR = frozenset({"count", "sum", "mean", "label_count", "label_rate"})
_EMPTY = -(2**63)  # the newest time of an empty state: before every event time

_append = array.append
_TIMES, _IDS, _ID_SET, _SEQS = attrgetter("times"), attrgetter("ids"), attrgetter("id_set"), attrgetter("seqs")
_LABELS, _LABEL_AT, _VALUES = attrgetter("labels"), attrgetter("label_at"), attrgetter("values")
_SUMS, _LABEL_SUMS = attrgetter("sums"), attrgetter("label_sums")  # (_ExactPrefix.sums too)
_VALID, _SHIFT, _LATE = attrgetter("valid"), attrgetter("shift"), attrgetter("late_label")
_POW2 = (1).__lshift__  # 2**shift


class _Entity:
    """One entity column's part of a batch: the states it touches and where each event sits in them."""

    __slots__ = ("entity", "first_keys", "keys", "own", "per_event", "states", "times", "u", "values")

    def __init__(self, entity: str, keys: list[str]) -> None:
        self.entity = entity
        self.keys = keys
        self.states: list[_EntityState] = []  # distinct, in order of first appearance
        self.first_keys: list[str] = []  # their keys
        self.times: list[array] = []  # their ``times``
        self.u: list[int] = []  # per event: its state's index in ``states``
        self.per_event: list[_EntityState] = []  # per event: its state
        self.own: list[int] = []  # per event: its index in its state once staged
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
    parts = [_Entity(entity, entity_keys) for entity, entity_keys in zip(store._entities, keys, strict=True)]
    try:
        t_np = np.array(times, dtype=np.int64)
    except OverflowError:  # a time beyond 64-bit nanoseconds: the replay reports it per event
        return None
    stale = np.zeros(n, dtype=bool)
    cache = store._cache
    for part in parts:
        entity = part.entity
        part.first_keys = list(dict.fromkeys(part.keys))  # each key's state, numbered by first appearance
        part.u = list(map(dict(zip(part.first_keys, count())).__getitem__, part.keys))
        states = list(map(cache.get, zip(repeat(entity), part.first_keys)))
        if not all(states):  # (a state is always true) new entities, or the store is not loaded yet
            states = [store._state(entity, key) if s is None else s
                      for s, key in zip(states, part.first_keys, strict=True)]
        part.states = states
        part.per_event = list(map(states.__getitem__, part.u))
        part.times = list(map(_TIMES, states))
        sizes = np.array(list(map(len, part.times)), dtype=np.int64)
        # Per state, the batch's times never go back, nor before the state's newest stored event (else the
        # replay inserts in the middle).
        u = np.array(part.u, dtype=np.int64)
        order = np.argsort(u, kind="stable")
        su, st = u[order], t_np[order]
        new_state = np.ones(n, dtype=bool)
        new_state[1:] = su[1:] != su[:-1]
        if not np.all(new_state[1:] | (st[1:] >= st[:-1])):
            return None
        newest = np.array(_newest(part.times), dtype=np.int64)
        if np.any(st[new_state] < newest):
            return None
        # Each event's index in its state: the state's size before the batch plus the batch's events before it.
        at = np.arange(n)
        own = np.empty(n, dtype=np.int64)
        own[order] = sizes[su] + at - np.maximum.accumulate(np.where(new_state, at, 0))
        part.own = own.tolist()
        if store._freshness_ns is not None:  # older than the freshness: the state's newest time before the event
            _flag_stale(stale, order, st, new_state, newest[su], sizes[su] > 0, store._freshness_ns)
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

    sizes = [list(map(len, part.times)) for part in parts]
    staged = len(store._staged_blocks)
    try:
        return _stage_and_compute(store, n, parts, times, ids, raw, rows, column, stale)
    except Exception:  # e.g. a window sum beyond the float range: undo, and the replay reports it per event
        _undo(store, parts, sizes, staged, ids)
        return None


def _newest(times: list[array]) -> list[int]:
    """Each state's newest time (``_EMPTY`` for an empty state)."""
    if all(times):
        return list(map(getitem, times, repeat(-1)))
    return [t[-1] if t else _EMPTY for t in times]


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
    ids: list[str | None],
    raw: Sequence[Sequence[float]],
    rows: Sequence[Sequence[float]],
    column: Callable[[str], list[float]],
    stale: np.ndarray,
) -> FeatureBatch:
    for part in parts:
        _stage(store, part, times, ids)
    per_event_states = zip(*[part.per_event for part in parts], strict=True)
    if None not in ids:
        store._owners.update(zip(ids, per_event_states, strict=True))
    else:
        store._owners.update(compress(zip(ids, per_event_states, strict=True), map(is_not, ids, repeat(None))))

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
            # the states whose oldest event is at or before their newest - horizon (else nothing to prune)
            bound = map(sub, map(getitem, part.times, repeat(-1)), repeat(store._horizon[part.entity]))
            old = map(le, map(getitem, part.times, repeat(0)), bound)
            for key, state in compress(zip(part.first_keys, part.states, strict=True), old):
                store._prune(part.entity, key, state)
    finally:
        store._staging = False
    return FeatureBatch(matrix, stale, np.zeros(n, dtype=bool), [])


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


def _stage(store: OnlineStore, part: _Entity, times: list[int], ids: list[str | None]) -> None:
    """Append each event to its state (as ``_EntityState.insert`` does for an event in time order, prefix sums
    included) and queue its rows for the next commit as one block of columns (the commit builds the rows).

    Every per-event append is one C-level ``map`` over the events (one list, array or set per event: its
    state's); the maps run in event order, and each reads a state's last prefix sum lazily, after the append of
    the state's previous event."""
    entity = part.entity
    states, per_event = part.states, part.per_event
    for state in compress(states, map(is_, map(_SUMS, states), repeat(None))):  # built now if missing
        state.prefix()
    # Label prefix sums: kept by the states of an entity whose windows read labels that ever held a non-zero
    # label (the others' label sums are all 0: no prefix is kept, see _Labels)
    labelled = list(map(ne, map(_LATE, states), repeat(_NEVER_LABELLED))) if entity in store._label_entities else []
    for state in compress(states, map(is_not, map(_LABEL_SUMS, states), repeat(None))):
        if not labelled or state.late_label == _NEVER_LABELLED:
            state.label_sums = None
    for state in compress(states, labelled):
        if state.label_sums is None:
            state.label_prefix()
    n = len(times)
    first = store._next_seq
    store._next_seq = first + n
    store._staged_seqs.update(range(first, first + n))
    store._staged_blocks.append((first, entity, part.keys, ids, times, part.values))
    _consume(map(_append, map(_TIMES, per_event), times))
    _consume(map(_append, map(_SEQS, per_event), range(first, first + n)))
    _consume(map(list.append, map(_IDS, per_event), ids))
    id_sets = map(_ID_SET, per_event)
    if None in ids:
        given = list(map(is_not, ids, repeat(None)))
        _consume(map(set.add, compress(id_sets, given), compress(ids, given)))
    else:
        _consume(map(set.add, id_sets, ids))
    _consume(map(_append, map(_LABELS, per_event), repeat(0.0)))
    _consume(map(_append, map(_LABEL_AT, per_event), repeat(_NO_LABEL_AT)))
    labels = list(map(_LABEL_SUMS, compress(per_event, map(labelled.__getitem__, part.u)))) if any(labelled) else []
    # (a zero label: adds nothing, counts as valid)
    label_sums = list(map(_SUMS, labels))
    _consume(map(list.append, label_sums, map(getitem, label_sums, repeat(-1))))
    label_valid = list(map(_VALID, labels))
    _consume(map(_append, label_valid, map(add, map(getitem, label_valid, repeat(-1)), repeat(1))))
    sums = list(map(_SUMS, per_event))
    for c, values in zip(store._columns[entity], part.values, strict=True):
        _consume(map(_append, map(getitem, map(_VALUES, per_event), repeat(c)), values))
        _push(list(map(getitem, sums, repeat(c))), values)


def _push(prefixes: list[_ExactPrefix], values: list[float]) -> None:
    """``prefixes[j].push(values[j])`` for each event in turn (finite values or NaN).

    A value on its state's grid (``n / 2**k`` with ``k <= shift``) adds ``ldexp(value, shift)``, an exact
    integer float; when a value needs a finer grid its state's sums are rescaled first (the grid a push would
    reach, the same integers), then every term is computed at once. A NaN adds nothing and is not counted."""
    clean: list[float] = values
    ok: Any = repeat(1)
    if not all(map(eq, values, values)):
        ok = list(map(eq, values, values))
        clean = [v if v == v else 0.0 for v in values]
    for _ in range(2):
        try:
            scaled = list(map(math.ldexp, clean, map(_SHIFT, prefixes)))
        except OverflowError:  # a large value on a very fine grid: one push at a time
            break
        if all(map(float.is_integer, scaled)):
            sums = list(map(_SUMS, prefixes))
            _consume(map(list.append, sums, map(add, map(getitem, sums, repeat(-1)), map(int, scaled))))
            valid = list(map(_VALID, prefixes))
            _consume(map(_append, valid, map(add, map(getitem, valid, repeat(-1)), ok)))
            return
        for j in compress(range(len(scaled)), map(not_, map(float.is_integer, scaled))):
            prefixes[j].refine(clean[j])
    for prefix, v in zip(prefixes, values, strict=True):
        prefix.push(v)


def _windows(store: OnlineStore, part: _Entity, times: list[int], matrix: np.ndarray, index: dict[str, int]) -> None:
    """Every window feature of one entity for every event of the batch: window edges by :class:`_Edges` (one
    ``np.searchsorted`` over the touched states' times laid end to end), counts and valid counts as array
    differences, sums as differences of the exact prefix sums at the edges (C-level ``map`` calls)."""
    n = len(times)
    per_event = part.per_event
    t_np = np.array(times, dtype=np.int64)
    edges = _Edges(part.times, part.u, times)
    own = np.array(part.own, dtype=np.int64)
    own_next = own + 1
    scan: list[tuple[_GroupPlan, list[int]]] = []  # (window group, events) for _window_group
    searched: dict[int, np.ndarray] = {}  # offset before the event time -> each event's bisect_right there
    columns: dict[str, _Column] = {}
    labels: _Labels | None = None

    def search(offset: int) -> np.ndarray:
        if offset not in searched:
            searched[offset] = edges.bisect_right(offset)
        return searched[offset]

    for plan in store._plans[part.entity]:
        items = plan.items
        if not all(a in _VECTOR and (column or a not in ("sum", "mean")) for _, a, column, _ in items):
            scan.append((plan, list(range(n))))
            continue
        hi = (own_next if plan.include_current else own) if plan.zero_delay else search(plan.delay_ns)
        lo = np.minimum(search(plan.delay_ns + plan.window_ns), hi)
        count = hi - lo
        missed = np.zeros(n, dtype=bool)
        label_total = None
        for name, aggregate, column, reads_label in items:
            col = index[name]
            if aggregate == "count":
                matrix[:, col] = count
                continue
            if reads_label:
                if labels is None:
                    labels = _Labels(per_event, t_np)
                missed |= ~labels.ok
                if label_total is None:
                    label_total = labels.totals(lo, hi)
                with np.errstate(divide="ignore", invalid="ignore"):
                    matrix[:, col] = (np.where(count > 0, label_total / count, 0.0) if aggregate == "label_rate"
                                      else label_total)
                continue
            assert column is not None
            if column not in columns:
                columns[column] = _Column(part, column)
            prefix = columns[column]
            missed |= ~prefix.ok
            total, n_valid = prefix.totals(lo, hi)
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


class _Edges:
    """``bisect_right(state.times, t - offset)`` for every event of a batch at once: the touched states' times
    laid end to end, each shifted to a segment of its own (``segment * stride + time - state's first time + 1``,
    the event's bound clipped into its state's range first), so one sorted int64 array answers every event with
    one ``np.searchsorted``. States are taken in groups small enough for the keys to fit in 63 bits; when even
    one state's span does not (times centuries apart), each event bisects its own state."""

    __slots__ = ("_first", "_groups", "_last", "_per_event", "_starts", "_t", "_times", "_u")

    def __init__(self, state_times: list[array], u: list[int], times: list[int]) -> None:
        self._times, self._u, self._t = state_times, u, times
        self._per_event: list[array] | None = None
        self._groups: list[tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, int]] | None = None
        lens = np.fromiter(map(len, state_times), dtype=np.int64, count=len(state_times))
        ends = np.cumsum(lens)
        starts = ends - lens
        flat = np.frombuffer(b"".join(state_times), dtype=np.int64)
        first, last = flat[starts], flat[ends - 1]
        if int(last.max()) - int(first.min()) >= 2**62:
            return
        stride = int((last - first).max()) + 2  # keys of segment g: g * stride + [1, span + 1]
        size = max(1, (2**62 // stride) - 1)  # states per group
        self._groups = []
        u_np = np.array(u, dtype=np.int64)
        segment = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        for g0 in range(0, len(lens), size):
            g1 = min(g0 + size, len(lens))
            chosen = None if g0 == 0 and g1 == len(lens) else np.flatnonzero((u_np >= g0) & (u_np < g1))
            a, b = int(starts[g0]), int(ends[g1 - 1])
            keys = (segment[a:b] - g0) * stride + (flat[a:b] - first[segment[a:b]]) + 1
            eu = u_np if chosen is None else u_np[chosen]
            self._groups.append((chosen, keys, (eu - g0) * stride, eu, a))
        self._first, self._last, self._starts = first, last, starts

    def bisect_right(self, offset: int) -> np.ndarray:
        """Per event: ``bisect_right(its state's times, its time - offset)``."""
        n = len(self._u)
        if self._groups is None or min(self._t) - offset < -(2**63) + 1:
            if self._per_event is None:
                self._per_event = list(map(self._times.__getitem__, self._u))
            return np.fromiter(map(bisect_right, self._per_event, map(sub, self._t, repeat(offset))),
                               dtype=np.int64, count=n)
        t_np = np.array(self._t, dtype=np.int64) - offset
        out = np.empty(n, dtype=np.int64)
        for chosen, keys, base, eu, a in self._groups:
            q = t_np if chosen is None else t_np[chosen]
            first = self._first[eu]
            rel = np.clip(q, first - 1, self._last[eu]) - first + 1
            found = np.searchsorted(keys, base + rel, side="right") - (self._starts[eu] - a)
            if chosen is None:
                out[:] = found
            else:
                out[chosen] = found
        return out


class _Column:
    """One value column's exact prefix sums for every event of a batch: sums at the window edges (the ``hi``
    edge shared by the windows that share it), valid counts from the touched states' counts laid end to end."""

    def __init__(self, part: _Entity, column: str) -> None:
        prefixes = list(map(getitem, map(_SUMS, part.states), repeat(column)))
        self.ok = np.fromiter(map(attrgetter("exact"), prefixes), dtype=bool, count=len(prefixes))[part.u]
        per_event = list(map(prefixes.__getitem__, part.u))
        self.sums = list(map(_SUMS, per_event))
        self.scale = list(map(_POW2, map(_SHIFT, per_event)))
        lens = np.fromiter(map(len, map(_VALID, prefixes)), dtype=np.int64, count=len(prefixes))
        self.valid = np.frombuffer(b"".join(map(_VALID, prefixes)), dtype=np.int64)
        self.start = (np.cumsum(lens) - lens)[part.u]
        self._at: dict[int, tuple[np.ndarray, list[int]]] = {}

    def totals(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window sums as floats, valid counts) per event."""
        if id(hi) not in self._at:  # (the entry keeps ``hi`` alive: its id stays its own)
            self._at[id(hi)] = (hi, list(map(getitem, self.sums, hi.tolist())))
        upper = self._at[id(hi)][1]
        exact = map(sub, upper, map(getitem, self.sums, lo.tolist()))
        total = np.fromiter(map(truediv, exact, self.scale), dtype=np.float64, count=len(lo))
        return total, self.valid[self.start + hi] - self.valid[self.start + lo]


class _Labels:
    """Label sums for every event of a batch. A state whose ``late_label`` was never raised holds only zero labels
    (its windows' label sums are 0.0, and it keeps no label prefix): only the others' prefix sums are read."""

    def __init__(self, per_event: list[_EntityState], t: np.ndarray) -> None:
        n = len(per_event)
        lates = list(map(_LATE, per_event))
        self.some = list(compress(range(n), map(ne, lates, repeat(_NEVER_LABELLED))))
        self.ok = np.ones(n, dtype=bool)
        prefixes = [per_event[j].label_sums for j in self.some]
        # labels that arrived after an event: scanned with their arrival times
        self.ok[self.some] = [p.exact and int(t[j]) >= lates[j]  # type: ignore[union-attr]
                              for p, j in zip(prefixes, self.some, strict=True)]
        self.sums = list(map(_SUMS, prefixes))
        self.scale = list(map(_POW2, map(_SHIFT, prefixes)))

    def totals(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        out = np.zeros(len(lo), dtype=np.float64)
        if self.some:
            out[self.some] = _range_sums(self.sums, lo[self.some].tolist(), hi[self.some].tolist(), self.scale)
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
