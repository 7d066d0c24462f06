"""features_many(stage=True) on the batch path: bit for bit what features() then stage() give event by event, and
the same state in memory and on disk after the commit."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.features import online_batch
from keel.features.definitions import resolve_definitions
from keel.features.online import OnlineStore, stored_rows
from keel.features.online_pool import NEVER, WIDE
from keel.spec import Data, Features

BASE = pd.Timestamp("2024-03-01 00:00:00")
DATA = Data.model_validate(
    {"source": "x", "timestamp": "ts", "label": "y", "label_delay": "2h", "id_column": "id"}
)
# Every aggregate: std/min/max and include_current=False windows go through the per-event path inside a batch.
RICH = resolve_definitions(
    Features.model_validate(
        {
            "raw": ["amount"],
            "row": [{"name": "night", "kind": "is_night", "column": "ts"}],
            "windows": [
                {"entity": "card", "aggregates": ["count", "sum", "mean", "min", "max", "std"],
                 "column": "amount", "windows": ["1h", "1d"]},
                {"entity": "card", "aggregates": ["count", "mean"], "column": "amount", "windows": ["1h"],
                 "include_current": False, "name": "card_prev_{aggregate}_{window}"},
                {"entity": "shop", "aggregates": ["count", "label_count", "label_rate"], "windows": ["1h", "6h"],
                 "delay": "2h"},
            ],
            "ratios": [{"name": "amount_vs_mean", "numerator": "amount", "denominator": "card_mean_1d"}],
            "freshness": "12h",
        }
    ),
    DATA,
)
# The serving example's shape: counts, means and label rates only, every window on the array path.
ARRAYS = resolve_definitions(
    Features.model_validate(
        {
            "raw": ["amount"],
            "windows": [
                {"entity": "card", "aggregates": ["count", "sum", "mean"], "column": "amount",
                 "windows": ["1h", "1d"]},
                {"entity": "shop", "aggregates": ["count", "label_rate", "label_count"], "windows": ["1h", "6h"],
                 "delay": "2h"},
            ],
            "freshness": "3h",
        }
    ),
    DATA,
)
ODD = [np.nan, 0.0, -0.0, 1e-300, 1e12 + 0.1, 1 / 3, 2.5, 57.16, 0.01, 999.99]


def open_store(path: Path, defs) -> OnlineStore:
    return OnlineStore(path, defs, timestamp="ts", label="y", id_column="id", freshness=timedelta(hours=3))


def event(i: int | None, minute: int, card: int, shop: int, amount: float) -> dict:
    return {"id": i, "ts": BASE + timedelta(minutes=minute), "card": card, "shop": shop, "amount": amount}


def one_by_one(store: OnlineStore, batch: list[dict]) -> tuple[np.ndarray, list[bool]]:
    """The reference: features() then stage() per event; an event whose features fail gets NaN, unstaged."""
    rows, stale = [], []
    for e in batch:
        try:
            row = store.features(e)
        except Exception:  # a missing entity (FeatureError), -inf + inf in one window (ValueError)
            rows.append([np.nan] * len(store.feature_names))
            stale.append(False)
            continue
        rows.append([row[n] for n in store.feature_names])
        stale.append(row.stale)
        store.stage(e)
    return np.array(rows, dtype=float).reshape(len(batch), -1), stale


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per features_many call that tries it, whether the batch path answered."""
    calls: list[bool] = []
    real = online_batch.features_batch

    def spy(store, events):
        out = real(store, events)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(online_batch, "features_batch", spy)
    return calls


