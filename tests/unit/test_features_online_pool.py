"""online_pool.Pool: every state's region, exact window sums, valid and infinity counts and window edges equal a
plain-Python model of the same states (lists in (time, arrival) order, sums by math.fsum) through any sequence
of batch appends, single inserts (in or out of time order), labels, prunes, undos, compactions and compaction
passes run step by step between them (:meth:`Pool.compact_step`, random budgets)."""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.features.online_pool import NEVER, NO_LABEL_AT, NONFINITE, WIDE, Pool

ODD = [math.nan, 0.0, -0.0, 1e-300, 5e-324, 1e12 + 0.1, 1 / 3, 2.5, 57.16, 0.01, 999.99, -7.0, 1e300,
       math.inf, -math.inf]
KEYS = ["a", "b", "c", "d", "e"]


class Model:
    """The reference: per key a list of [t, seq, id, values, label, at] in (time, arrival) order."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.states: dict[str, list[list]] = {}
        self.late: dict[str, int] = {}  # per key, the latest arrival of a non-zero label (NaN/inf: NONFINITE)

    def appendable(self, keys: list[str], times: list[int]) -> bool:
        last = {k: s[-1][0] for k, s in self.states.items() if s}
        for k, t in zip(keys, times, strict=True):
            if k in last and t < last[k]:
                return False
            last[k] = t
        return True

    def insert(self, key: str, t: int, seq: int, event_id: str | None, values: dict[str, float]) -> None:
        state = self.states.setdefault(key, [])
        i = bisect_right([e[0] for e in state], t)
        state.insert(i, [t, seq, event_id, dict(values), 0.0, NO_LABEL_AT])

    def prune(self, key: str, before: int) -> int:
        state = self.states.setdefault(key, [])
        k = bisect_right([e[0] for e in state], before)
        del state[:k]
        return k


def region(pool: Pool, key: str) -> list[list]:
    s = pool.index[key]
    a, b = int(pool.start[s]), int(pool.end[s])
    return [[int(pool.t[i]), int(pool.seq[i]), pool.ids[i], {c: float(pool.values[c][i]) for c in pool.columns},
             float(pool.label[i]), int(pool.label_at[i])] for i in range(a, b)]


def as_text(state: list[list]) -> list[list]:
    """Entries with floats as their repr (NaN equals NaN, -0.0 differs from 0.0)."""
    return [[t, seq, i, {c: repr(v) for c, v in vals.items()}, repr(y), at] for t, seq, i, vals, y, at in state]


def check(pool: Pool, model: Model, data: st.DataObject) -> None:
    """Every region equals the model's list; sums, counts and edges of windows drawn at random equal the
    model's."""
    for key, state in model.states.items():
        assert as_text(region(pool, key)) == as_text(state), key
        assert pool.late[pool.index[key]] == model.late.get(key, NEVER), key
    n = len(pool.keys)
    assert pool.held == int((pool.cap[:n] - pool.start[:n] + 1).sum()) <= pool.used <= len(pool.t)
    check_rows(pool)
    keys = [k for k in model.states]
    if not keys:
        return
    # every prefix of every state: [start, start + i) for each i (the label track: kept once a non-zero label came)
    for key in keys:
        s = pool.index[key]
        m = len(model.states[key])
        u = np.full(m + 1, s, dtype=np.int64)
        lo = np.full(m + 1, pool.start[s], dtype=np.int64)
        for c in [*pool.columns, *([None] if pool.late[s] != NEVER else [])]:
            total, valid, bad = pool.sums(pool.labels if c is None else pool.tracks[c], u, lo, lo + np.arange(m + 1))
            window = [e[4] if c is None else e[3][c] for e in model.states[key]]
            want = [math.fsum(v for v in window[:i] if math.isfinite(v)) for i in range(m + 1)]
            assert [x if x else 0.0 for x in want] == [x if x else 0.0 for x in total.tolist()], (key, c)
            assert valid.tolist() == [sum(v == v for v in window[:i]) for i in range(m + 1)]
            assert bad.tolist() == [sum(v in (math.inf, -math.inf) for v in window[:i]) for i in range(m + 1)]
    qs = data.draw(st.lists(st.tuples(st.sampled_from(keys), st.integers(0, 40), st.integers(0, 40)),
                            min_size=1, max_size=12))
    u = pool.slots([k for k, _, _ in qs])
    lo = np.array([min(a, b, len(model.states[k])) for k, a, b in qs], dtype=np.int64) + pool.start[u]
    hi = np.array([min(max(a, b), len(model.states[k])) for k, a, b in qs], dtype=np.int64) + pool.start[u]
    columns = [*pool.columns, None]
    for c in columns:
        track = pool.labels if c is None else pool.tracks[c]
        kept = np.ones(len(qs), dtype=bool) if c is not None else pool.late[u] != NEVER
        total, valid, bad = np.zeros(len(qs)), np.zeros(len(qs), dtype=np.int64), np.zeros(len(qs), dtype=np.int64)
        if kept.any():
            total[kept], valid[kept], bad[kept] = pool.sums(track, u[kept], lo[kept], hi[kept])
        for j, (k, _, _) in enumerate(qs):
            if not kept[j]:  # only zero labels: no label track kept (its sums are 0 without reading it)
                assert all(e[4] == 0.0 for e in model.states[k])
                continue
            a, b = int(lo[j] - pool.start[u[j]]), int(hi[j] - pool.start[u[j]])
            window = [e[4] if c is None else e[3][c] for e in model.states[k][a:b]]
            finite = [v for v in window if math.isfinite(v)]
            want = math.fsum(finite) if finite else 0.0
            assert total[j] == want or (want == 0.0 and total[j] == 0.0), (c, k, window)
            assert valid[j] == sum(v == v for v in window)
            assert bad[j] == sum(v in (math.inf, -math.inf) for v in window)
            one = pool.sum_one(track, int(u[j]), int(lo[j]), int(hi[j]))
            assert one == (total[j], valid[j], bad[j])
    # window edges: bisect_right of random times in each query's region (and in [lo, hi) of it)
    xs = np.array(data.draw(st.lists(st.integers(-5, 60), min_size=len(qs), max_size=len(qs))), dtype=np.int64)
    start, end = pool.start[u], pool.end[u]
    got = pool.bisect_right(start, end, xs)
    got_lohi = pool.bisect_right(lo, hi, xs)
    for j, (k, _, _) in enumerate(qs):
        times = [e[0] for e in model.states[k]]
        assert got[j] - start[j] == bisect_right(times, int(xs[j]))
        a, b = int(lo[j] - start[j]), int(hi[j] - start[j])
        assert got_lohi[j] - start[j] == bisect_right(times, int(xs[j]), a, b)
        assert pool.region_bisect(int(u[j]), int(xs[j])) == got[j]


