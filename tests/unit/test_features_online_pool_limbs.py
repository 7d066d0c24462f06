"""online_pool.Track limbs: window sums converted from two int64 limbs equal Python's exact int division, limb
carries in single inserts, mid-region inserts and label changes, and wide slots (prefixes beyond the limbs) give
the features of a store that scans every window and of the offline table."""

from __future__ import annotations

import math
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keel.features import online_batch, online_pool
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.offline import compute_features
from keel.features.online import OnlineStore
from keel.features.online_pool import WIDE, Pool
from keel.spec import Data, Features

LIMB = 2**48


def limbs(x: int) -> tuple[int, int]:
    return x >> 48, x & (LIMB - 1)


# differences D: small, around the limb (2**48), around the float conversion's guard (|hi| difference 2**53,
# i.e. |D| near 2**101) and up to what the limbs hold (|hi| < 2**62 per prefix)
diffs = (st.integers(-(2**60), 2**60) | st.integers(-(2**102), 2**102) | st.integers(-(2**109), 2**109)
         | st.builds(lambda k, d: (1 << k) + d, st.integers(0, 109), st.integers(-3, 3))
         | st.builds(lambda h, lo: (h << 48) + lo, st.integers(-(2**61), 2**61), st.integers(-(2**48) + 1, 2**48 - 1)))
bases = st.integers(-(2**108), 2**108)


@settings(max_examples=300, deadline=None)
@given(queries=st.lists(st.tuples(bases, diffs, st.integers(0, 1200)), min_size=1, max_size=8))
@example(queries=[(0, ((2**53 + 1) << 48) + 1, 0)])  # a 54-bit hi difference: two roundings would give 2**101
@example(queries=[(5, -(((2**53 + 1) << 48) + 1), 60)])
@example(queries=[(0, 5 * 2**60 + 1, 1135)])  # a subnormal result: ldexp would round 2.5 * 2**-1074 to even
@example(queries=[(2**100, 0, 3), (-(2**90), 0, 0)])  # +0.0
def test_window_sums_from_limbs_are_the_exact_int_division(queries) -> None:
    """Pool.sums (vectorised) and sum_one of a window whose prefixes are ``base`` and ``base + D`` on the grid
    ``2**-shift`` give ``D / 2**shift`` correctly rounded (Python's int division, Fraction), +0.0 for D == 0,
    subnormal results included."""
    pool = Pool(["x"])
    track = pool.tracks["x"]
    u = pool.slots([str(j) for j in range(len(queries))])
    pool.append(u, np.zeros(len(u), dtype=np.int64), {"x": np.zeros(len(u))}, np.arange(len(u)))
    for s, (base, d, shift) in zip(u.tolist(), queries, strict=True):
        i = int(pool.start[s])
        track.hi[i - 1], track.lo[i - 1] = limbs(base)
        track.hi[i], track.lo[i] = limbs(base + d)
        track.shift[s] = shift
    total, valid, _ = pool.sums(track, u, pool.start[u], pool.end[u])
    for j, (s, (_, d, shift)) in enumerate(zip(u.tolist(), queries, strict=True)):
        want = d / (1 << shift)
        assert want == float(Fraction(d, 1 << shift))
        assert total[j] == want and math.copysign(1.0, total[j]) == math.copysign(1.0, want), (d, shift)
        assert pool.sum_one(track, s, int(pool.start[s]), int(pool.end[s]))[0] == want
    assert valid.tolist() == [1] * len(queries)


@pytest.mark.parametrize("up", [1, 13, 15, 40, 47, 48, 49, 60, 100])
def test_a_rescale_moves_every_prefix_exactly_or_widens(up: int) -> None:
    """Track.rescale of a region (header included) by ``up`` bits: every prefix times ``2**up`` exactly, in
    canonical limbs; a prefix that would outgrow the limbs widens the slot instead."""
    rng = np.random.default_rng(up)
    for outgrow in (False, True):
        pool = Pool(["x"])
        s = pool.slot("a")
        pool.append(np.full(100, s), np.arange(100), {"x": np.zeros(100)}, np.arange(100))
        track = pool.tracks["x"]
        start, end = int(pool.start[s]), int(pool.end[s])
        top = max(108 - up, 1)
        prefixes = [int(x) * (1 << max(top - 62, 0)) for x in rng.integers(-(2**min(top, 62)), 2**min(top, 62), 101)]
        if outgrow:
            prefixes[37] = 1 << (111 - up) if up < 111 else 1
        for i, x in enumerate(prefixes):
            track.hi[start - 1 + i], track.lo[start - 1 + i] = limbs(x)
        track.rescale(s, up, start, end)
        if outgrow:
            assert track.shift[s] == WIDE
            continue
        assert track.shift[s] == up
        assert [track.prefix(i) for i in range(start - 1, end)] == [x << up for x in prefixes]
        assert ((track.lo[start - 1:end] >= 0) & (track.lo[start - 1:end] < LIMB)).all()