def compare(tmp: Path, defs, history: list[dict], labels: list[tuple], batch: list[dict], preload: bool) -> None:
    """Batch and replay give the same bits, stale flags, commit count, and later features (memory and disk)."""
    one, many = open_store(tmp / "one.sqlite", defs), open_store(tmp / "many.sqlite", defs)
    for s in (one, many):
        s.update_many(history)
        for event_id, y, at in labels:
            s.add_label(event_id, y, at)
        if preload:
            s.preload()
    held_when_labelled = set(one._owners)
    expected, expected_stale = one_by_one(one, batch)
    out = many.features_many(batch, stage=True)
    assert np.array_equal(out.matrix, expected, equal_nan=True), np.argwhere(
        ~((out.matrix == expected) | (np.isnan(out.matrix) & np.isnan(expected))))
    assert out.stale.tolist() == expected_stale
    assert out.failed.tolist() == [bool(np.isnan(r).all()) for r in expected]
    assert_same_memory(one, many, preloaded=preload)
    stored = {str(e["id"]) for e, failed in zip(batch, out.failed.tolist(), strict=True) if not failed}
    for store in (one, many):
        assert_consistent(store, labels, held_when_labelled | stored)
    assert one.commit_staged() == many.commit_staged()
    assert held_on_disk(one) == held_on_disk(many)
    assert_same_state_after(one, many, tmp / "many.sqlite", defs, history + batch)


def _track(pool, track, slot: int) -> tuple:
    """What windows read of a state's prefix sums: each entry's exact sum, valid and infinity counts since the
    region's header row (a prune only moves the header), as exact fractions."""
    start, end = int(pool.start[slot]), int(pool.end[slot])
    shift = int(track.shift[slot])
    if shift == WIDE:  # no limbs kept: the windows scan
        return None, (track.valid[start:end] - track.valid[start - 1]).tolist(), (
            track.bad[start:end] - track.bad[start - 1]).tolist()
    return ([Fraction(track.prefix(i) - track.prefix(start - 1), 2**shift) for i in range(start, end)],
            (track.valid[start:end] - track.valid[start - 1]).tolist(),
            (track.bad[start:end] - track.bad[start - 1]).tolist())


def states(store: OnlineStore) -> dict:
    """Every state of every pool by (entity, key): its rows (floats as their bytes; but the seqs of rows,
    numbered per event on the replay and per entity column on the batch path), latest label arrival and tracks."""
    out = {}
    for entity, pool in store._pools.items():
        for key, slot in pool.index.items():
            r = slice(int(pool.start[slot]), int(pool.end[slot]))
            out[(entity, key)] = (
                pool.t[r].tolist(), pool.ids[r].tolist(), {c: v[r].tobytes() for c, v in pool.values.items()},
                pool.label[r].tobytes(), pool.label_at[r].tolist(), r.stop - r.start, int(pool.late[slot]),
                {c: _track(pool, t, slot) for c, t in pool.tracks.items()},
                _track(pool, pool.labels, slot) if pool.late[slot] != NEVER else None)  # (kept once labelled)
    return out


def owners(store: OnlineStore) -> dict:
    """The owner map with each owner as the (entity, key) of its state, in order."""
    named = {}
    for event_id, codes in store._owners.items():
        found = []
        for code in codes:
            pool, slot = store._owned(code)
            entity = next(e for e, p in store._pools.items() if p is pool)
            found.append((entity, pool.keys[slot]))
        named[event_id] = tuple(found)
    return named


def memory(store: OnlineStore) -> tuple[dict, dict, dict]:
    """Everything the store holds in memory: its states, owner map and the labels waiting for their events."""
    return states(store), owners(store), dict(store._pending)


def assert_same_memory(reference: OnlineStore, store: OnlineStore, *, preloaded: bool) -> None:
    """The same in-memory states (rows bit for bit, prefix sums as exact differences: what windows read), owners
    and waiting labels."""
    want, got = memory(reference), memory(store)
    assert got[1:] == want[1:]
    assert got[0].keys() == want[0].keys()
    for entity_key, w in want[0].items():
        assert got[0][entity_key] == w, (entity_key, preloaded)