def check_rows(pool: Pool) -> None:
    """The row layout: allocations ``[base, cap)`` are disjoint and below ``used``, each slot's header row is where
    ``head`` says, rows of room (and every row after ``used``) hold no label, and during a compaction pass every
    allocation beginning below the cursor ends at or before it and none begins between it and the scan."""
    n = len(pool.keys)
    base, start, end, cap = (a[:n] for a in (pool.base, pool.start, pool.end, pool.cap))
    assert (base < start).all() and (start <= end).all() and (end <= cap).all() and (cap <= pool.used).all()
    order = np.argsort(base)
    assert (cap[order][:-1] <= base[order][1:]).all()  # disjoint
    assert np.flatnonzero(pool.head >= 0).tolist() == sorted(base.tolist())
    assert (pool.head[base] == np.arange(n)).all()
    for s in range(n):
        assert not pool.label[end[s]:cap[s]].any() and (pool.label_at[end[s]:cap[s]] == NO_LABEL_AT).all()
    assert not pool.label[pool.used:].any() and (pool.label_at[pool.used:] == NO_LABEL_AT).all()
    for track in [*pool.tracks.values(), pool.labels]:  # limbs: canonical in every region kept (header included)
        kept = [s for s in range(n) if track.shift[s] != WIDE and (track.name or pool.late[s] != NEVER)]
        if kept:
            rows = pool.rows(np.array(kept))
            rows = np.concatenate([rows, start[kept] - 1])
            assert ((track.lo[rows] >= 0) & (track.lo[rows] < 2**48)).all(), track.name
            assert (np.abs(track.hi[rows]) < 2**62).all(), track.name
    if pool.cursor >= 0:
        below = base < pool.cursor
        assert (cap[below] <= pool.cursor).all()
        assert not ((base >= pool.cursor) & (base < pool._scan)).any()