def test_single_inserts_carry_across_the_limbs_and_stay_canonical() -> None:
    """Single events (the fast path, rescales, inserts in the middle of a region) whose prefixes cross 2**48 and
    2**96 both ways, with negative terms: every window equals the exact sum; every prefix is canonical."""
    pool = Pool(["x"])
    s = pool.slot("a")
    track = pool.tracks["x"]
    vals: list[float] = []
    times: list[int] = []
    seq = 0

    def add(t: int, v: float) -> None:
        nonlocal seq
        pool.insert(s, t, {"x": v}, seq)
        seq += 1
        k = sum(1 for x in times if x <= t)
        times.insert(k, t)
        vals.insert(k, v)
        rows = slice(int(pool.start[s]) - 1, int(pool.end[s]))
        assert ((track.lo[rows] >= 0) & (track.lo[rows] < LIMB)).all()  # canonical after every insert

    for j in range(6):
        add(10 * j, 2.0**47 - 0.5)  # grid 2**-1: terms of 2**48 - 1 (a carry in lo nearly every time)
    add(100, -(2.0**48))  # a borrow
    add(110, 2.0**95)  # to 2**96 and beyond
    add(120, 2.0**95 + 2.0**43)
    add(130, -(2.0**96))
    add(5, 0.25)  # in the middle (and a rescale to 2**-2 of every prefix)
    add(55, -(2.0**47) - 0.125)  # in the middle, finer again, negative
    add(56, 2.0**-8)  # a finer grid: prefixes near 2**104 (2**56 in hi)
    assert track.shift[s] == 8
    start, end = int(pool.start[s]), int(pool.end[s])
    assert pool.t[start:end].tolist() == times
    assert ((track.lo[start - 1:end] >= 0) & (track.lo[start - 1:end] < LIMB)).all()
    n = len(vals)
    lo = np.repeat(np.arange(n + 1), n + 1)
    hi = np.tile(np.arange(n + 1), n + 1)
    keep = lo <= hi
    lo, hi = lo[keep] + start, hi[keep] + start
    total, _, _ = pool.sums(track, np.full(len(lo), s), lo, hi)
    want = [math.fsum(vals[a - start:b - start]) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    assert total.tolist() == want
    exact = [sum(map(Fraction, vals[:i])) for i in range(n + 1)]
    assert [Fraction(track.prefix(start - 1 + i) - track.prefix(start - 1), 2**8) for i in range(n + 1)] == exact


def test_labels_set_on_a_limb_track_carry_through_every_later_prefix() -> None:
    pool = Pool(["x"])
    s = pool.slot("a")
    for k in range(8):
        pool.insert(s, k, {"x": 1.0}, k)
    start = int(pool.start[s])
    labels = [0.0] * 8
    for i, y in [(1, 2.0**47 - 0.5), (3, 2.0**47 - 0.5), (4, 2.0**47 - 0.25), (2, -(2.0**50)), (5, 2.0**95), (3, 0.0), (6, 2.0**-12)]:
        pool.set_label(s, start + i, y, 1)
        labels[i] = y
        total, _, _ = pool.sums(pool.labels, np.full(9, s), np.full(9, start), start + np.arange(9))
        assert total.tolist() == [math.fsum(labels[:i]) for i in range(9)]
    assert pool.labels.shift[s] == 12  # (2**95 on 2**-12: 2**107, still on limbs)
    rows = slice(start - 1, int(pool.end[s]))
    assert ((pool.labels.lo[rows] >= 0) & (pool.labels.lo[rows] < LIMB)).all()


@pytest.mark.parametrize("single", [True, False])
def test_a_slot_goes_wide_and_its_windows_scan_the_same_numbers(single: bool) -> None:
    """A value whose term on the slot's grid outgrows the limbs (1e30 on a 2**-60 grid; 1e300 after 1e-300) makes
    the slot wide, in a batch or a single insert; its windows then equal fsum of the window, other slots keep
    their limbs, and later appends, inserts, prunes, moves and undos keep every window right."""
    pool = Pool(["x"], rows=4, slots=1)
    state: dict[str, list[tuple[int, float]]] = {"a": [], "b": [], "c": []}  # (time, value) in order
    t = 0

    def push(key: str, v: float, one: bool, at: int | None = None) -> None:
        nonlocal t
        t += 1
        when = t if at is None else at
        s = pool.slot(key)
        if one:
            pool.insert(s, when, {"x": v}, t)
        else:
            pool.append(np.array([s]), np.array([when]), {"x": np.array([v])}, np.array([t]))
        state[key].insert(sum(1 for x, _ in state[key] if x <= when), (when, v))

    def check() -> None:
        for key, entries in state.items():
            s = pool.index[key]
            vs = [v for _, v in entries]
            m = len(vs)
            assert pool.t[pool.start[s]:pool.end[s]].tolist() == [x for x, _ in entries]
            total, valid, _ = pool.sums(pool.tracks["x"], np.full(m + 1, s), np.full(m + 1, pool.start[s]),
                                        pool.start[s] + np.arange(m + 1))
            assert total.tolist() == [math.fsum(vs[:i]) for i in range(m + 1)], key
            assert valid.tolist() == list(range(m + 1))
            assert [pool.sum_one(pool.tracks["x"], s, int(pool.start[s]) + i, int(pool.end[s]))[0]
                    for i in range(m + 1)] == [math.fsum(vs[i:]) for i in range(m + 1)], key

    for v in [0.1, 2.0**-60, 3.0]:
        push("a", v, single)
        push("b", v, single)
        push("c", 1e-300, single)
    track = pool.tracks["x"]
    assert track.shift[pool.index["a"]] == 60
    if single:
        push("a", 1e30, True)
        push("c", 1e300, True)
    else:  # one batch: a and c go wide in the middle of it, b stays on limbs
        keys = ["b", "a", "c", "a", "b"]
        batch = [1.5, 1e30, 1e300, 2.0, 0.25]
        pool.append(pool.slots(keys), np.arange(t + 1, t + 6), {"x": np.array(batch)}, np.arange(t + 1, t + 6))
        for j, (key, v) in enumerate(zip(keys, batch, strict=True)):
            state[key].append((t + 1 + j, v))
        t += 5
    assert track.shift[pool.index["a"]] == WIDE and track.shift[pool.index["c"]] == WIDE
    assert track.shift[pool.index["b"]] == 60
    check()
    for k in range(12):  # more traffic on the wide slots: moves to the tail, single events
        push("a", 0.1 * k, k % 2 == 0)
        push("c", -1e300 if k == 3 else 1e-300 * k, k % 3 == 0)
    slots = pool.slots(["a", "c"])
    sizes = pool.end[slots] - pool.start[slots]
    pool.append(slots, np.array([t + 1, t + 1]), {"x": np.array([5.0, 7.0])}, np.array([1, 2]))
    pool.truncate(slots, sizes)  # an undo
    check()
    pool.prune(slots, np.array([6, 6]))
    for key in ("a", "c"):
        state[key] = [(x, v) for x, v in state[key] if x > 6]
    push("a", 0.5, True, at=t - 3)  # in the middle of a wide region
    push("c", 2.5, True, at=t - 9)
    check()
    pool.compact()
    check()


def test_compact_gives_a_wide_slot_its_limbs_back_once_its_values_fit() -> None:
    """A slot wide because of a value now pruned gets its limbs back at compact() (on the grid its remaining
    values need); one whose values still do not fit stays wide; windows are right either way, and later events
    keep them right."""
    pool = Pool(["x"])
    u = pool.slots(["a", "a", "a", "a", "b", "b", "b"])
    vals = [1e30, 2.0**-60, 1.0, float("nan"), 1e30, 2.0**-60, 1.5]
    pool.append(u, np.array([1, 2, 3, 4, 1, 2, 3]), {"x": np.array(vals)}, np.arange(7))
    pool.set_label(int(u[0]), int(pool.start[u[0]]), 1e300, 0)  # a wide label track, its 1e300 pruned below
    pool.set_label(int(u[0]), int(pool.start[u[0]]) + 1, 1e-300, 0)
    track = pool.tracks["x"]
    a, b = pool.index["a"], pool.index["b"]
    assert track.shift[a] == WIDE and track.shift[b] == WIDE and pool.labels.shift[a] == WIDE
    pool.prune(np.array([a]), np.array([1]))  # a's 1e30 (and 1e300 label) go; b keeps both extremes
    pool.compact()
    assert track.shift[a] == 60 and track.shift[b] == WIDE
    assert pool.labels.shift[a] == (1e-300).as_integer_ratio()[1].bit_length() - 1  # (1e-300 alone now)
    pool.append(np.array([a, b]), np.array([5, 5]), {"x": np.array([0.25, 0.25])}, np.array([7, 8]))
    pool.insert(a, 2, {"x": 3.0}, 9)
    want = {a: [2.0**-60, 3.0, 1.0, float("nan"), 0.25], b: [1e30, 2.0**-60, 1.5, 0.25]}
    for s, vs in want.items():
        m = len(vs)
        total, valid, _ = pool.sums(track, np.full(m + 1, s), np.full(m + 1, pool.start[s]),
                                    pool.start[s] + np.arange(m + 1))
        assert total.tolist() == [math.fsum(v for v in vs[:i] if v == v) for i in range(m + 1)]
        assert valid.tolist() == [sum(v == v for v in vs[:i]) for i in range(m + 1)]
    labels, _, _ = pool.sums(pool.labels, np.array([a]), pool.start[[a]], pool.end[[a]])
    assert labels.tolist() == [1e-300]
    rows = slice(int(pool.start[a]) - 1, int(pool.end[a]))
    assert ((track.lo[rows] >= 0) & (track.lo[rows] < LIMB)).all()


def test_a_batch_whose_running_sum_outgrows_the_limbs_widens_its_slot() -> None:
    """Terms each within the limbs (2**108 < 2**109) whose running sum in one batch passes 2**110: the slot goes
    wide (its windows scan) rather than wrapping around int64."""
    pool = Pool(["x"])
    u = pool.slots(["a"] * 9 + ["b"] * 3)
    vals = [2.0**108] * 9 + [2.0**107, 2.0**107, 3.0]  # (b: 2**108 + 3, on limbs)
    pool.append(u, np.arange(12), {"x": np.array(vals)}, np.arange(12))
    a, b = pool.index["a"], pool.index["b"]
    assert pool.tracks["x"].shift[a] == WIDE and pool.tracks["x"].shift[b] == 0
    for s, vs in ((a, vals[:9]), (b, vals[9:])):
        m = len(vs)
        total, _, _ = pool.sums(pool.tracks["x"], np.full(m + 1, s), np.full(m + 1, pool.start[s]),
                                pool.start[s] + np.arange(m + 1))
        assert total.tolist() == [math.fsum(vs[:i]) for i in range(m + 1)]
    assert pool.tracks["x"].prefix(int(pool.end[b]) - 1) - pool.tracks["x"].prefix(int(pool.start[b]) - 1) == (
        2**108 + 3)


# --- the store: wide slots give the scanning store's features and the offline table's ----------------------

FEATURES = Features.model_validate({
    "raw": ["amount"],
    "windows": [
        {"entity": "card", "aggregates": ["count", "sum", "mean"], "column": "amount", "windows": ["1h", "1d"]},
        {"entity": "card", "aggregates": ["sum"], "column": "amount", "windows": ["1h"], "include_current": False,
         "name": "card_prev_{aggregate}_{window}"},
        {"entity": "shop", "aggregates": ["label_count", "label_rate"], "windows": ["6h"], "delay": "2h"},
    ],
})
DATA = Data.model_validate({"source": "x", "timestamp": "ts", "label": "y", "label_delay": "2h", "id_column": "id"})
DEFS = resolve_definitions(FEATURES, DATA)
NAMES = feature_names(DEFS)
BASE = pd.Timestamp("2024-03-01")


def frame_of(amounts: list[float], cards: list[int], labels: list[float]) -> pd.DataFrame:
    n = len(amounts)
    return pd.DataFrame({"id": np.arange(n), "ts": BASE + pd.to_timedelta(np.arange(n) * 3, unit="m"),
                         "card": cards, "shop": [c % 2 for c in cards], "amount": amounts, "y": labels})


def run_store(path: Path, frame: pd.DataFrame, batch: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """Features of every event; labels arrive 2h after their event (told before the part of 40 events in which
    they arrive, with their arrival time). ``batch``: the parts through features_many (the batch path), else
    event by event. Also returns how many value tracks and label tracks of states were wide at the end."""
    rows = frame.to_dict("records")
    out = []
    with OnlineStore(path, DEFS, timestamp="ts", label="y", id_column="id") as store:
        due = 0
        for i in range(0, len(rows), 40):
            part = rows[i:i + 40]
            while rows[due]["ts"] + timedelta(hours=2) <= part[-1]["ts"]:
                store.add_label(rows[due]["id"], float(rows[due]["y"]), rows[due]["ts"] + timedelta(hours=2))
                due += 1
            if batch:
                out.append(store.features_many(part, stage=True).matrix)
            else:
                for e in part:
                    out.append(np.array([store.features(e)[n] for n in NAMES])[None, :])
                    store.stage(e)
            store.commit_staged()
        wide = (sum(int((t.shift[:len(p.keys)] == WIDE).sum()) for p in store._pools.values()
                    for t in p.tracks.values()),
                sum(int((p.labels.shift[:len(p.keys)] == WIDE).sum()) for p in store._pools.values()))
    return np.vstack(out), wide


@pytest.mark.parametrize("extreme", [True, False])
def test_wide_states_give_the_features_of_the_scanning_store_and_the_offline_table(tmp_path, monkeypatch,
                                                                                    extreme) -> None:
    """States that go wide (on values and on labels) give, in single events and in batches, the bits of a store
    that scans every window, and (``extreme=False``: tiny values next to money, 3 * 2**-110 against a 2**7 grid
    step) the offline table's numbers. (With 1e300 in a column the offline table's column-wide prefix sums are
    not accurate for the other states, so the extreme frame is compared with the scanning store only.)"""
    rng = np.random.default_rng(5)
    n = 240
    cards = np.array(rng.integers(0, 6, n))
    amounts = np.round(rng.gamma(2.0, 30.0, n), 2)
    labels = np.where(rng.random(n) < 0.3, 1.0, 0.0)
    odd = rng.random(n)
    if extreme:
        amounts[(odd < 0.1) & (cards == 0)] = 1e300  # card 0: 1e300 next to 1e-300
        amounts[(odd > 0.9) & (cards == 0)] = 1e-300
        amounts[(odd < 0.15) & (cards == 1)] = 1e30  # card 1: 1e30 on a 2**-60 grid
        amounts[(odd > 0.85) & (cards == 1)] = 2.0**-60
        labels[(odd < 0.1)] = 1e300  # wide label tracks too
        labels[(odd > 0.95)] = 1e-300
    else:
        amounts[(odd > 0.8) & (cards <= 1)] = 3 * 2.0**-110
        labels[(odd > 0.9)] = 3 * 2.0**-110
    frame = frame_of(amounts.tolist(), cards.tolist(), labels.tolist())
    taken: list[bool] = []
    real = online_batch.features_batch

    def spy(store: OnlineStore, events: list[dict]) -> object:
        out = real(store, events)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(online_batch, "features_batch", spy)
    got = {b: run_store(tmp_path / f"limbs{b}.sqlite", frame, b) for b in (False, True)}
    assert taken and all(taken)  # (the batch path answered every part)
    monkeypatch.setattr(online_pool, "EXACT", False)
    scanned, _ = run_store(tmp_path / "scan.sqlite", frame, False)
    for b in (False, True):
        matrix, wide = got[b]
        assert wide[0] == 2 and wide[1] >= 2, b  # cards 0 and 1; the labels of some states
        assert matrix.tobytes() == scanned.tobytes(), b
    column = scanned[:, NAMES.index("card_sum_1h")]  # the wide values did reach the windows
    assert ((np.abs(column) >= 1e300) if extreme else (column != np.round(column, 2))).any()
    if not extreme:
        offline = compute_features(frame, DEFS, timestamp="ts", label="y")[NAMES].to_numpy(dtype=float)
        np.testing.assert_allclose(scanned, offline, rtol=1e-12, atol=1e-12)