def assert_consistent(store: OnlineStore, labels: list[tuple], held_since: set[str]) -> None:
    """What the store keeps beside its states agrees with them: a state holds an event id once, the owner map
    names exactly the states holding each event id, and a labelled event no state holds waits in ``_pending``
    with its latest label, unless a state held it after that label came (``held_since``): it then left every
    state and its label is forgotten."""
    held: dict[str, set] = {}
    for (entity, key), state in states(store).items():
        ids = [i for i in state[1] if i is not None]
        assert len(ids) == len(set(ids)), (entity, key)
        for i in ids:
            held.setdefault(i, set()).add((entity, key))
    assert {i: set(named) for i, named in owners(store).items()} == held
    latest = {str(i): (float(y), int(pd.Timestamp(at).value)) for i, y, at in labels}
    for i, label in latest.items():
        if i not in held:
            assert store._pending.get(i) == (None if i in held_since else label), i


def held_on_disk(store) -> list[tuple]:
    """The stored rows (rows and blocks) of the events memory holds, but their seqs, in a canonical order; every
    row memory holds must be on disk (the rows of pruned events a block still holds are not compared: a load
    prunes them again)."""
    held = {seq for pool in store._pools.values() for seq in pool.seq[pool.rows(np.arange(len(pool.keys)))].tolist()}
    with sqlite3.connect(store.path) as db:
        rows = [row for row in stored_rows(db) if row[0] in held]
    assert len(rows) == len(held)
    return sorted((row[1:] for row in rows), key=lambda row: tuple(map(str, row)))


def assert_same_state_after(reference, store, path: Path, defs, events: list[dict]) -> None:
    """Probe events after the newest of ``events`` see the same features in ``store`` as in ``reference``, and
    again once ``store`` is reopened from ``path`` (what its commits wrote reloads to the same state). Closes both."""
    last = max([e["ts"] for e in events])
    probes = [event(10**6 + k, 0, card, shop, 1.5) | {"ts": last + timedelta(minutes=k)}
              for k, (card, shop) in enumerate([(0, 0), (1, 2), (2, 1), (7, 7)])]
    want = reference.features_many(probes).matrix  # not staged: each probe sees the state the batch left
    assert np.array_equal(store.features_many(probes).matrix, want, equal_nan=True)
    reference.close()
    store.close()
    with open_store(path, defs) as again:
        assert np.array_equal(again.features_many(probes).matrix, want, equal_nan=True)


def in_order_batch(rng: np.random.Generator, first_id: int, start: int, n: int, amounts: list[float]) -> list[dict]:
    minutes = start + np.sort(rng.integers(0, 600, n))
    return [event(first_id + k, int(m), int(rng.integers(0, 3)), int(rng.integers(0, 3)), amounts[k % len(amounts)])
            for k, m in enumerate(minutes)]


@pytest.mark.parametrize("defs", [ARRAYS, RICH], ids=["arrays", "rich"])
@pytest.mark.parametrize("preload", [True, False])
def test_an_in_order_batch_takes_the_batch_path_and_matches_the_replay(tmp_path, taken, defs, preload) -> None:
    rng = np.random.default_rng(5)
    history = in_order_batch(rng, 0, 0, 120, [10.0, 57.16, np.nan, 0.01])
    labels = [(e["id"], 1, e["ts"] + timedelta(hours=int(rng.integers(1, 5)))) for e in history[::4]]
    batch = in_order_batch(rng, 1000, 700, 200, ODD)
    batch[3]["id"] = None  # events without an id are staged every time, as one by one
    batch[10]["ts"] = batch[9]["ts"]  # a tie
    batch[11] |= {"card": 42, "shop": 43}  # entities never seen: unknown, not stale
    compare(tmp_path, defs, history, labels, batch, preload)
    assert taken == [True]


def test_labels_arriving_after_batch_events_are_scanned_with_their_arrival_time(tmp_path, taken) -> None:
    rng = np.random.default_rng(6)
    history = in_order_batch(rng, 0, 0, 120, [1.0])
    batch = in_order_batch(rng, 1000, 650, 60, [2.0])
    # Arrival times inside the batch's span: earlier batch events must not see them, later ones must.
    labels = [(e["id"], 1, batch[0]["ts"] + timedelta(minutes=int(rng.integers(0, 600)))) for e in history[40:]]
    compare(tmp_path, ARRAYS, history, labels, batch, preload=True)
    assert taken == [True]


