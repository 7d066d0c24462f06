"""Rows stored only as a columnar segment (no row in ``predictions``) read exactly as the same rows stored as rows:
``iter_predictions``/``read_predictions``, ``read_log`` (features, inputs, labels joined by event id), time
bounds. A log is written by today's writer, then some of its segments are turned segment-only (their rows and
label rows deleted, the segment marked), and every reader must give the same answers on both."""

from __future__ import annotations

import json
import sqlite3
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_predlog_columns import NAMES, _records, batches

from keel.logformat import read_feature_sets
from keel.monitor.drift import log_time_range
from keel.monitor.logread import BASE_COLUMNS, read_log, seq_bounds
from keel.monitor.skew import _logged_events, _sample_log
from keel.serve.predlog import (
    PredictionBatch,
    PredictionLog,
    iter_predictions,
    pack_segment,
    read_predictions,
)

T0 = datetime(2018, 4, 1)


def segment_only(src: Path, dst: Path, which: list[bool]) -> int:
    """A copy of the log where the segments flagged in ``which`` (in seq order, cycled) hold their rows alone.
    Returns how many rows moved."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as db:
        a.backup(db)
    a.close()
    moved = 0
    try:
        sets = read_feature_sets(db)
        segments = db.execute("select seq0, n, data from prediction_segments order by seq0").fetchall()
        for j, (seq0, n, data) in enumerate(segments):
            if which[j % len(which)]:
                assert pack_segment(db, seq0, n, data, sets) == "packed"  # (exactness: test_predlog_segment_rows)
                moved += n
        db.commit()
    finally:
        db.close()
    return moved


def _same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for c in got.columns:
        a, b = got[c].to_numpy(), want[c].to_numpy()
        if a.dtype != b.dtype:
            # read_log types a raw int input per frame (all ints: objects, with a missing one: float64) and reads a
            # bool input as a number (0.0/1.0: monitoring's _convert), where the rows' JSON parsed by
            # DataFrame.from_records gives bool when none is missing; and segment-only rows make other frames than
            # rows do: the same numbers either way.
            assert c.startswith("input.") and {a.dtype.kind, b.dtype.kind} <= {"O", "f", "b"}, c
            assert [None if v is None or v != v else float(v) for v in a] == [
                None if v is None or v != v else float(v) for v in b], c
        elif a.dtype.kind in "fM":
            assert np.array_equal(a, b, equal_nan=True), c
        else:
            assert [None if v is None or v != v else v for v in a] == [None if v is None or v != v else v for v in b], c


def _log_read(path: Path, names: tuple[str, ...], batch_rows: int, **kw: Any) -> pd.DataFrame:
    with warnings.catch_warnings():  # (pandas: a frame's all-NaN column in a concat; the same on both logs)
        warnings.simplefilter("ignore", FutureWarning)
        return _log_read_all(path, names, batch_rows, **kw)


def _log_read_all(path: Path, names: tuple[str, ...], batch_rows: int, **kw: Any) -> pd.DataFrame:
    frames = list(read_log(path, features=list(names), inputs=["amount", "note", "tx_id", "big"], labels=True,
                           labelled_inputs=["flag"], columns=list(BASE_COLUMNS), batch_rows=batch_rows, **kw))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _events_by_sql(path: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """What the skew check must read of a rows log: each row's parsed inputs with ``start <= event_time <= end``
    in seq order, and its joined label (None when none), straight from SQL."""
    lo, hi = (pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%f") for t in (start, end))
    with sqlite3.connect(path) as db:
        joined = db.execute("select p.inputs, l.label from predictions p left join labels l on l.event_id ="
                            " p.event_id where p.event_time >= ? and p.event_time <= ? order by p.seq",
                            (lo, hi)).fetchall()
    db.close()
    events = pd.DataFrame.from_records([json.loads(text) for text, _ in joined])
    events["__label"] = [np.nan if label is None else label for _, label in joined]
    return events


def _all_reads_agree(rows: Path, only: Path, names: tuple[str, ...], bounds: list[tuple[Any, Any]]) -> None:
    assert log_time_range(only) == log_time_range(rows)
    for start, end in bounds:
        for on in ("event_time", "time"):
            for expand in (True, False):
                a = list(iter_predictions(only, start, end, batch_rows=7, on=on, expand_features=expand))
                b = list(iter_predictions(rows, start, end, batch_rows=7, on=on, expand_features=expand))
                assert len(a) == len(b)
                for fa, fb in zip(a, b, strict=True):
                    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
            pd.testing.assert_frame_equal(read_predictions(only, start, end, on=on),
                                          read_predictions(rows, start, end, on=on), check_exact=True)
        if start is not None and end is not None:
            want = _events_by_sql(rows, start, end)
            fields = [c for c in want.columns if c != "__label"]
            for log in (rows, only):
                _same(_logged_events(log, start, end, fields).rename(columns=lambda c: f"input.{c}"),
                      want.rename(columns=lambda c: f"input.{c}"))
        for sample in (3, 1000):
            pd.testing.assert_frame_equal(_sample_log(only, sample, end), _sample_log(rows, sample, end))
        for batch_rows in (7, 1000):
            _same(_log_read(only, names, batch_rows, start=start, end=end),
                  _log_read(rows, names, batch_rows, start=start, end=end))
        want = seq_bounds(rows, *(None if t is None else pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%f")
                                  for t in (start, end)))
        got = seq_bounds(only, *(None if t is None else pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%S.%f")
                                 for t in (start, end)))
        if want is not None:  # (segment-only rows are bounded by their segment: the range may be wider, never less)
            assert got is not None and got[0] <= want[0] and got[1] >= want[1]


TIMES = st.one_of(st.none(), st.integers(-5 * 10**9, 5 * 10**9).map(lambda s: T0 + timedelta(seconds=s)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), names=NAMES, segment_rows_=st.sampled_from([5, 16, 4096]))
def test_segment_only_rows_read_as_rows(tmp_path_factory: Any, data: Any, names: tuple[str, ...],
                                        segment_rows_: int) -> None:
    requests = data.draw(st.lists(batches(names), min_size=1, max_size=4))
    columns = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    which = data.draw(st.lists(st.booleans(), min_size=1, max_size=4))
    folder = tmp_path_factory.mktemp("logs")
    ids = [str(e) for b in requests for e in (b.event_ids or []) if e is not None]
    labelled = data.draw(st.lists(st.sampled_from(ids), max_size=10)) if ids else []
    log = PredictionLog(folder / "rows.sqlite", segment_rows=segment_rows_)  # not started: writes at flush/close
    if labelled:
        log.add_labels([(labelled[0], 1.0, T0)])  # a label before its event
    for batch, as_columns in zip(requests, columns, strict=True):
        if as_columns:
            log.append_columns(batch)
        else:
            log.append_many(_records(batch))
        log.flush()
    log.add_labels([(e, float(i % 2), T0 + timedelta(hours=i)) for i, e in enumerate(labelled)])
    log.close()
    assert log.failures == 0
    rows, only = folder / "rows.sqlite", folder / "only.sqlite"
    segment_only(rows, only, which)
    bounds = [(None, None), *data.draw(st.lists(st.tuples(TIMES, TIMES), min_size=1, max_size=1))]
    _all_reads_agree(rows, only, names, bounds)


def test_a_log_of_segment_only_rows_reads_whole(tmp_path: Path) -> None:
    rows, only = tmp_path / "rows.sqlite", tmp_path / "only.sqlite"
    with PredictionLog(rows, segment_rows=8) as log:
        for i in range(5):
            log.append_many([{"request_id": f"r{i}.{j}", "item": j, "time": datetime(2026, 1, 1, tzinfo=UTC),
                              "event_time": T0 + timedelta(days=i, hours=j), "event_id": f"e{i}.{j}",
                              "inputs": {"a": float(j)}, "features": {"f": j / 3}, "score": 0.25,
                              "decision": "approve"} for j in range(8)])
            log.flush()
        log.add_labels([("e1.3", 1.0, T0), ("e4.7", 0.0, T0)])
    assert segment_only(rows, only, [True]) == 40
    with sqlite3.connect(only) as db:
        assert db.execute("select count(*) from predictions").fetchone() == (0,)
    db.close()
    frame = read_predictions(only)
    assert frame["request_id"].tolist() == [f"r{i}.{j}" for i in range(5) for j in range(8)]
    assert frame["seq"].tolist() == list(range(1, 41))
    labels = _log_read(only, ("f",), 1000)
    assert labels.loc[labels["label"].notna(), "seq"].tolist() == [12, 40]
    assert seq_bounds(only, "2018-04-02T00:00:00.000000", "2018-04-03T00:00:00.000000") == (9, 16)
    _all_reads_agree(rows, only, ("f",), [(None, None), (T0 + timedelta(days=1, hours=3), T0 + timedelta(days=3))])


@pytest.mark.parametrize("moved", [[False], [True, False]])
def test_logs_without_segment_only_rows_read_as_before(tmp_path: Path, moved: list[bool]) -> None:
    rows = tmp_path / "rows.sqlite"
    with PredictionLog(rows, segment_rows=4) as log:
        for lo, hi in ((0, 4), (4, 8), (8, 10)):  # segments of 4, 4 and 2 rows
            log.append_many([{"request_id": f"r{j}", "time": T0, "event_time": T0 + timedelta(hours=j),
                              "event_id": str(j), "inputs": {"a": j}, "features": {"f": 0.5}, "score": 0.5,
                              "decision": "x"} for j in range(lo, hi)])
            log.flush()
        log.add_labels([("1", 1.0, T0), ("5", 0.0, T0), ("9", 1.0, T0)])
    only = tmp_path / "only.sqlite"
    assert segment_only(rows, only, moved) == (0 if moved == [False] else 4 + 2)
    _all_reads_agree(rows, only, ("f",), [(None, None), (T0 + timedelta(hours=3), T0 + timedelta(hours=7))])



def test_a_bool_input_reads_back_as_a_number_equal_to_the_logged_one(tmp_path: Path) -> None:
    """The case hypothesis found: one event whose bool input is present (no None beside it). The rows' JSON parsed
    by DataFrame.from_records gives a bool column; monitoring's reader gives 0.0/1.0 (bools read as numbers), the
    same values."""
    batch = PredictionBatch(
        request_id="0", endpoint="batch", time=datetime(2026, 11, 30, tzinfo=UTC),
        inputs={"tx_id": [0], "tx_datetime": np.array([T0], dtype="datetime64[ns]"), "amount": np.array([0.0]),
                "flag": [False]},
        event_ids=None, timestamp="tx_datetime", scores=np.array([0.0]), decisions=["approve"], model_version=None,
        fallback_reasons=[None], stale=np.array([False]), latency_ms=0.0, features=np.array([[0.0]]),
        feature_names=("tx_amount",), failed=np.array([False]))
    for as_columns in (False, True):
        path = tmp_path / f"log{as_columns}.sqlite"
        with PredictionLog(path) as log:
            if as_columns:
                log.append_columns(batch)
            else:
                log.append_many(_records(batch))
        want = _events_by_sql(path, T0, T0)
        got = _logged_events(path, T0, T0, [c for c in want.columns if c != "__label"])
        assert want["flag"].dtype == bool and got["flag"].tolist() == [0.0]
        _same(got.rename(columns=lambda c: f"input.{c}"), want.rename(columns=lambda c: f"input.{c}"))