def step(pool: Pool, data: st.DataObject) -> None:
    """Maybe start a compaction pass, and carry one on by a random budget."""
    if pool.cursor < 0 and data.draw(st.booleans()):
        pool.begin_pass()
    pool.compact_step(data.draw(st.integers(1, 30)))


# (|x| <= 1e300: no window sum beyond the float range, see test_a_sum_beyond_the_float_range_raises)
values = st.sampled_from(ODD) | st.floats(-1e300, 1e300, width=64)


# values whose terms on a slot's grid sit at the limbs' edges: carries across 2**48 and 2**96, negative terms,
# differences beyond 2**101 (|hi| difference >= 2**53: the exact-int fallback), terms of 2**109 and more (the slot
# becomes wide), tiny values on fine grids and sums that are subnormal
EDGE = [2.0**47, 2.0**48 - 1, -(2.0**47), 2.0**95 + 2.0**43, -(2.0**95), 2.0**100 + 1.5 * 2**49, 2.0**108, 2.0**109,
        2.0**-20, 0.5, -0.75, 3e-9, 2.0**-1000 * 3, 5e-324, -5e-324, 1e-310, 2.0**60 + 2.0**8]
limb_values = (st.sampled_from(EDGE) | st.builds(lambda m, e: math.ldexp(m, e), st.integers(-(2**53), 2**53),
                                                 st.integers(-60, 60)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), columns=st.sampled_from([[], ["amount"], ["amount", "fee"]]))
def test_property_pool_equals_model(data, columns) -> None:
    run_model(data, columns, values)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), columns=st.sampled_from([["amount"], ["amount", "fee"]]))
def test_property_pool_equals_model_at_the_limb_edges(data, columns) -> None:
    """The model test with values whose terms cross the limbs' carries, their float conversion's guards and the
    wide threshold (sums that fit a float: |x| < 2**110)."""
    run_model(data, columns, limb_values)


