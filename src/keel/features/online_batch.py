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

Counts, sums, means and label sums come from the states' exact prefix sums (bit-identical to ``math.fsum``
over the window, as on the single-event path); any other aggregate, a column holding infinities, or a label
sum that must scan (labels that arrived late) goes through ``_window_group`` itself for that event and window.
Anything the plan cannot guarantee returns ``None`` before a state is touched, and the caller replays the
batch event by event.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.features.offline import ratio_feature, row_value

if TYPE_CHECKING:
    from keel.features.online import FeatureBatch, OnlineStore

_FAST = frozenset({"count", "sum", "mean", "label_count", "label_rate"})


def features_batch(store: OnlineStore, events: Sequence[Mapping[str, Any]]) -> FeatureBatch | None:
    """Features of ``events`` and their staging, as ``features_many(events, stage=True)`` gives them, or None
    when the batch needs the event-by-event replay. Hold ``store._lock``."""
    from keel.features import online

    n = len(events)
    names = store._names
    try:
        times = [store._event_time(e) for e in events]
        ids = [store._event_id(e) for e in events]
        keys = {entity: [store._entity_key(e, entity) for e in events] for entity in store._entities}
        raw = [[online._number(e.get(d.column)) for e in events] for d in store._raw]
        rows = [[row_value(r, e.get(r.column)) for e in events] for r in store._rows]
    except Exception:  # the replay reports it for the events concerned
        return None
    fresh = store._freshness_ns
    stale = np.zeros(n, dtype=bool)
    plan_states: list[tuple[str, list[Any], list[int]]] = []  # (entity, state per event, own index per event)
    columns: dict[str, list[list[float]]] = {}
    for entity, entity_keys in keys.items():
        states: dict[str, Any] = {}
        last: dict[str, int] = {}
        per_event = []
        for key, t in zip(entity_keys, times, strict=True):
            state = states.get(key)
            if state is None:
                state = states[key] = store._state(entity, key)
                if state.times:
                    last[key] = state.times[-1]
            if t < last.get(key, t):
                return None  # out of time order for this entity: the replay inserts in the middle
            last[key] = t
            per_event.append(state)
        values = [[online._number(e.get(c)) for e in events] for c in store._columns[entity]]
        for column in values:
            if any(v in online._INFINITIES for v in column):
                return None
        plan_states.append((entity, per_event, []))
        columns[entity] = values
    if any(i is not None for i in ids):
        seen: set[str] = set()
        for event_id in ids:
            if event_id is None:
                continue
            if event_id in seen or event_id in store._owners or store._known_label(event_id) is not None:
                return None  # sent twice, already stored, or its label is waiting for it
            seen.add(event_id)

    # Stage: append every event to its states (the batch is in time order per state), rows for the commit.
    staged = store._staged
    owners = store._owners
    for entity, per_event, own in plan_states:
        entity_columns = store._columns[entity]
        values = columns[entity]
        entity_keys = keys[entity]
        for j, state in enumerate(per_event):
            t = times[j]
            event_id = ids[j]
            if fresh is not None and state.times and t - state.times[-1] > fresh:
                stale[j] = True
            vals = {c: values[m][j] for m, c in enumerate(entity_columns)}
            own.append(state.insert(t, event_id, vals))
            key = entity_keys[j]
            staged.append((entity, key, event_id, t, store._vals_text(entity, vals)))
            if event_id is not None:
                owners.setdefault(event_id, []).append((entity, key))

    # Features, column by column.
    index = {name: i for i, name in enumerate(names)}
    matrix = np.empty((n, len(names)), dtype=np.float64)
    for d, column in zip(store._raw, raw, strict=True):
        matrix[:, index[d.name]] = column
    for r, column in zip(store._rows, rows, strict=True):
        matrix[:, index[r.name]] = column
    for entity, per_event, own in plan_states:
        for plan in store._plans[entity]:
            _plan_columns(plan, per_event, own, times, matrix, index)
    known = set(index) - {q.name for q in store._ratios}  # a ratio reads the ratios computed before it
    for q in store._ratios:
        num = matrix[:, index[q.numerator]] if q.numerator in known else [
            online._number(e.get(q.numerator)) for e in events]
        den = matrix[:, index[q.denominator]] if q.denominator in known else [
            online._number(e.get(q.denominator)) for e in events]
        matrix[:, index[q.name]] = ratio_feature(num, den)
        known.add(q.name)

    store._staging = True  # the prunes' deletes go with the next commit, after these rows' inserts
    try:
        for entity, per_event, _ in plan_states:
            done: set[int] = set()
            for key, state in zip(keys[entity], per_event, strict=True):
                if id(state) not in done:
                    done.add(id(state))
                    store._prune(entity, key, state)
    finally:
        store._staging = False
    return online.FeatureBatch(matrix, stale, np.zeros(n, dtype=bool), [])


def _plan_columns(
    plan: Any, per_event: list[Any], own: list[int], times: list[int], matrix: np.ndarray, index: dict[str, int]
) -> None:
    """One window group's features for every event (each stored at ``own[j]`` in ``per_event[j]``)."""
    from keel.features.online import _window_group

    n = len(per_event)
    items = plan.items
    out = [[0.0] * n for _ in items]
    delay, window = plan.delay_ns, plan.window_ns
    fast = all(a in _FAST and (column or a not in ("sum", "mean")) for _, a, column, _ in items)
    value_columns = {column for _, aggregate, column, _ in items if column and aggregate in ("sum", "mean")}
    reads_label = any(label for *_, label in items)
    zero_delay = plan.zero_delay
    after_own = 1 if plan.include_current else 0  # zero delay: the window ends after the event or before it
    for j in range(n):
        state = per_event[j]
        t = times[j]
        if fast:
            sums = state.sums
            ok = sums is not None and all(sums[c].exact for c in value_columns)
            if ok and reads_label:
                labels = state.label_sums
                ok = labels is not None and labels.exact and t >= state.late_label
        if not (fast and ok):
            row: dict[str, float] = {}
            _window_group(state, plan, t, None, own[j], row)
            for m, (name, *_) in enumerate(items):
                out[m][j] = row[name]
            continue
        end = t - delay
        hi = own[j] + after_own if zero_delay else bisect_right(state.times, end)
        lo = bisect_right(state.times, end - window)
        if lo > hi:
            lo = hi
        count = hi - lo
        label_total = None
        for m, (_, aggregate, column, _) in enumerate(items):
            if aggregate == "count":
                out[m][j] = float(count)
            elif aggregate == "sum" or aggregate == "mean":
                prefix = sums[column]
                total = prefix.sums[hi] - prefix.sums[lo]
                valid = prefix.valid[hi] - prefix.valid[lo]
                value = total / (1 << prefix.shift) if total else 0.0
                if aggregate == "mean":
                    out[m][j] = value / valid if valid > 0 else math.nan
                else:
                    out[m][j] = value if valid else 0.0
            else:
                if label_total is None:
                    label_sums = state.label_sums
                    total = label_sums.sums[hi] - label_sums.sums[lo]
                    label_total = total / (1 << label_sums.shift) if total else 0.0
                if aggregate == "label_rate":
                    out[m][j] = label_total / count if count > 0 else 0.0
                else:
                    out[m][j] = float(label_total)
    for m, (name, *_) in enumerate(items):
        matrix[:, index[name]] = out[m]
