"""The log's columnar segments: what the service writes per batch reads exactly as its rows do."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import MonitorError
from keel.logformat import Segment, encode_segment, has_segments
from keel.monitor.logread import read_log
from keel.serve.predlog import PREDICTION_COLUMNS, PredictionLog, _prediction_row, connect, read_predictions

FEATURES = ["amount", "night", "nb_tx"]
INPUTS = ["customer_id", "tx_amount", "who"]
T0 = datetime(2018, 9, 1)


def _records(n: int = 120, *, odd: bool = True, first: int = 0) -> list[dict]:
    rng = np.random.default_rng(first)
    out = []
    for i in range(first, first + n):
        feats: dict | None = {"amount": float(rng.gamma(2, 30)), "night": float(i % 2), "nb_tx": float(i % 7)}
        if odd and i == 5:
            feats = None
        elif odd and i == 17:
            feats = {"nb_tx": 3.0, "amount": 1.5, "night": 0.0}
        elif odd and i == 18:
            feats = {"amount": 2.5, "night": None, "nb_tx": 1.0, "new": 4.0}
        out.append({
            "request_id": f"r{i}", "time": T0 + timedelta(hours=i, seconds=1), "event_time": T0 + timedelta(hours=i),
            "event_id": str(i), "decision": ("review", 'say "no"', "it's, NULL")[i % 3],
            "inputs": {"customer_id": i % 4, "tx_amount": round(float(rng.gamma(2, 30)), 2),
                       "who": "a:b,c" if i % 11 == 0 else "x", **({"extra": True} if i % 13 == 0 else {})},
            "features": feats, "score": None if odd and i == 9 else float(rng.random()),
            "fallback": i == 5, "fallback_reason": {5: "model_error", 7: "NULL", 8: ""}.get(i),
            "stale": i % 10 == 3, "latency_ms": float(rng.gamma(2, 2)), "model_version": "v1" if i < 60 else "v2",
        })
    return out


def _labels(events: range) -> list[tuple]:
    return [(str(i), float(i % 5 == 0), T0 + timedelta(hours=i, days=2)) for i in events if i % 2 == 0]


COLUMNS = ("seq", "event_time", "time", "score", "decision", "fallback", "fallback_reason", "stale", "latency_ms",
           "event_id", "model_version", "request_id")


def _read(path: Path, batch_rows: int, **kw: object) -> pd.DataFrame:
    frames = list(read_log(path, features=FEATURES, inputs=INPUTS, labels=True, batch_rows=batch_rows,
                           columns=COLUMNS, **kw))  # type: ignore[arg-type]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _rows_only(path: Path) -> Path:
    """A copy of the log without segments: the reader takes every row from the rows (the previous format)."""
    copy = path.with_name("rows-" + path.name)
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
        for ddl in ("drop table prediction_segments", "drop table label_rows", "drop index labels_by_at"):
            dst.execute(ddl)
    src.close()
    dst.close()
    return copy


def _same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    for c in got.columns:
        a, b = got[c].to_numpy(), want[c].to_numpy()
        assert a.dtype == b.dtype, c
        if a.dtype.kind in "fM":
            assert np.array_equal(a, b, equal_nan=True), c
        else:
            assert [None if v is None or v != v else v for v in a] == [None if v is None or v != v else v for v in b], c


def _junk_rows(path: Path) -> None:
    """Wipe what the rows say, so a reader that still gets the values right can only have read the segments."""
    with sqlite3.connect(path) as db:
        db.execute("""update predictions set features = '{"junk":1}', features_f64 = null, inputs = '{}',"""
                   " score = 0, decision = 'junk', latency_ms = 0")
    db.close()


@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_segments_read_exactly_what_the_rows_say(tmp_path: Path, batch_rows: int) -> None:
    path = tmp_path / "p.sqlite"
    records = _records()
    with PredictionLog(path, flush_rows=32, segment_rows=50) as log:
        log.add_labels(_labels(range(0, 4)))  # labels before their events
        for i in range(0, 120, 40):
            log.append_many(records[i:i + 40])
            log.flush()
        log.add_labels(_labels(range(4, 120)))
    with sqlite3.connect(path) as db:
        assert has_segments(db)
        segs = db.execute("select seq0, n from prediction_segments order by seq0").fetchall()
    db.close()
    # Write batches are gathered into segments of at least 50 rows; the rest is written at close.
    assert segs == [(1, 80), (81, 40)]
    want = _read(_rows_only(path), batch_rows)
    got = _read(path, batch_rows)
    _same(got, want)
    slow = read_predictions(path)  # per-row JSON decoding
    assert np.array_equal(got["amount"].to_numpy(), slow["amount"].to_numpy(), equal_nan=True)
    assert got["label"].notna().sum() == 60 and got.loc[0, "label"] == 1.0
    assert (got.loc[got["label"].notna(), "at"] == got.loc[got["label"].notna(), "event_time"] + timedelta(days=2)).all()
    assert got["input.customer_id"].tolist() == [i % 4 for i in range(120)]
    # The values come from the segments: the rows' text can be wiped.
    _junk_rows(path)
    _same(_read(path, batch_rows), want)


def test_time_range_and_labelled_inputs_from_segments(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    with PredictionLog(path, flush_rows=16, segment_rows=40) as log:
        log.append_many(_records(odd=False))
        log.add_labels(_labels(range(120)))
    start, end = T0 + timedelta(hours=10), T0 + timedelta(hours=40)
    kw = {"start": start, "end": end, "labelled_inputs": ["who"]}
    got = _read(path, 9, **kw)
    _same(got, _read(_rows_only(path), 9, **kw))
    assert len(got) == 30 and got["event_time"].min() == start and got["event_time"].max() == end - timedelta(hours=1)
    labelled = got["label"].notna().to_numpy()
    assert labelled.tolist() == [i % 2 == 0 for i in range(10, 40)]
    assert list(read_log(path, start=T0 + timedelta(days=30))) == []


def test_a_log_migrated_mid_way_and_a_batch_without_segment(tmp_path: Path) -> None:
    """Rows written before the upgrade (no segment) and a batch whose segment failed are read from their rows."""
    path = tmp_path / "p.sqlite"
    records = _records()
    with PredictionLog(path) as log:
        log.append_many(records[:30])
    with sqlite3.connect(path) as db:
        for ddl in ("drop table prediction_segments", "drop table label_rows", "drop index labels_by_at"):
            db.execute(ddl)
    db.close()
    with PredictionLog(path, segment_rows=20) as log:  # the upgraded service migrates the log, writes segments
        log.append_many(records[30:70])
        log.flush()
        log._segments._write = lambda *a: None  # type: ignore[method-assign]  # an encoding that fails
        log.append_many(records[70:90])
        log.flush()
        del log._segments._write
        log.append_many(records[90:110])
        log.flush()
    with sqlite3.connect(path) as db:
        covered = db.execute("select seq0, n from prediction_segments order by seq0").fetchall()
    db.close()
    assert covered == [(31, 40), (91, 20)]
    with PredictionLog(path, segment_rows=1000) as log:  # a crash: the pending rows' segment is never written
        log.append_many(records[110:])
        log.add_labels(_labels(range(120)))
        log.flush()
        log._segments.stage_flush = lambda db: None  # type: ignore[method-assign]
    for batch_rows in (6, 25, 1000):
        _same(_read(path, batch_rows), _read(_rows_only(path), batch_rows))


def test_segment_encoding_round_trips_odd_values() -> None:
    records = [{"request_id": "a", "event_time": T0, "decision": "x", "score": float("nan"), "features": {"a": 1.0},
                "inputs": {"big": 2**70, "flag": True, "t": T0, "f": 1.5, "n": None, "mix": 1}},
               {"request_id": "b", "event_time": None, "decision": "y", "score": 0.5, "features": None,
                "inputs": {"big": 1, "flag": False, "t": T0, "f": 2, "n": None, "mix": "s"}}]
    rows = [_prediction_row(r) for r in records]
    seg = Segment(encode_segment(rows, PREDICTION_COLUMNS, [r["inputs"] for r in records], [3, None],
                                 [np.array([1.0]).tobytes(), None]))
    assert seg.n == 2
    assert np.isnan(seg.column("score")).tolist() == [True, False]
    assert seg.column("event_time")[1] == np.iinfo(np.int64).min
    assert seg.column("features.set").tolist() == [3, -1]
    assert seg.column("input.big") == [2**70, 1]
    assert seg.column("input.flag") == [True, False]
    assert seg.column("input.t") == ["2018-09-01T00:00:00.000000"] * 2
    f = seg.column("input.f")  # an int among floats: kept as JSON, as the rows' text tells 2 from 2.0
    assert f == [1.5, 2] and type(f[1]) is int
    assert seg.column("input.mix") == [1, "s"]
    codes, values = seg.column("decision")
    assert [values[c] for c in codes] == ["x", "y"]
    with pytest.raises(MonitorError, match="format mark"):
        Segment(b"nope" + bytes(8))


def test_connect_migrates_a_previous_log_with_its_labels(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    with PredictionLog(path) as log:
        log.append_many(_records(20, odd=False))
        log.add_labels(_labels(range(20)))
    with sqlite3.connect(path) as db:
        for ddl in ("drop table prediction_segments", "drop table label_rows", "drop index labels_by_at"):
            db.execute(ddl)
    db.close()
    connect(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("select count(*) from label_rows").fetchone()[0] == 10
    db.close()
    _same(_read(path, 7), _read(_rows_only(path), 7))


def test_non_finite_feature_values_read_as_missing_as_in_the_json_text(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    records = _records(30, odd=False)
    records[3]["features"] = {"amount": float("inf"), "night": float("nan"), "nb_tx": -0.0}
    with PredictionLog(path) as log:
        log.append_many(records)
    got = _read(path, 1000)
    want = _read(_rows_only(path), 1000)
    _same(got, want)
    assert np.isnan(got.loc[3, "amount"]) and np.isnan(got.loc[3, "night"]) and got.loc[3, "nb_tx"] == 0.0
    _junk_rows(path)
    _same(_read(path, 1000), want)


@pytest.mark.parametrize("mixed", [False, True])
def test_non_finite_input_values_read_as_missing_as_in_the_json_text(tmp_path: Path, mixed: bool) -> None:
    path = tmp_path / "p.sqlite"
    records = _records(30, odd=False)
    records[3]["inputs"]["tx_amount"] = float("inf")
    records[4]["inputs"]["tx_amount"] = -float("inf")
    if mixed:  # another segment's field holds JSON (an int among floats): read value by value
        records[20]["inputs"]["tx_amount"] = 7
    with PredictionLog(path, flush_rows=10, segment_rows=10) as log:
        for i in range(0, 30, 10):
            log.append_many(records[i:i + 10])
            log.flush()
    got = _read(path, 1000)
    _same(got, _read(_rows_only(path), 1000))
    assert np.isnan(got.loc[3, "input.tx_amount"]) and np.isnan(got.loc[4, "input.tx_amount"])


def test_backfilled_segments_of_an_old_log_read_as_its_rows(tmp_path: Path) -> None:
    from keel.serve.predlog import backfill_segments

    path = tmp_path / "p.sqlite"
    records = _records()
    with PredictionLog(path) as log:
        log.append_many(records[:50])
        log.add_labels(_labels(range(120)))
    _drop = _rows_only(path)  # the previous format: rows only (no segments, no label rows)
    with sqlite3.connect(_drop) as db:
        db.execute("update predictions set features_f64 = null, feature_set = null where seq % 3 = 0")  # JSON only
        db.execute("delete from predictions where seq = 20")  # a gap in seq
    db.close()
    with PredictionLog(_drop, segment_rows=8) as log:  # an upgraded service appends: 16 + 4 rows in segments
        log.append_many(records[50:70])
    want = _read(_rows_only(_drop), 6)
    assert backfill_segments(_drop, segment_rows=16) == 49
    assert backfill_segments(_drop, segment_rows=16) == 0  # idempotent
    with sqlite3.connect(_drop) as db:
        spans = db.execute("select seq0, n from prediction_segments order by seq0").fetchall()
    db.close()
    assert sum(n for _, n in spans) == 69 and (21, 16) in spans and (1, 16) in spans
    for batch_rows in (6, 1000):
        _same(_read(_drop, batch_rows), want)
    _junk_rows(_drop)
    _same(_read(_drop, 1000), want)
    # A segment overlapping another (two writers covered the same rows) is skipped, whatever it holds.
    with sqlite3.connect(_drop) as db:
        (data,) = db.execute("select data from prediction_segments where seq0 = 21").fetchone()
        db.execute("insert into prediction_segments (seq0, n, data) values (25, 16, ?)", (data,))
    db.close()
    _same(_read(_drop, 1000), want)
    _same(_read(_drop, 7), want)


def test_cli_log_backfill_covers_an_old_log_and_refuses_a_missing_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from keel.cli import app

    path = tmp_path / "p.sqlite"
    with PredictionLog(path) as log:
        log.append_many(_records(40))
        log.add_labels(_labels(range(40)))
    old = _rows_only(path)
    want = _read(old, 1000)
    runner = CliRunner()
    done = runner.invoke(app, ["log", "backfill", "--log", str(old), "--segment-rows", "16"])
    assert done.exit_code == 0, done.output
    assert "40 rows newly covered" in done.output
    with sqlite3.connect(old) as db:
        assert db.execute("select sum(n) from prediction_segments").fetchone()[0] == 40
    db.close()
    _same(_read(old, 1000), want)
    missing = tmp_path / "none.sqlite"
    refused = runner.invoke(app, ["log", "backfill", "--log", str(missing)])
    assert refused.exit_code == 2 and "No prediction log" in refused.output
    assert not missing.exists()
