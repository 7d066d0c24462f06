"""Online store: replay parity with the offline table, label timing, freshness, persistence, idempotence."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.errors import FeatureError
from keel.features import online_pool
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.offline import compute_features
from keel.features.online import OnlineStore
from keel.spec import Data, Features

BASE = pd.Timestamp("2024-03-01 00:00:00")
LABEL_DELAY = timedelta(hours=2)
FEATURES = Features.model_validate(
    {
        "raw": ["amount"],
        "row": [
            {"name": "weekend", "kind": "is_weekend", "column": "ts"},
            {"name": "night", "kind": "is_night", "column": "ts"},
            {"name": "log_amount", "kind": "log1p", "column": "amount"},
        ],
        "windows": [
            {
                "entity": "card",
                "aggregates": ["count", "sum", "mean", "min", "max", "std"],
                "column": "amount",
                "windows": ["1h", "1d"],
            },
            {
                "entity": "card",
                "aggregates": ["count", "mean"],
                "column": "amount",
                "windows": ["1h"],
                "include_current": False,
                "name": "card_prev_{aggregate}_{window}",
            },
            {
                "entity": "shop",
                "aggregates": ["count", "label_count", "label_rate"],
                "windows": ["1h", "6h"],
                "delay": "2h",
            },
        ],
        "ratios": [{"name": "amount_vs_mean", "numerator": "amount", "denominator": "card_mean_1d"}],
        "freshness": "12h",
    }
)
DATA = Data.model_validate(
    {"source": "x", "timestamp": "ts", "label": "y", "label_delay": "2h", "id_column": "id"}
)
DEFS = resolve_definitions(FEATURES, DATA)
NAMES = feature_names(DEFS)


def events(minutes, cards, shops, amounts, labels) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "id": np.arange(len(minutes)),
            "ts": BASE + pd.to_timedelta(np.asarray(minutes, dtype=np.int64), unit="m"),
            "card": np.asarray(cards, dtype=np.int64),
            "shop": np.asarray(shops, dtype=np.int64),
            "amount": np.asarray(amounts, dtype=np.float64),
            "y": np.asarray(labels, dtype=np.int64),
        }
    )
    # Replay order = event order: by time, ties in input order.
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


def random_events(seed: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    minutes = rng.integers(0, 3 * 1440, n)
    minutes[rng.random(n) < 0.1] = minutes[0]
    amounts = np.round(rng.gamma(2.0, 30.0, n), 2)
    amounts[rng.random(n) < 0.05] = np.nan
    return events(minutes, rng.integers(0, 8, n), rng.integers(0, 4, n), amounts, rng.random(n) < 0.3)


def store_at(path: Path, **kw) -> OnlineStore:
    return OnlineStore(
        path, DEFS, timestamp="ts", label="y", id_column="id", freshness=FEATURES.freshness, **kw
    )


def replay(store: OnlineStore, frame: pd.DataFrame, label_lag: timedelta = LABEL_DELAY) -> pd.DataFrame:
    """Feed events in order; each label arrives `label_lag` after its event, before any later event is scored."""
    due = sorted(zip(frame["ts"] + label_lag, frame["id"], frame["y"], strict=True))
    rows, k = [], 0
    for event in frame.to_dict("records"):
        while k < len(due) and due[k][0] <= event["ts"]:
            store.add_label(due[k][1], due[k][2], due[k][0])
            k += 1
        rows.append(store.features(event))
        store.update(event)
    return pd.DataFrame(rows, columns=NAMES)


def assert_frames_equal(online: pd.DataFrame, offline: pd.DataFrame) -> None:
    for name in NAMES:
        a, b = online[name].to_numpy(dtype=float), offline[name].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-9, err_msg=name)


def test_replay_matches_the_offline_table_for_every_feature_and_row(tmp_path: Path) -> None:
    frame = random_events(3)
    with store_at(tmp_path / "online.sqlite") as store:
        online = replay(store, frame)
    offline = compute_features(frame, DEFS, timestamp="ts", label="y")
    assert_frames_equal(online, offline)
    assert offline["shop_label_count_6h"].sum() > 0  # labels did reach the features


def test_labels_count_only_once_they_have_arrived(tmp_path: Path) -> None:
    frame = random_events(3)
    offline = compute_features(frame, DEFS, timestamp="ts", label="y")
    with store_at(tmp_path / "late.sqlite") as store:
        late = replay(store, frame, label_lag=timedelta(hours=5))  # labels 3h later than the spec promises
    assert (late["shop_label_count_6h"] <= offline["shop_label_count_6h"]).all()
    assert (late["shop_label_count_6h"] < offline["shop_label_count_6h"]).any()
    for name in [n for n in NAMES if "label" not in n]:  # only label aggregates may differ
        np.testing.assert_allclose(late[name], offline[name], rtol=0, atol=1e-9, equal_nan=True, err_msg=name)


def test_a_label_changes_features_only_after_its_arrival_time(tmp_path: Path) -> None:
    frame = events([0, 150, 300], [1, 2, 3], [9, 9, 9], [1.0, 1.0, 1.0], [1, 0, 0])
    rows = frame.to_dict("records")
    with store_at(tmp_path / "s.sqlite") as store:
        store.update(rows[0])
        assert store.add_label(0, 1, BASE + timedelta(minutes=250)) is True
        before = store.features(rows[1])  # at 150: event 0 is in (t-3h, t-2h] but its label arrives at 250
        after = store.features(rows[2])  # at 300: the 6h window (-3h, 3h] holds event 0, now labelled
    assert before["shop_count_1h"] == 1.0 and before["shop_label_count_1h"] == 0.0
    assert after["shop_label_count_6h"] == 1.0 and after["shop_label_rate_6h"] == 1.0
    assert store_at(tmp_path / "other.sqlite").add_label(12345, 1, BASE) is False


def test_scoring_a_stored_event_does_not_count_it_twice(tmp_path: Path) -> None:
    frame = random_events(5, n=60)
    rows = frame.to_dict("records")
    with store_at(tmp_path / "s.sqlite") as store:
        store.update_many(rows[:-1])
        first = store.features(rows[-1])
        store.update(rows[-1])
        store.update(rows[-1])  # a retry: still one event
        again = store.features(rows[-1])
    assert dict(first) == pytest.approx(dict(again), nan_ok=True)


def test_state_survives_a_restart_and_is_pruned_past_the_horizon(tmp_path: Path) -> None:
    frame = random_events(8, n=200)
    rows = frame.to_dict("records")
    probe = {**rows[-1], "id": 10**6, "ts": rows[-1]["ts"] + timedelta(minutes=1)}
    with store_at(tmp_path / "s.sqlite") as store:
        store.update_many(rows)
        warm = store.features(probe)
    with store_at(tmp_path / "s.sqlite") as reopened:
        cold = reopened.features(probe)
        spans = reopened._db.execute(
            "select min(t), max(t) from events where entity = 'card' group by key"
        ).fetchall()
    assert dict(cold) == pytest.approx(dict(warm), nan_ok=True)
    stored = len(spans)
    assert stored == frame["card"].nunique()
    # Each card keeps only what its longest window (1 day) can still reach from its newest event.
    assert all(newest - oldest < 86_400 * 10**9 for oldest, newest in spans)


def test_freshness_flags_entities_whose_state_is_too_old(tmp_path: Path) -> None:
    frame = events([0, 10, 13 * 60], [1, 1, 1], [2, 2, 3], [5.0, 6.0, 7.0], [0, 0, 0])
    rows = frame.to_dict("records")
    with store_at(tmp_path / "s.sqlite") as store:
        store.update(rows[0])
        fresh = store.features(rows[1])
        store.update(rows[1])
        stale = store.features(rows[2])  # 13h after the card's last event; freshness is 12h
    assert not fresh.stale and fresh.unknown_entities == ()
    assert stale.stale and stale.stale_entities == ("card",)
    assert stale.unknown_entities == ("shop",)  # shop 3 was never seen: new, not stale
    assert stale["card_count_1d"] == 3.0  # still computed; the caller decides (flag or fallback)


def test_store_refuses_other_definitions_and_events_without_entities(tmp_path: Path) -> None:
    with store_at(tmp_path / "s.sqlite"):
        pass
    other = resolve_definitions(
        Features.model_validate({"windows": [{"entity": "card", "aggregates": ["count"], "windows": ["2h"]}]})
    )
    with pytest.raises(FeatureError, match=r"was built for other feature definitions"):
        OnlineStore(tmp_path / "s.sqlite", other, timestamp="ts")
    with (
        store_at(tmp_path / "t.sqlite") as store,
        pytest.raises(FeatureError, match=r"The event has no 'shop', the entity of feature 'shop_count_1h'"),
    ):
        store.features({"id": 1, "ts": BASE, "card": 1, "amount": 2.0})


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data(), minutes=st.lists(st.integers(0, 900), min_size=1, max_size=40))
def test_property_online_equals_offline(tmp_path_factory, data, minutes) -> None:
    n = len(minutes)
    cards = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    shops = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    cents = data.draw(st.lists(st.integers(0, 100_000), min_size=n, max_size=n))
    labels = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    frame = events(minutes, cards, shops, np.asarray(cents) / 100, labels)
    with store_at(tmp_path_factory.mktemp("prop") / "s.sqlite") as store:
        online = replay(store, frame)
    assert_frames_equal(online, compute_features(frame, DEFS, timestamp="ts", label="y"))


def test_preload_gives_the_same_features_as_loading_each_entity_on_demand(tmp_path) -> None:
    """A fresh store that preloads everything answers exactly like one that loads entities as they come."""
    from keel.data.simulate import simulate
    from keel.features.definitions import resolve_definitions
    from keel.features.online import OnlineStore
    from keel.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")
    tx = simulate(n_customers=80, n_terminals=160, n_days=40, seed=4).transactions
    defs = resolve_definitions(spec.features, spec.data)
    kwargs = {"timestamp": "tx_datetime", "label": "tx_fraud", "id_column": "transaction_id"}
    history, live = tx.iloc[:-200], tx.iloc[-200:]
    with OnlineStore(tmp_path / "s.sqlite", defs, **kwargs) as store:
        store.update_many(history.to_dict("records"))
        for rec in history.iloc[:300].to_dict("records"):
            store.add_label(rec["transaction_id"], rec["tx_fraud"], at=rec["tx_datetime"] + pd.Timedelta(days=7))
    lazy = OnlineStore(tmp_path / "s.sqlite", defs, **kwargs)
    eager = OnlineStore(tmp_path / "s.sqlite", defs, **kwargs)
    loaded = eager.preload()
    assert 0 < loaded <= history["customer_id"].nunique() + history["terminal_id"].nunique()
    assert eager.preload() == 0  # everything is already in memory
    for rec in live.to_dict("records"):
        assert dict(eager.features(rec)) == dict(lazy.features(rec))
    lazy.close()
    eager.close()



def _stored_ids(path: Path) -> set[str]:
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in con.execute("select distinct event_id from events")}
    finally:
        con.close()


def test_staged_events_count_at_once_and_reach_disk_only_with_the_group_commit(tmp_path: Path) -> None:
    frame = random_events(5, n=200)
    rows = frame.to_dict("records")
    path = tmp_path / "staged.sqlite"
    with store_at(path) as staged, store_at(tmp_path / "direct.sqlite") as direct:
        for i, event in enumerate(rows):
            # Exactly the numbers of the write-through path (itself proven equal to the offline table above).
            assert staged.features(event) == pytest.approx(direct.features(event), nan_ok=True, rel=0, abs=0)
            staged.stage(event)  # counts for the next event at once; written by the next commit
            direct.update(event)
            if i % 7 == 6:  # commits in groups, as the service's group commit does under load
                assert staged.commit_staged() > 0
        tail = {str(e["id"]) for e in rows[-(len(rows) % 7):]}
        assert not tail & _stored_ids(path)  # staged, not yet committed: not on disk
        assert staged.commit_staged() > 0
        assert staged.commit_staged() == 0
        assert tail <= _stored_ids(path)
    last = rows[-1]
    probe = {**last, "id": 10**6, "ts": last["ts"] + timedelta(minutes=1)}
    with store_at(path) as again, store_at(tmp_path / "direct.sqlite") as direct:  # state reloaded from disk
        assert again.features(probe) == pytest.approx(direct.features(probe), nan_ok=True, rel=0, abs=0)


def _scan_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force every window onto the scanning path (``math.fsum`` over the window's values)."""
    from keel.features import online_pool

    monkeypatch.setattr(online_pool, "EXACT", False)


