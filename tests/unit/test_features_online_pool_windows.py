"""online_pool.window_group on a pool state gives a plain model's numbers (the window's values summed with
``math.fsum``, the offline table's final aggregate) bit for bit: every aggregate, delays, include_current, a current
event or a stored one, labels arriving before or after the event's time, NaN/inf values and labels, events out of
time order, pruned fronts and compactions."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.features.offline import finish_aggregate
from keel.features.online import _GroupPlan
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


@dataclass
class Model:
    """One state as plain lists in (time, arrival) order."""

    times: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    label_at: list[int] = field(default_factory=list)

    def insert(self, t: int, event_id: str, v: float) -> None:
        i = bisect_right(self.times, t)
        for column, x in ((self.times, t), (self.ids, event_id), (self.values, v), (self.labels, 0.0),
                          (self.label_at, 2**62)):
            column.insert(i, x)

    def prune(self, before: int) -> None:
        k = bisect_right(self.times, before)
        for column in (self.times, self.ids, self.values, self.labels, self.label_at):
            del column[:k]

    def window(self, p: _GroupPlan, t: int, current: dict | None, own: int | None, out: dict[str, float]) -> None:
        """The window's features by definition: its values scanned (NaN dropped), summed with ``math.fsum``, the
        labels that arrived by ``t``, the final aggregate as the offline table computes it."""
        edge = t - p.delay_ns
        if p.zero_delay and own is not None:
            hi = own + 1 if p.include_current else own
        else:
            hi = bisect_right(self.times, edge)
        lo = min(bisect_right(self.times, edge - p.window_ns), hi)
        with_current = current is not None and p.zero_delay and p.include_current
        count = hi - lo + with_current
        vals = [v for v in self.values[lo:hi] if v == v]
        if with_current and current["x"] == current["x"]:
            vals.append(current["x"])
        label_total = math.fsum(y for y, at in zip(self.labels[lo:hi], self.label_at[lo:hi], strict=True) if at <= t)
        for name, aggregate, _, _ in p.items:
            if aggregate == "count":
                out[name] = float(count)
            elif aggregate == "label_rate":
                out[name] = label_total / count if count > 0 else 0.0
            else:
                total = math.fsum(vals) if aggregate in ("sum", "mean", "std") else 0.0
                m2 = math.fsum((v - total / len(vals)) ** 2 for v in vals) if aggregate == "std" and vals else 0.0
                out[name] = finish_aggregate(aggregate, count, len(vals), total, m2, min(vals, default=0.0),
                                             max(vals, default=0.0), label_total)


events = st.lists(st.tuples(st.integers(0, 40), st.sampled_from(VALUES)), min_size=0, max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), history=events)
def test_property_window_group_equals_the_model(data, history) -> None:
    model = Model()
    pool = Pool(["x"], rows=4, slots=1)
    pool.slot("other")  # another state in the same pool: moves interleave
    slot = pool.slot("k")
    for seq, (t, v) in enumerate(history):
        model.insert(t, str(seq), v)
        pool.insert(slot, t, {"x": v}, seq, str(seq))
        if data.draw(st.booleans()):
            pool.insert(pool.slot("other"), t, {"x": 1.5}, -1, None)
    for seq in data.draw(st.lists(st.integers(0, max(len(history) - 1, 0)), max_size=6)) if history else []:
        y, at = data.draw(st.sampled_from(LABELS)), data.draw(st.integers(0, 50))
        i = model.ids.index(str(seq))
        model.labels[i], model.label_at[i] = y, at
        pool.set_label(slot, pool.find(slot, str(seq)), y, at)
    if data.draw(st.booleans()):
        before = data.draw(st.integers(-1, 20))
        model.prune(before)
        pool.prune(pool.slots(["k"]), np.array([before]))
    if data.draw(st.booleans()):
        pool.compact()
    assert pool.t[pool.start[slot]:pool.end[slot]].tolist() == model.times
    for _ in range(4):
        p = plan(data.draw(st.sampled_from([0, 0, 3, 10])), data.draw(st.integers(1, 30)), data.draw(st.booleans()),
                 data.draw(st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=4)))
        t = data.draw(st.integers(0, 55))
        stored = bool(history) and data.draw(st.booleans())
        if stored:  # a stored event: its own index
            if not model.times:
                continue
            own = data.draw(st.integers(0, len(model.times) - 1))
            same(model, pool, slot, p, model.times[own], None, own)
        else:  # an event not stored yet
            same(model, pool, slot, p, t, {"x": data.draw(st.sampled_from(VALUES))}, None)


def same(model: Model, pool: Pool, slot: int, p: _GroupPlan, t: int, current: dict | None, own: int | None) -> None:
    want = outcome(lambda out: model.window(p, t, current, own, out))
    at = None if own is None else int(pool.start[slot]) + own
    got = outcome(lambda out: window_group(pool, slot, p, t, current, at, out, {}))
    assert got == want, (p, t, current, own)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_current_value_sums_by_scanning(value) -> None:
    """The current event's infinity makes its sums and means infinite over a window without infinities (what
    math.fsum of the window and the offline table give)."""
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