def test_an_infinity_in_a_stored_state_keeps_its_windows_exact(tmp_path, taken) -> None:
    rng = np.random.default_rng(7)
    history = in_order_batch(rng, 0, 0, 60, [5.0, np.inf, 3.25])
    batch = in_order_batch(rng, 1000, 640, 40, [1.0, 2.5])
    compare(tmp_path, RICH, history, [], batch, preload=True)
    assert taken == [True]


def test_a_batch_whose_windows_fail_is_taken_back_and_replayed(tmp_path, taken) -> None:
    """-inf and +inf in one window: the event's features fail (it is not staged) on the replay; the batch path
    meets the error after staging, takes every event back out and replays, leaving no trace."""
    rng = np.random.default_rng(7)
    history = in_order_batch(rng, 0, 0, 60, [5.0, np.inf, -np.inf, 3.25])
    batch = in_order_batch(rng, 1000, 640, 40, [1.0, 2.5])
    compare(tmp_path, RICH, history, [], batch, preload=True)
    assert taken == [False]


@pytest.mark.parametrize(
    "change",
    ["out_of_order", "duplicate_in_batch", "already_stored", "label_waiting", "infinity", "missing_entity"],
)
def test_batches_the_array_path_cannot_promise_are_replayed(tmp_path, taken, change) -> None:
    rng = np.random.default_rng(8)
    history = in_order_batch(rng, 0, 0, 80, [4.0, 6.5])
    batch = in_order_batch(rng, 1000, 650, 40, [1.0, 7.25])
    labels = [(history[5]["id"], 1, history[5]["ts"])]
    if change == "out_of_order":
        batch[20], batch[21] = batch[21], batch[20]
        batch[21] = batch[21] | {"card": batch[20]["card"], "ts": batch[20]["ts"] - timedelta(minutes=1)}
    elif change == "duplicate_in_batch":
        batch[30] = dict(batch[2])
    elif change == "already_stored":
        batch[0] = history[-1]
    elif change == "label_waiting":
        labels.append((batch[7]["id"], 1, batch[0]["ts"]))  # a label that came before its event
    elif change == "infinity":
        batch[9]["amount"] = np.inf
    else:
        del batch[12]["shop"]
    compare(tmp_path, RICH, history, labels, batch, preload=True)
    assert taken == [False]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_a_batch_equals_the_replay(tmp_path_factory, data) -> None:
    """Random histories, labels and batches (often in order, sometimes with the cases the array path refuses):
    the batch gives the replay's bits whichever path answers."""
    defs = data.draw(st.sampled_from([ARRAYS, RICH]))
    n_hist = data.draw(st.integers(0, 25))
    n = data.draw(st.integers(32, 48))  # at least online._BATCH_MIN: the batch path is tried
    amount = st.sampled_from(ODD) | st.integers(0, 100_000).map(lambda c: c / 100)
    hist_minutes = sorted(data.draw(st.lists(st.integers(0, 900), min_size=n_hist, max_size=n_hist)))
    history = [event(i, m, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)), data.draw(amount))
               for i, m in enumerate(hist_minutes)]
    in_order = data.draw(st.booleans()) or data.draw(st.booleans())
    start = (hist_minutes[-1] if hist_minutes else 0) if in_order else 0
    minutes = data.draw(st.lists(st.integers(start, start + 900), min_size=n, max_size=n))
    if in_order:
        minutes.sort()
    batch = [event(1000 + k, m, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)), data.draw(amount))
             for k, m in enumerate(minutes)]
    if data.draw(st.integers(0, 4)) == 0 and history:  # an event sent again
        batch[data.draw(st.integers(0, n - 1))] = dict(history[-1])
    labelled = data.draw(st.lists(st.integers(0, max(n_hist - 1, 0)), max_size=n_hist)) if history else []
    labels = [(history[i]["id"], data.draw(st.sampled_from([0, 1])),
               history[i]["ts"] + timedelta(minutes=data.draw(st.integers(-60, 1200)))) for i in labelled]
    compare(tmp_path_factory.mktemp("batch"), defs, history, labels, batch, data.draw(st.booleans()))
