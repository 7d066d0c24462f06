"""OnlineStore.features_columns: a column batch gives what features_many gives its row view, bit for bit (matrix,
stale and failed flags, errors, the rows the commit writes, a reload from disk), on the batch path and on the
event-by-event replay, and the offline table's numbers for an in-order stream."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_features_online import DEFS, LABEL_DELAY, NAMES, assert_frames_equal, random_events, store_at
from test_features_online_batch import (
    ARRAYS,
    BASE,
    ODD,
    RICH,
    assert_same_state_after,
    event,
    in_order_batch,
    open_store,
)

from keel.features import online_batch
from keel.features.offline import compute_features
from keel.features.online import stored_rows


def columns(batch: list[dict]) -> dict:
    """The column batch convention: timestamp as datetime64[ns], floats as float64, the rest as lists."""
    cols = {k: [e.get(k) for e in batch] for k in ("id", "ts", "card", "shop", "amount")}
    cols["ts"] = np.array([pd.Timestamp(t).to_datetime64() for t in cols["ts"]], dtype="datetime64[ns]")
    cols["amount"] = np.array(cols["amount"], dtype=np.float64)
    return cols


def row_view(cols: dict) -> list[dict]:
    """What the service's row view gives: datetimes (microseconds), Python floats, the lists' values."""
    out = {k: (v.astype("datetime64[us]").astype(datetime).tolist() if k == "ts" else
               v.tolist() if isinstance(v, np.ndarray) else list(v)) for k, v in cols.items()}
    return [dict(zip(out, row, strict=True)) for row in zip(*out.values(), strict=True)]


def on_disk(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return stored_rows(db)


def errors_of(batch) -> list[tuple]:
    return [(i, kind, type(exc).__name__, str(exc)) for i, kind, exc in batch.errors]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether the column path answered, per features_columns call that tries it."""
    calls: list[bool] = []
    real = online_batch.columns_batch

    def spy(store, n, cols):
        out = real(store, n, cols)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(online_batch, "columns_batch", spy)
    return calls


def compare(tmp: Path, defs, history: list[dict], labels: list[tuple], batch: list[dict], preload: bool,
            stage: bool = True) -> None:
    cols = columns(batch)
    rows_store, cols_store = open_store(tmp / "rows.sqlite", defs), open_store(tmp / "cols.sqlite", defs)
    for s in (rows_store, cols_store):
        s.update_many(history)
        for event_id, y, at in labels:
            s.add_label(event_id, y, at)
        if preload:
            s.preload()
    want = rows_store.features_many(row_view(cols), stage=stage)
    got = cols_store.features_columns(cols, stage=stage)
    assert np.array_equal(got.matrix, want.matrix, equal_nan=True)
    assert got.matrix.tobytes() == want.matrix.tobytes()  # the same bits, NaN payloads and -0.0 included
    assert got.stale.tolist() == want.stale.tolist() and got.failed.tolist() == want.failed.tolist()
    assert errors_of(got) == errors_of(want)
    assert cols_store.commit_staged() == rows_store.commit_staged()
    assert on_disk(tmp / "cols.sqlite") == on_disk(tmp / "rows.sqlite")
    assert_same_state_after(rows_store, cols_store, tmp / "cols.sqlite", defs, history + batch)


@pytest.mark.parametrize("defs", [ARRAYS, RICH], ids=["arrays", "rich"])
def test_an_in_order_column_batch_takes_the_column_path_and_equals_the_rows(tmp_path, taken, defs) -> None:
    rng = np.random.default_rng(5)
    history = in_order_batch(rng, 0, 0, 120, [10.0, 57.16, np.nan, 0.01])
    labels = [(e["id"], 1, e["ts"] + timedelta(hours=int(rng.integers(1, 5)))) for e in history[::4]]
    batch = in_order_batch(rng, 1000, 700, 200, ODD)
    batch[3]["id"] = None
    batch[10]["ts"] = batch[9]["ts"]
    batch[11] |= {"card": 42, "shop": "43"}  # never seen; a text key
    compare(tmp_path, defs, history, labels, batch, preload=True)
    assert taken == [True]


@pytest.mark.parametrize(
    "change", ["out_of_order", "duplicate_in_batch", "already_stored", "label_waiting", "infinity", "small",
               "not_staged"],
)
def test_column_batches_the_column_path_cannot_take_are_replayed_on_their_rows(tmp_path, taken, change) -> None:
    rng = np.random.default_rng(8)
    history = in_order_batch(rng, 0, 0, 80, [4.0, 6.5])
    batch = in_order_batch(rng, 1000, 650, 40, [1.0, 7.25])
    labels = [(history[5]["id"], 1, history[5]["ts"])]
    if change == "out_of_order":
        batch[21] = batch[21] | {"card": batch[20]["card"], "ts": batch[20]["ts"] - timedelta(minutes=1)}
    elif change == "duplicate_in_batch":
        batch[30] = dict(batch[2])
    elif change == "already_stored":
        batch[0] = history[-1]
    elif change == "label_waiting":
        labels.append((batch[7]["id"], 1, batch[0]["ts"]))
    elif change == "infinity":
        batch[9]["amount"] = -np.inf
    elif change == "small":
        batch = batch[:5]  # below the batch path's minimum: replayed
    compare(tmp_path, RICH, history, labels, batch, preload=True, stage=change != "not_staged")
    assert taken == ([] if change in ("small", "not_staged") else [False])