def run_model(data: st.DataObject, columns: list[str], values: st.SearchStrategy[float]) -> None:
    pool = Pool(columns, rows=4, slots=2)  # tiny: moves and growth from the first appends on
    model = Model(columns)
    seq = 0
    ids = 0
    stepping = data.draw(st.booleans())  # compaction steps between the operations (and inside insert runs)
    for _ in range(data.draw(st.integers(1, 12))):
        op = data.draw(st.sampled_from(["append", "append", "insert", "label", "prune", "compact", "step"]))
        if op == "append":
            n = data.draw(st.integers(0, 12))
            keys = data.draw(st.lists(st.sampled_from(KEYS), min_size=n, max_size=n))
            times = data.draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
            if data.draw(st.booleans()):  # mostly in order per key, so the batch is appendable
                times = sorted(times)
            vals = {c: data.draw(st.lists(values, min_size=n, max_size=n)) for c in columns}
            u = pool.slots(keys)
            t = np.array(times, dtype=np.int64)
            ok = model.appendable(keys, times)
            assert pool.appendable(u, t) == ok
            if not ok:
                continue
            event_ids = [str(ids + j) for j in range(n)]
            if data.draw(st.integers(0, 4)) == 0:  # appended, then taken back (the batch path's undo)
                touched = np.unique(u)
                sizes = pool.end[touched] - pool.start[touched]
                taken = pool.append(u, t, {c: np.array(v, dtype=np.float64) for c, v in vals.items()},
                                    np.arange(seq, seq + n), event_ids)
                if n:  # a label on a row taken back: the row is room again, without it (``late`` stays raised)
                    pool.set_label(int(u[0]), int(taken[0]), 1.0, 5)
                    model.late[keys[0]] = max(model.late.get(keys[0], NEVER), 5)
                pool.truncate(touched, sizes)
                check(pool, model, data)
            pos = pool.append(u, t, {c: np.array(v, dtype=np.float64) for c, v in vals.items()},
                              np.arange(seq, seq + n), event_ids)
            for j, k in enumerate(keys):
                model.insert(k, times[j], seq + j, event_ids[j], {c: vals[c][j] for c in columns})
                assert pool.ids[pos[j]] == event_ids[j]
            seq += n
            ids += n
        elif op == "insert":  # a run of single events into one state (after a prune: shifted back over its front)
            key = data.draw(st.sampled_from(KEYS))
            for _ in range(data.draw(st.integers(1, 6))):
                t = data.draw(st.integers(0, 50))
                v = {c: data.draw(values) for c in columns}
                i = pool.insert(pool.slot(key), t, v, seq, str(ids))
                model.insert(key, t, seq, str(ids), v)
                assert pool.ids[i] == str(ids) and pool.t[i] == t
                seq += 1
                ids += 1
                if stepping:
                    step(pool, data)
        elif op == "label":
            keys = [k for k, s in model.states.items() if s]
            if not keys:
                continue
            key = data.draw(st.sampled_from(keys))
            j = data.draw(st.integers(0, len(model.states[key]) - 1))
            y = data.draw(st.sampled_from([0.0, 1.0, 0.5, 1 / 3, math.nan, math.inf, 1e-300]))
            at = data.draw(st.integers(0, 60))
            entry = model.states[key][j]
            s = pool.slot(key)
            assert pool.find(s, entry[2]) == int(pool.start[s]) + j
            pool.set_label(s, int(pool.start[s]) + j, y, at)
            entry[4], entry[5] = y, at
            if y != 0.0:
                model.late[key] = max(model.late.get(key, NEVER), at if math.isfinite(y) else NONFINITE)
        elif op == "prune":
            keys = list(dict.fromkeys(data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))))
            before = [data.draw(st.integers(-1, 50)) for _ in keys]
            if len(keys) == 1 and data.draw(st.booleans()):  # the single-event path's prune
                first, stop = (np.array([x]) for x in pool.prune_one(int(pool.slot(keys[0])), before[0]))
            else:
                first, stop = pool.prune(pool.slots(keys), np.array(before, dtype=np.int64))
            for key, b, f, s in zip(keys, before, first.tolist(), stop.tolist(), strict=True):
                dropped = [e[1] for e in model.states.get(key, [])[: s - f]]
                assert model.prune(key, b) == s - f
                assert pool.seq[f:s].tolist() == dropped
        elif op == "compact":
            pool.compact()
            assert pool.wasted() == 0.0 and pool.live == sum(map(len, model.states.values()))
        else:
            step(pool, data)
        check(pool, model, data)
        if stepping:
            step(pool, data)
            check(pool, model, data)
    assert pool.live == sum(map(len, model.states.values()))