def test_prefix_sums_give_the_bits_of_summing_each_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums, means and label sums read from exact prefix sums equal ``fsum`` over the window bit for bit, with
    events out of time order, values on no decimal grid (tiny, huge, many digits), NaN, labels changed while
    their events are in the window and labels arriving after later events were scored."""
    rng = np.random.default_rng(11)
    n = 500
    frame = random_events(7, n=n)
    amounts = frame["amount"].to_numpy().copy()
    odd = rng.random(n)
    amounts[odd < 0.2] = rng.random(int((odd < 0.2).sum())) / 3.0  # full 53-bit mantissas
    amounts[(odd >= 0.2) & (odd < 0.25)] = 1e-300 * rng.random(int(((odd >= 0.2) & (odd < 0.25)).sum()))
    amounts[(odd >= 0.25) & (odd < 0.3)] = 1e12 + rng.random(int(((odd >= 0.25) & (odd < 0.3)).sum()))
    frame["amount"] = amounts
    rows = frame.sample(frac=1.0, random_state=3).to_dict("records")  # arrival order is not time order

    def run(path: Path) -> list[dict[str, float]]:
        out = []
        with store_at(path) as store:
            for i, event in enumerate(rows):
                out.append(dict(store.features(event)))
                store.stage(event) if i % 2 else store.update(event)
                if i % 5 == 0:  # a label for an earlier event: known now, or (sometimes) only later
                    j = int(rng.integers(0, i + 1))
                    at = rows[j]["ts"] + timedelta(hours=int(rng.integers(-3, 4)))
                    store.add_label(rows[j]["id"], float(rng.integers(0, 2)), at)
            store.commit_staged()
        return out

    rng = np.random.default_rng(11)
    fast = run(tmp_path / "fast.sqlite")
    _scan_only(monkeypatch)
    rng = np.random.default_rng(11)
    slow = run(tmp_path / "slow.sqlite")
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] == b[name]) or (a[name] != a[name] and b[name] != b[name]), name
    assert any(r["shop_label_count_6h"] > 0 for r in fast)


def _sql_labels(store: OnlineStore) -> OnlineStore:
    """A store that looks every new event's label up in SQLite (the reference for the in-memory map)."""

    def query(event_id: str) -> tuple[float, int] | None:
        row = store._db.execute("select label, at from labels where event_id = ?", (event_id,)).fetchone()
        return None if row is None else (float(row[0]), int(row[1]))

    store._known_label = query  # type: ignore[method-assign]
    return store


