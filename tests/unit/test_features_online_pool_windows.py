"""online_pool.window_group on a pool state gives online._window_group's numbers on the same events, bit for bit:
every aggregate, delays, include_current, a current event or a stored one, labels arriving before or after the
event's time, NaN/inf values and labels, events out of time order and pruned fronts."""

from __future__ import annotations

import math
from array import array

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.features.online import _EntityState, _GroupPlan, _window_group
from keel.features.online_pool import Pool, window_columns, window_group

VALUES = [math.nan, 0.0, -0.0, 1e-300, 1e12 + 0.1, 1 / 3, 2.5, 57.16, 0.01, 999.99, -7.0, math.inf, -math.inf]
LABELS = [0.0, 1.0, 0.5, 1 / 3, math.nan, math.inf]
AGGREGATES = ["count", "sum", "mean", "std", "min", "max", "label_count", "label_rate"]


def plan(delay: int, window: int, include_current: bool, aggregates: list[str]) -> _GroupPlan:
    items = tuple((f"f{k}_{a}", a, "x" if a in ("sum", "mean", "std", "min", "max") else None,
                   a in ("label_count", "label_rate")) for k, a in enumerate(aggregates))
    return _GroupPlan((), delay, window, delay == 0, include_current, items)


def outcome(fn) -> tuple:
    """What a call gives: its out dict with floats as repr (NaN equals NaN, -0.0 differs), or its error type."""
    out: dict[str, float] = {}
    try:
        fn(out)
    except (ValueError, OverflowError) as exc:
        return ("raised", type(exc).__name__)
    return tuple(sorted((k, repr(v)) for k, v in out.items()))


events = st.lists(st.tuples(st.integers(0, 40), st.sampled_from(VALUES)), min_size=0, max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), history=events)
def test_property_window_group_equals_the_state_path(data, history) -> None:
    state = _EntityState(values={"x": array("d")})
    pool = Pool(["x"], rows=4, slots=1)
    pool.slot("other")  # another state in the same pool: moves interleave
    slot = pool.slot("k")
    for seq, (t, v) in enumerate(history):
        state.insert(t, str(seq), {"x": v}, seq)
        pool.insert(slot, t, {"x": v}, seq, str(seq))
        if data.draw(st.booleans()):
            pool.insert(pool.slot("other"), t, {"x": 1.5}, -1, None)
    for seq in data.draw(st.lists(st.integers(0, max(len(history) - 1, 0)), max_size=6)) if history else []:
        y, at = data.draw(st.sampled_from(LABELS)), data.draw(st.integers(0, 50))
        state.set_label(list(state.ids).index(str(seq)), y, at)
        pool.set_label(slot, pool.find(slot, str(seq)), y, at)
    if data.draw(st.booleans()):
        before = data.draw(st.integers(-1, 20))
        state.prune(before)
        pool.prune(pool.slots(["k"]), np.array([before]))
    if data.draw(st.booleans()):
        pool.compact()
    assert pool.t[pool.start[slot]:pool.end[slot]].tolist() == state.times.tolist()
    for _ in range(4):
        p = plan(data.draw(st.sampled_from([0, 0, 3, 10])), data.draw(st.integers(1, 30)), data.draw(st.booleans()),
                 data.draw(st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=4)))
        t = data.draw(st.integers(0, 55))
        stored = bool(history) and data.draw(st.booleans())
        if stored:  # a stored event: its own index
            if not len(state.times):
                continue
            own = data.draw(st.integers(0, len(state.times) - 1))
            same(state, pool, slot, p, state.times[own], None, own)
        else:  # an event not stored yet (a finite or NaN value: see test_an_infinite_current_value_...)
            current = {"x": data.draw(st.sampled_from([v for v in VALUES if v not in (math.inf, -math.inf)]))}
            same(state, pool, slot, p, t, current, None)


def same(state: _EntityState, pool: Pool, slot: int, p: _GroupPlan, t: int, current: dict | None,
         own: int | None) -> None:
    want = outcome(lambda out: _window_group(state, p, t, current, own, out, {}))
    at = None if own is None else int(pool.start[slot]) + own
    got = outcome(lambda out: window_group(pool, slot, p, t, current, at, out, {}))
    assert got == want, (p, t, current, own)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_current_value_sums_by_scanning(value) -> None:
    """The current event's infinity makes its sums and means infinite (as math.fsum of the window gives), where
    the state path raises OverflowError from its exact prefix when the state holds no infinity."""
    pool = Pool(["x"])
    slot = pool.slot("k")
    pool.insert(slot, 1, {"x": 2.5}, 0)
    out: dict[str, float] = {}
    window_group(pool, slot, plan(0, 10, True, ["sum", "mean", "count"]), 5, {"x": value}, None, out)
    assert out == {"f0_sum": value, "f1_mean": value, "f2_count": 2.0}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_window_columns_equal_window_group(data) -> None:
    """A batch appended at once, then every event's windows at its own position: the columns equal window_group's
    per event wherever they claim to; they claim every event when no window holds an infinity or a late label."""
    pool = Pool(["x"], rows=4, slots=1)
    keys = ["a", "b", "c"]
    pool.slots(keys)
    seq = 0
    for key in keys:  # stored history, with labels
        for t, v in sorted(data.draw(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(VALUES)), max_size=8))):
            i = pool.insert(pool.slot(key), t, {"x": v}, seq, str(seq))
            if data.draw(st.integers(0, 3)) == 0:
                pool.set_label(pool.slot(key), i, data.draw(st.sampled_from(LABELS)), data.draw(st.integers(0, 60)))
            seq += 1
    n = data.draw(st.integers(1, 15))
    batch_keys = data.draw(st.lists(st.sampled_from(keys), min_size=n, max_size=n))
    u = pool.slots(batch_keys)
    newest = {k: int(pool.t[pool.end[pool.index[k]] - 1]) if pool.size(pool.index[k]) else 0 for k in keys}
    times = []
    for k in batch_keys:  # in time order per state, after its stored events
        newest[k] += data.draw(st.integers(0, 6))
        times.append(newest[k])
    t = np.array(times, dtype=np.int64)
    values = np.array(data.draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n)))
    assert pool.appendable(u, t)
    pos = pool.append(u, t, {"x": values}, np.arange(seq, seq + n), None)
    for _ in range(3):
        p = plan(data.draw(st.sampled_from([0, 0, 3, 10])), data.draw(st.integers(1, 30)), data.draw(st.booleans()),
                 data.draw(st.lists(st.sampled_from(["count", "sum", "mean", "label_count", "label_rate"]),
                                    min_size=1, max_size=4)))
        out: dict[str, np.ndarray] = {}
        try:
            missed = window_columns(pool, p, u, t, pos, out)
        except OverflowError:  # a window sum beyond the float range: the per-event path raises it too
            with pytest.raises((OverflowError, ValueError)):  # (ValueError: -inf and inf in a scanned window)
                for j in range(n):
                    window_group(pool, int(u[j]), p, int(t[j]), None, int(pos[j]), {})
            continue
        for j in np.flatnonzero(~missed).tolist():
            want: dict[str, float] = {}
            window_group(pool, int(u[j]), p, int(t[j]), None, int(pos[j]), want)
            assert {k: repr(float(col[j])) for k, col in out.items()} == {k: repr(v) for k, v in want.items()}
        finite = not np.isinf(pool.values["x"][:pool.used]).any()
        if finite and (pool.late[:len(pool.keys)] == -(2**63)).all():
            assert not missed.any()