def test_a_full_region_moves_to_the_tail_with_its_sums() -> None:
    pool = Pool(["x"], rows=2, slots=1)
    a, b = pool.slot("a"), pool.slot("b")
    for k in range(20):  # interleaved: each append of one moves it past the other
        for s in (a, b):
            pool.append(np.array([s]), np.array([k]), {"x": np.array([0.1 * k])}, np.array([k]))
    for s in (a, b):
        assert pool.size(s) == 20
        total, valid, _ = pool.sums(pool.tracks["x"], np.array([s]), pool.start[[s]], pool.end[[s]])
        assert total[0] == math.fsum(0.1 * k for k in range(20)) and valid[0] == 20
    assert pool.wasted() > 0
    pool.compact()
    assert pool.wasted() == 0.0  # every row is some region's (header, rows or room)
    total, _, _ = pool.sums(pool.tracks["x"], np.array([a]), pool.start[[a]] + 5, pool.end[[a]])
    assert total[0] == math.fsum(0.1 * k for k in range(5, 20))


def test_a_full_region_with_a_pruned_front_shifts_back_in_place() -> None:
    """Single inserts into a full region whose front was pruned reuse the front (no move to the tail): the rows,
    their prefix sums and the pool's row accounting stay right."""
    pool = Pool(["x"], rows=2, slots=1)
    a, b = pool.slot("a"), pool.slot("b")
    for k in range(8):  # every row labelled: the rows a shift leaves behind hold labels
        pool.set_label(a, pool.insert(a, k, {"x": 0.1 * k}, k), 1.0, 50)
    pool.insert(b, 0, {"x": 1.0}, 100)  # after a's region: a cannot grow in place
    pool.prune_one(a, 5)  # drops 0..5, keeps 6, 7
    used, cap = pool.used, int(pool.cap[a])
    k = 8
    while int(pool.end[a]) < cap:
        pool.set_label(a, pool.insert(a, k, {"x": 0.1 * k}, k), 1.0, 50)
        k += 1
    pool.insert(a, k, {"x": 0.1 * k}, k)  # full: shifted back over the pruned front
    assert pool.used == used and int(pool.start[a]) == int(pool.base[a]) + 1
    assert pool.t[pool.start[a]:pool.end[a]].tolist() == list(range(6, k + 1))
    for j in range(k + 1, k + 4):  # into the rows the shift left behind: no label, as any new event
        pool.insert(a, j, {"x": 0.1 * j}, j)
    region = slice(int(pool.start[a]), int(pool.end[a]))
    assert pool.label[region].tolist() == [1.0] * (k - 6) + [0.0] * 4
    assert pool.label_at[region].tolist() == [50] * (k - 6) + [NO_LABEL_AT] * 4
    k += 3
    total, valid, _ = pool.sum_one(pool.tracks["x"], a, int(pool.start[a]), int(pool.end[a]))
    assert total == math.fsum(0.1 * j for j in range(6, k + 1)) and valid == k - 5
    total, _, _ = pool.sum_one(pool.tracks["x"], a, int(pool.start[a]) + 1, int(pool.end[a]))
    assert total == math.fsum(0.1 * j for j in range(7, k + 1))
    held = sum(int(pool.cap[s] - pool.start[s]) + 1 for s in (a, b))
    assert pool.held == held and pool.live == k - 5 + 1
    assert pool.t[pool.start[b]:pool.end[b]].tolist() == [0]