def _assert_rows_equal(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.array_equal(a, b, equal_nan=True), (a, b)


def test_features_many_equals_features_then_stage_one_by_one(tmp_path: Path) -> None:
    """A batch sees its own earlier events: repeated entities, ties, events out of time order, an event sent
    twice, entities never seen, and an event without an entity (NaN row, not staged, the others go on)."""
    frame = random_events(11, n=300)
    history = frame.iloc[:150].to_dict("records")
    batch = frame.iloc[150:].sample(frac=1.0, random_state=2).to_dict("records")  # out of time order
    batch[5]["ts"] = batch[4]["ts"]  # a tie
    batch[9] = dict(batch[3])  # the same event again: counts once
    batch[12] = {**batch[12], "card": 999, "shop": 998}  # unknown entities
    broken = {k: v for k, v in batch[20].items() if k != "shop"}
    batch[20] = broken
    with store_at(tmp_path / "one.sqlite") as one, store_at(tmp_path / "many.sqlite") as many:
        for s in (one, many):
            s.update_many(history)
            s.add_label(history[-1]["id"], 1, history[-1]["ts"])
        expected, expected_stale = [], []
        for event in batch:
            try:
                row = one.features(event)
            except FeatureError:
                expected.append([np.nan] * len(NAMES))
                expected_stale.append(False)
                continue
            expected.append([row[n] for n in NAMES])
            expected_stale.append(row.stale)
            one.stage(event)
        out = many.features_many(batch, stage=True)
        assert many.feature_names == NAMES
        assert out.matrix.shape == (len(batch), len(NAMES))
        _assert_rows_equal(out.matrix, expected)
        assert out.stale.tolist() == expected_stale and any(expected_stale)
        assert out.failed.tolist() == [i == 20 for i in range(len(batch))]
        assert [(i, op) for i, op, _ in out.errors] == [(20, "features")]
        assert "'shop'" in str(out.errors[0][2])
        assert one.commit_staged() == many.commit_staged() > 0
        probe = {**batch[0], "id": 10**6, "ts": frame["ts"].max() + timedelta(minutes=1)}
        _assert_rows_equal([one.features(probe)[n] for n in NAMES], [many.features(probe)[n] for n in NAMES])


def test_labels_kept_in_memory_equal_the_labels_table(tmp_path: Path) -> None:
    """A new event finds its label without a query: a label that came before its event, and an event sent again
    after it left one entity's window (shop: 8 h) or every window (card: 1 d)."""
    frame = random_events(12, n=300)
    rows = frame.to_dict("records")
    early = {**rows[-1], "id": 5000, "ts": rows[-1]["ts"] + timedelta(minutes=5)}
    with store_at(tmp_path / "mem.sqlite") as mem, _sql_labels(store_at(tmp_path / "sql.sqlite")) as sql:
        for s in (mem, sql):
            s.preload()
            s.update_many(rows[:100])
            for r in rows[:100:3]:
                s.add_label(r["id"], 1, r["ts"] + timedelta(minutes=30))
            s.add_label(5000, 1, rows[50]["ts"])  # before its event
        assert mem._pending_complete and "5000" in mem._pending
        for event in [*rows[100:], rows[0], rows[1], rows[-20], early]:  # rows[0]/[1]: pruned, sent again
            probe = {**event, "ts": event["ts"] + timedelta(minutes=1), "id": -1}
            _assert_rows_equal([mem.features(event)[n] for n in NAMES], [sql.features(event)[n] for n in NAMES])
            mem.update(event)
            sql.update(event)
            _assert_rows_equal([mem.features(probe)[n] for n in NAMES], [sql.features(probe)[n] for n in NAMES])
        assert "5000" not in mem._pending
        later = {**early, "id": -2, "ts": early["ts"] + timedelta(hours=2, minutes=30)}  # early in its 1 h window
        assert mem.features(later)["shop_label_count_1h"] == sql.features(later)["shop_label_count_1h"] >= 1


def _holders(store: OnlineStore) -> dict[str, list[tuple[str, str]]]:
    """Event id -> the (entity, key) of each state holding it (slot numbers differ between stores)."""
    out = {}
    for event_id, codes in store._owners.items():
        states = []
        for code in codes:
            pool, slot = store._owned(code)
            states.append((store._entities[code % len(store._entities)], pool.keys[slot]))
        out[event_id] = sorted(states)
    return out


def test_single_event_prunes_keep_the_owner_map_and_forget_labels_of_events_gone_from_every_state(
        tmp_path: Path) -> None:
    """Events replayed one at a time push the oldest out of their states a row or two at a time (the single-event
    path of pruning). The map of event -> states holding it is what a store rebuilt from the file has, and a label
    whose event left every state is forgotten, in memory and in the file (the event can never count again): the
    labels kept are those of events still held, however long the store runs."""
    frame = random_events(14, n=600)
    path = tmp_path / "s.sqlite"
    with store_at(path) as store:
        replay(store, frame)
        pruned = {str(i) for i in frame["id"]} - set(store._owners)
        assert len(pruned) > 100  # (3 days of events; the longest horizon is 1 day)
        held_by_one = [i for i, codes in store._owners.items() if len(codes) == 1]
        assert held_by_one  # pruned from the shop's 8 h state, still in the card's day
        labelled = {str(i) for i in frame.loc[frame["ts"] + LABEL_DELAY <= frame["ts"].max(), "id"]}
        assert labelled & pruned  # (labels arrive 2 h after their event: while every state still holds it)
        with store_at(path) as again:
            again.preload()
            assert _holders(store) == _holders(again)
            assert store._pending == again._pending == {}
        with sqlite3.connect(path) as db:
            assert {row[0] for row in db.execute("select event_id from labels")} == labelled - pruned


def test_compaction_passes_through_every_call_change_no_feature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction passes forced through every call, a few rows per step (states move under events, labels and
    prunes, on the single-event and the batch path): the features are bit for bit those of a store that never
    compacts, and equal the offline table."""
    frame = random_events(11, 500)
    monkeypatch.setattr(online_pool, "_PASS_MIN", 10**9)  # never
    with store_at(tmp_path / "plain.sqlite") as plain:
        want = replay(plain, frame).to_numpy()
    with store_at(tmp_path / "plain_many.sqlite") as plain:
        records = frame.to_dict("records")
        want_many = [plain.features_many(records[i:i + 40], stage=True).matrix for i in range(0, len(records), 40)]
    monkeypatch.setattr(online_pool, "_PASS_MIN", 0)
    monkeypatch.setattr(online_pool, "_PASS_WASTE", -1.0)  # a pass whenever none runs
    monkeypatch.setattr(online_pool, "_CALL_ROWS", 2)  # a step of a few rows every other call
    monkeypatch.setattr(online_pool, "_STEP_ROWS", 3)
    with store_at(tmp_path / "moved.sqlite") as store:
        got = replay(store, frame)
        assert min(p.passes for p in store._pools.values()) > 20
    assert np.array_equal(got.to_numpy(), want, equal_nan=True)
    assert_frames_equal(got, compute_features(frame, DEFS, timestamp="ts", label="y"))
    with store_at(tmp_path / "moved_many.sqlite") as store:
        got_many = [store.features_many(records[i:i + 40], stage=True).matrix for i in range(0, len(records), 40)]
        assert min(p.passes for p in store._pools.values()) > 2
    for a, b in zip(got_many, want_many, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