def test_a_column_batch_without_an_entity_column_fails_each_event_as_the_rows_do(tmp_path) -> None:
    batch = in_order_batch(np.random.default_rng(2), 0, 0, 40, [1.0])
    cols = columns(batch)
    del cols["shop"]
    a, b = open_store(tmp_path / "a.sqlite", RICH), open_store(tmp_path / "b.sqlite", RICH)
    got, want = a.features_columns(cols), b.features_many(row_view(cols), stage=True)
    assert got.failed.all() and errors_of(got) == errors_of(want) and len(got.errors) == 40
    assert np.array_equal(got.matrix, want.matrix, equal_nan=True)
    a.close()
    b.close()


def test_column_batches_of_an_in_order_stream_give_the_offline_table(tmp_path, taken) -> None:
    """Each label is recorded before the batch its arrival time falls in (it counts only for the events at or
    after that time): the offline table's numbers, on the column path and on the replay."""
    frame = random_events(4, n=1200)
    frame["id"] = frame["id"].astype(object)
    due = sorted(zip(frame["ts"] + LABEL_DELAY, frame["id"], frame["y"], strict=True))
    out, k = [], 0
    with store_at(tmp_path / "s.sqlite") as store:
        for start in range(0, len(frame), 40):
            part = frame.iloc[start:start + 40]
            while k < len(due) and due[k][0] <= part["ts"].iloc[-1]:
                store.add_label(due[k][1], due[k][2], due[k][0])
                k += 1
            cols = {"id": part["id"].tolist(), "ts": part["ts"].to_numpy(dtype="datetime64[ns]"),
                    "card": part["card"].tolist(), "shop": part["shop"].tolist(),
                    "amount": part["amount"].to_numpy(dtype=np.float64)}
            out.append(store.features_columns(cols).matrix)
            store.commit_staged()
    online = pd.DataFrame(np.vstack(out), columns=NAMES)
    assert_frames_equal(online, compute_features(frame, DEFS, timestamp="ts", label="y"))
    assert any(taken) and not all(taken)  # both paths answered some batches


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_columns_equal_rows(tmp_path_factory, data) -> None:
    """Random histories, labels (before and after the batch's events) and batches: in order or not, NaN and
    infinities, events sent again, ids missing, text and int keys; columns give the rows' bits, disk and reload."""
    defs = data.draw(st.sampled_from([ARRAYS, RICH]))
    n_hist = data.draw(st.integers(0, 25))
    n = data.draw(st.sampled_from([3, 32, 40, 48]))
    amount = (st.sampled_from([*ODD, np.inf, -np.inf]) if data.draw(st.integers(0, 5)) == 0
              else st.sampled_from(ODD) | st.integers(0, 100_000).map(lambda c: c / 100))
    key = st.integers(0, 2) | st.sampled_from(["0", "a"]) if data.draw(st.booleans()) else st.integers(0, 2)
    hist_minutes = sorted(data.draw(st.lists(st.integers(0, 900), min_size=n_hist, max_size=n_hist)))
    history = [event(i, m, data.draw(key), data.draw(key), data.draw(amount)) for i, m in enumerate(hist_minutes)]
    history = [e for e in history if np.isfinite(e["amount"]) or np.isnan(e["amount"])]
    ordered = data.draw(st.booleans()) or data.draw(st.booleans())
    start = (hist_minutes[-1] if hist_minutes else 0) if ordered else 0
    minutes = data.draw(st.lists(st.integers(start, start + 900), min_size=n, max_size=n))
    if ordered:
        minutes.sort()
    batch = [event(1000 + k, m, data.draw(key), data.draw(key), data.draw(amount)) for k, m in enumerate(minutes)]
    if data.draw(st.integers(0, 4)) == 0 and history:
        batch[data.draw(st.integers(0, n - 1))] = dict(history[-1])
    if data.draw(st.integers(0, 4)) == 0:
        batch[data.draw(st.integers(0, n - 1))]["id"] = None
    labelled = data.draw(st.lists(st.integers(0, len(history) - 1), max_size=len(history))) if history else []
    labels = [(history[i]["id"], data.draw(st.sampled_from([0, 1])),
               history[i]["ts"] + timedelta(minutes=data.draw(st.integers(-60, 1200)))) for i in labelled]
    if data.draw(st.integers(0, 5)) == 0:  # a label waiting for a batch event
        labels.append((batch[0]["id"] or 1000, 1, BASE))
    compare(tmp_path_factory.mktemp("cols"), defs, history, labels, batch, data.draw(st.booleans()),
            stage=data.draw(st.integers(0, 5)) > 0)