def test_a_batch_into_full_regions_with_pruned_fronts_shifts_them_back() -> None:
    """An append whose slots are full but hold pruned fronts as large as half what they must hold shifts them back
    in place (others still move to the tail): rows, prefix sums and the row accounting stay right."""
    pool = Pool(["x"], rows=2, slots=1)
    a, b, c = pool.slot("a"), pool.slot("b"), pool.slot("c")
    for k in range(8):  # a and b: room for 8 each after their first moves, c after them
        pool.append(np.array([a, b, c]), np.array([k, k, k]), {"x": np.array([0.1 * k, 0.2 * k, 1.0])},
                    np.array([k, 100 + k, 200 + k]))
    pool.prune(np.array([a, b]), np.array([5, 0]))  # a keeps 6, 7; b keeps 1..7
    used = pool.used
    full = [s for s in (a, b) if int(pool.cap[s] - pool.end[s]) < 2]
    assert a in full
    ks = [8, 9]
    for i in range(int(pool.start[a]), int(pool.end[a])):  # labelled rows: the shift leaves copies behind
        pool.set_label(a, i, 1.0, 50)
    pool.append(np.array([a, a]), np.array(ks), {"x": np.array([0.1 * k for k in ks])}, np.array(ks))
    assert pool.used == used and int(pool.start[a]) == int(pool.base[a]) + 1  # shifted back, not moved
    stop = int(pool.cap[a])
    assert pool.label[int(pool.end[a]):stop].tolist() == [0.0] * (stop - int(pool.end[a]))  # room: no label
    assert (pool.label_at[int(pool.end[a]):stop] == NO_LABEL_AT).all()
    assert pool.t[pool.start[a]:pool.end[a]].tolist() == [6, 7, 8, 9]
    total, valid, _ = pool.sum_one(pool.tracks["x"], a, int(pool.start[a]), int(pool.end[a]))
    assert total == math.fsum(0.1 * k for k in (6, 7, 8, 9)) and valid == 4
    assert pool.t[pool.start[b]:pool.end[b]].tolist() == list(range(1, 8))
    assert pool.t[pool.start[c]:pool.end[c]].tolist() == list(range(8))
    assert pool.held == sum(int(pool.cap[s] - pool.start[s]) + 1 for s in (a, b, c))


def test_rows_taken_back_are_room_without_labels() -> None:
    """A label set on an appended row that the append's undo takes back does not reach the next event there."""
    pool = Pool(["x"])
    a = pool.slot("a")
    pos = pool.append(np.array([a, a]), np.array([1, 2]), {"x": np.array([1.0, 2.0])}, np.array([1, 2]))
    pool.set_label(a, int(pos[1]), 1.0, 5)
    pool.truncate(np.array([a]), np.array([1]))
    i = pool.insert(a, 3, {"x": 3.0}, 3)
    assert i == int(pos[1]) and float(pool.label[i]) == 0.0 and int(pool.label_at[i]) == NO_LABEL_AT


def test_a_finer_value_rescales_only_its_slot_and_a_pruned_front_keeps_its_base() -> None:
    pool = Pool(["x"])
    u = pool.slots(["a", "b", "a", "b"])
    pool.append(u, np.array([1, 1, 2, 2]), {"x": np.array([0.5, 0.5, 0.25, 2**-60])}, np.arange(4))
    track = pool.tracks["x"]
    assert track.shift[pool.index["a"]] == 2 and track.shift[pool.index["b"]] == 60
    pool.prune(pool.slots(["b"]), np.array([1]))
    sb = pool.index["b"]
    assert track.prefix(int(pool.start[sb]) - 1) == 2**59  # the header row: 0.5 on the 2**-60 grid
    total, valid, _ = pool.sums(track, np.array([sb]), pool.start[[sb]], pool.end[[sb]])
    assert total[0] == 2**-60 and valid[0] == 1
    # a finer value after the prune: the region's sums and the pruned front's base move to the finer grid
    sa = pool.index["a"]
    pool.prune(np.array([sa]), np.array([1]))
    pool.append(np.array([sa]), np.array([3]), {"x": np.array([2**-70])}, np.array([9]))
    assert track.shift[sa] == 70 and track.prefix(int(pool.start[sa]) - 1) == 2**69
    total, valid, _ = pool.sums(track, np.array([sa]), pool.start[[sa]], pool.end[[sa]])
    assert total[0] == 0.25 + 2**-70 and valid[0] == 2
    pool.insert(sa, 2, {"x": 2**-80}, 10)
    total, valid, _ = pool.sums(track, np.array([sa, sa]), pool.start[[sa, sa]], pool.start[[sa, sa]] + [1, 3])
    assert total.tolist() == [0.25, 0.25 + 2**-80 + 2**-70] and valid.tolist() == [1, 3]


def test_a_sum_beyond_the_float_range_raises_as_fsum_does() -> None:
    pool = Pool(["x"])
    big = np.array([1.5e308, 1.5e308])
    pool.append(pool.slots(["a", "a"]), np.array([1, 2]), {"x": big}, np.arange(2))
    with pytest.raises(OverflowError):
        math.fsum(big.tolist())
    s = pool.index["a"]
    with pytest.raises(OverflowError):
        pool.sums(pool.tracks["x"], np.array([s]), pool.start[[s]], pool.end[[s]])
    with pytest.raises(OverflowError):
        pool.sum_one(pool.tracks["x"], s, int(pool.start[s]), int(pool.end[s]))


def test_a_pass_run_to_its_end_packs_every_region_in_place() -> None:
    """Without traffic, a compaction pass stepped to its end leaves no dead row (``used == held``), keeps the
    arrays, and every region its rows and sums."""
    pool = Pool(["x"], rows=2, slots=1)
    keys = [f"k{j}" for j in range(30)]
    rng = np.random.default_rng(4)
    for k in range(40):  # interleaved appends move regions to the tail; prunes leave dead fronts
        u = pool.slots([keys[j] for j in rng.integers(0, 30, 6)])
        pool.append(u, np.full(6, k), {"x": rng.random(6)}, np.arange(6 * k, 6 * k + 6))
        if k % 5 == 4:
            slots = np.unique(u)
            pool.prune(slots, np.full(len(slots), k - 3))
    want = {key: (pool.t[pool.start[s]:pool.end[s]].tolist(),
                  pool.sum_one(pool.tracks["x"], s, int(pool.start[s]), int(pool.end[s])))
            for key, s in pool.index.items()}
    size, live = len(pool.t), pool.live
    assert pool.wasted() > 0.3
    pool.begin_pass()
    steps = 0
    while pool.cursor >= 0:
        pool.compact_step(7)
        steps += 1
        check_rows(pool)
    assert steps > 5 and pool.used == pool.held and pool.wasted() == 0.0
    assert len(pool.t) == size and pool.live == live
    assert {key: (pool.t[pool.start[s]:pool.end[s]].tolist(),
                  pool.sum_one(pool.tracks["x"], s, int(pool.start[s]), int(pool.end[s])))
            for key, s in pool.index.items()} == want


def test_passes_keep_up_with_steady_traffic_without_growing_the_arrays() -> None:
    """Steady traffic (each state keeps its last events; its region moves when full): tidy() after every call
    starts passes when half the rows are dead, each pass ends within a bounded number of calls, the dead share
    stays bounded and the arrays stop growing once they hold the working set."""
    pool = Pool(["x"])
    rng = np.random.default_rng(7)
    keys = [f"k{j}" for j in range(300)]
    sizes, passes, longest, calls_in_pass = [], 0, 0, 0
    for k in range(1, 1500):
        u = pool.slots([keys[j] for j in rng.integers(0, 300, 20)])
        pool.append(u, np.full(20, k), {"x": rng.random(20)}, np.arange(20 * k, 20 * k + 20))
        slots = np.unique(u)
        pool.prune(slots, np.full(len(slots), k - 150))  # about 10 events per state stay
        before = pool.passes
        pool.tidy()
        if pool.cursor >= 0:
            calls_in_pass += 1
        else:
            longest = max(longest, calls_in_pass + (pool.passes > before))
            calls_in_pass = 0
        passes = pool.passes
        sizes.append(len(pool.t))
        assert pool.wasted() < 0.75
    assert passes >= 3 and longest < 100
    assert sizes[-1] == sizes[len(sizes) // 3]  # no growth in the last two thirds
    check_rows(pool)
