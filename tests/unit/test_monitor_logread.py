"""The fast log reader gives exactly what decoding each logged row's JSON gives, whatever the rows look like."""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import MonitorError
from keel.logformat import ensure_feature_columns, feature_blob, feature_set_id, has_feature_columns
from keel.monitor.logread import features_pattern, read_log
from keel.serve.predlog import PREDICTION_COLUMNS, PredictionLog, _prediction_row, connect, read_predictions

FEATURES = ["amount", "night", "nb_tx"]
T0 = datetime(2018, 9, 1)


def _records(n: int = 120, *, odd: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        feats: dict | None = {"amount": float(rng.gamma(2, 30)), "night": float(i % 2), "nb_tx": float(i % 7)}
        if odd and i == 5:
            feats = None                                            # a fallback row without features
        elif odd and i == 17:
            feats = {"nb_tx": 3.0, "amount": 1.5, "night": 0.0}     # another key order
        elif odd and i == 18:
            feats = {"amount": 2.5, "night": None, "nb_tx": 1.0, "new": 4.0}  # a null and an extra key
        elif odd and i == 60:
            feats = {"amount": 7.0, "night": 1.0}                   # a missing key
        score = None if odd and i == 9 else float(rng.random() * 1e-3 + 1 / 3)
        records.append({
            "request_id": f"r{i}", "time": T0 + timedelta(hours=i), "event_time": T0 + timedelta(hours=i),
            "event_id": str(i), "decision": ("review", 'say "no"', "it's, NULL")[i % 3],
            "inputs": {"customer_id": i % 4, "tx_amount": round(float(rng.gamma(2, 30)), 2),
                       "who": "a:b,c" if i % 11 == 0 else "x"},
            "features": feats, "score": score, "fallback": i == 5, "fallback_reason": {5: "model_error", 7: "NULL", 8: ""}.get(i),
            "latency_ms": float(rng.gamma(2, 2)),
        })
    return records


def _labels(n: int) -> list[tuple]:
    return [(str(i), float(i % 5 == 0), T0 + timedelta(hours=i, days=2)) for i in range(0, n, 2)]


def _write(path: Path, n: int = 120, *, odd: bool = True) -> None:
    """An old log, as written before the binary feature column and the segments existed (JSON text only)."""
    with PredictionLog(path) as log:
        log.append_many(_records(n, odd=odd))
        log.add_labels(_labels(n))
    _drop_segments(path)
    with sqlite3.connect(path) as db:
        for ddl in ("alter table predictions drop column features_f64",
                    "alter table predictions drop column feature_set", "drop table feature_sets"):
            db.execute(ddl)
    db.close()


def _drop_segments(path: Path) -> None:
    """The log as written before the columnar segments existed (last format: rows with feature blobs)."""
    with sqlite3.connect(path) as db:
        for ddl in ("drop table prediction_segments", "drop table label_rows", "drop index labels_by_at"):
            db.execute(ddl)
    db.close()


def _write_with_blobs(path: Path, records: list[dict], *, blob: Callable[[int], bool] = lambda i: True,
                      junk_json: bool = True) -> None:
    """The log as the service writes it with the binary feature column (JSON text too); ``blob(i)`` False leaves
    row i as an old log's row. ``junk_json`` then overwrites the JSON of the rows with a blob, so a reader that
    gets their values right can only have read the blobs."""
    db = connect(path)
    ensure_feature_columns(db)
    ensure_feature_columns(db)  # idempotent
    cols = [*PREDICTION_COLUMNS, "features_f64", "feature_set"]
    sql = f"insert into predictions ({', '.join(cols)}) values ({', '.join('?' * len(cols))})"
    for i, record in enumerate(records):
        row = _prediction_row(record)[:len(PREDICTION_COLUMNS)]
        feats = record["features"]
        data, fs = None, None
        if feats is not None and blob(i):
            data = feature_blob(list(feats), feats)
            fs = feature_set_id(db, list(feats)) if data is not None else None
        db.execute(sql, (*row, data, fs))
    db.close()
    with PredictionLog(path) as log:
        log.add_labels(_labels(len(records)))
    if junk_json:
        with sqlite3.connect(path) as db:
            db.execute("""update predictions set features = '{"junk":1}' where features_f64 is not null""")
        db.close()


def _read(path: Path, batch_rows: int, features: list[str] = FEATURES) -> pd.DataFrame:
    return pd.concat(list(read_log(path, features=features, inputs=["customer_id", "tx_amount", "who"], labels=True,
                                   batch_rows=batch_rows, columns=("seq", "event_time", "score", "decision"))),
                     ignore_index=True)


def _same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    for c in got.columns:
        a, b = got[c].to_numpy(), want[c].to_numpy()
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), c
        else:  # object columns (a string feature): missing is missing, whatever its spelling
            assert a.dtype == b.dtype, c
            assert [None if v is None or v != v else v for v in a] == [None if v is None or v != v else v for v in b], c


def _expected(path: Path, start: datetime | None = None, end: datetime | None = None) -> pd.DataFrame:
    return read_predictions(path, start, end)  # the serving module's own reader: json.loads per row


@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_read_log_equals_decoding_each_row(tmp_path: Path, batch_rows: int) -> None:
    path = tmp_path / "p.sqlite"
    _write(path)
    got = pd.concat(list(read_log(path, features=FEATURES, inputs=["customer_id", "tx_amount", "who"],
                                  batch_rows=batch_rows, columns=("seq", "event_time", "time", "score", "decision",
                                                                  "fallback", "fallback_reason", "latency_ms"))),
                    ignore_index=True)
    want = _expected(path)
    assert len(got) == len(want) == 120
    assert (got["seq"].to_numpy() == want["seq"].to_numpy()).all()
    for col in ("event_time", "time", "decision", "fallback", "fallback_reason"):
        assert got[col].tolist() == want[col].tolist(), col
    # Reals round-trip exactly (17 significant digits), NULL stays missing.
    assert np.array_equal(got["score"].to_numpy(), want["score"].to_numpy(), equal_nan=True)
    assert np.array_equal(got["latency_ms"].to_numpy(), want["latency_ms"].to_numpy())
    for f in FEATURES:
        assert np.array_equal(got[f].to_numpy(dtype=float), want[f].to_numpy(dtype=float), equal_nan=True), f
    assert np.isnan(got.loc[5, "amount"]) and got.loc[17, "nb_tx"] == 3.0 and np.isnan(got.loc[18, "night"])
    assert np.isnan(got.loc[60, "nb_tx"])
    inputs = pd.DataFrame(want["inputs"].tolist())
    assert got["input.customer_id"].astype(str).tolist() == inputs["customer_id"].astype(str).tolist()
    assert np.array_equal(got["input.tx_amount"].to_numpy(dtype=float), inputs["tx_amount"].to_numpy(dtype=float))
    assert got["input.who"].tolist() == inputs["who"].tolist()


def test_string_features_fall_back_to_per_row_decoding(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    with PredictionLog(path) as log:
        for i in range(30):
            log.append({"request_id": f"r{i}", "event_time": T0 + timedelta(minutes=i), "decision": "approve",
                        "features": {"amount": float(i), "channel": "web:1" if i % 2 else "shop,2"}, "score": 0.5})
    got = pd.concat(list(read_log(path, features=["amount", "channel"], batch_rows=8)), ignore_index=True)
    assert got["amount"].tolist() == [float(i) for i in range(30)]
    assert got["channel"].tolist() == ["web:1" if i % 2 else "shop,2" for i in range(30)]


def test_time_range_labels_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    _write(path, odd=False)
    start, end = T0 + timedelta(hours=10), T0 + timedelta(hours=40)
    got = pd.concat(list(read_log(path, features=FEATURES, start=start, end=end, labels=True, batch_rows=9)),
                    ignore_index=True)
    assert got["event_time"].min() == start and got["event_time"].max() == end - timedelta(hours=1)
    assert len(got) == 30 and len(got) == len(_expected(path, start, end))
    labelled = got["label"].notna().to_numpy()
    assert labelled.tolist() == [i % 2 == 0 for i in range(10, 40)]
    assert (got.loc[labelled, "at"] == got.loc[labelled, "event_time"] + timedelta(days=2)).all()
    assert got.loc[labelled, "label"].tolist() == [float(i % 5 == 0) for i in range(10, 40, 2)]
    # Fields read for labelled rows only: the labelled rows' values, None for the others; other inputs for all.
    both = pd.concat(list(read_log(path, start=start, end=end, labels=True, batch_rows=9, inputs=["tx_amount"],
                                   labelled_inputs=["customer_id", "who"])), ignore_index=True)
    inputs = pd.DataFrame(_expected(path, start, end)["inputs"].tolist())
    assert both["input.customer_id"].tolist() == [c if k else None for c, k in zip(inputs["customer_id"], labelled, strict=True)]
    assert both["input.who"].tolist() == [c if k else None for c, k in zip(inputs["who"], labelled, strict=True)]
    assert np.array_equal(both["input.tx_amount"].to_numpy(dtype=float), inputs["tx_amount"].to_numpy(dtype=float))
    assert list(read_log(path, start=T0 + timedelta(days=30))) == []
    with pytest.raises(MonitorError, match="No prediction log"):
        list(read_log(tmp_path / "none.sqlite"))
    with pytest.raises(MonitorError, match="unknown log columns"):
        list(read_log(path, columns=("seq", "nope")))


def test_features_pattern_escapes_glob_characters() -> None:
    assert features_pattern(["a*", "b"]) == '{"a[*]":*,"b":*}'


# --- the binary feature column -------------------------------------------------------------------------------
def test_feature_blob_contract() -> None:
    blob = feature_blob(["a", "b", "c", "d"], {"b": True, "a": 1.5, "c": None, "d": np.float32(2)})
    assert blob == struct.pack("<4d", 1.5, 1.0, float("nan"), 2.0)
    assert np.frombuffer(feature_blob(["x", "a"], {"a": 3}) or b"", "<f8")[1] == 3.0
    assert np.isnan(np.frombuffer(feature_blob(["x", "a"], {"a": 3}) or b"", "<f8")[0])  # missing -> NaN
    assert feature_blob(["a", "b"], {"a": 1.0, "b": "web"}) is None  # a string: the row keeps only its JSON
    assert feature_blob(["a"], {"a": 10**400}) is None
    assert feature_blob(["a"], None) is None
    assert feature_blob([], {}) == b""


def test_feature_columns_migrate_an_old_log_and_sets_are_stable(tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    _write(path, 20, odd=False)
    with sqlite3.connect(path) as db:
        assert not has_feature_columns(db)
        ensure_feature_columns(db)
        ensure_feature_columns(db)
        assert has_feature_columns(db)
        first = feature_set_id(db, ["a", "b"])
        assert feature_set_id(db, ["b", "a"]) != first and feature_set_id(db, ["a", "b"]) == first
        assert db.execute("select count(*) from predictions where features_f64 is null").fetchone()[0] == 20
    db.close()
    want = _read(tmp_path / "p.sqlite", 7)
    assert len(want) == 20 and want["amount"].notna().all()  # old rows still read, from their JSON


@pytest.mark.parametrize("batch_rows", [7, 1000])
def test_blob_rows_read_exactly_what_their_json_says(tmp_path: Path, batch_rows: int) -> None:
    records = _records()
    records[30]["features"] = {"amount": float("inf"), "night": float("nan"), "nb_tx": -0.0}  # JSON: null, null
    records[31]["features"] = {"amount": 1.0, "night": "web", "nb_tx": 2.0}  # a string: JSON only
    _write(tmp_path / "json.sqlite", 0)
    with PredictionLog(tmp_path / "json.sqlite") as log:
        log.append_many(records)
        log.add_labels(_labels(len(records)))
    _write_with_blobs(tmp_path / "blob.sqlite", records)
    with sqlite3.connect(tmp_path / "blob.sqlite") as db:
        (blobs,) = db.execute("select count(*) from predictions where features_f64 is not null").fetchone()
    db.close()
    assert blobs == 118  # all but the row without features and the row with a string
    want = _read(tmp_path / "json.sqlite", batch_rows)
    got = _read(tmp_path / "blob.sqlite", batch_rows)
    _same(got, want)
    assert np.isnan(got.loc[30, "amount"]) and pd.isna(got.loc[30, "night"]) and got.loc[30, "nb_tx"] == 0.0
    assert got.loc[31, "night"] == "web" and got.loc[31, "amount"] == 1.0
    # Without the blobs the junked JSON would read as missing: the values above came from the blobs.
    with sqlite3.connect(tmp_path / "blob.sqlite") as db:
        db.execute("update predictions set features_f64 = null")
    db.close()
    assert _read(tmp_path / "blob.sqlite", batch_rows)["amount"].isna().sum() > 100


@pytest.mark.parametrize("batch_rows", [5, 1000])
def test_old_and_new_rows_mixed_in_one_log(tmp_path: Path, batch_rows: int) -> None:
    records = _records()
    with PredictionLog(tmp_path / "json.sqlite") as log:
        log.append_many(records)
        log.add_labels(_labels(len(records)))
    # The first 50 rows were written before the upgrade, then every other row (as if two services shared the log).
    _write_with_blobs(tmp_path / "mixed.sqlite", records, blob=lambda i: i >= 50 and i % 2 == 0)
    _same(_read(tmp_path / "mixed.sqlite", batch_rows), _read(tmp_path / "json.sqlite", batch_rows))


@pytest.mark.parametrize("batch_rows", [9, 1000])
def test_a_new_feature_set_mid_log(tmp_path: Path, batch_rows: int) -> None:
    records = _records(odd=False)
    for i, r in enumerate(records):
        if i >= 70:  # a new model: another order, one feature dropped, one added
            f = r["features"]
            r["features"] = {"nb_tx": f["nb_tx"], "extra": 1.0, "amount": f["amount"]}
    with PredictionLog(tmp_path / "json.sqlite") as log:
        log.append_many(records)
        log.add_labels(_labels(len(records)))
    _write_with_blobs(tmp_path / "blob.sqlite", records)
    with sqlite3.connect(tmp_path / "blob.sqlite") as db:
        assert db.execute("select count(*) from feature_sets").fetchone()[0] == 2
    db.close()
    features = [*FEATURES, "extra"]
    got, want = _read(tmp_path / "blob.sqlite", batch_rows, features), _read(tmp_path / "json.sqlite", batch_rows,
                                                                                 features)
    _same(got, want)
    assert got["night"].isna().to_numpy().tolist() == [i >= 70 for i in range(120)]
    assert got["extra"].notna().to_numpy().tolist() == [i >= 70 for i in range(120)]


@pytest.mark.parametrize(("value", "text"), [
    (T0, "2018-09-01T00:00:00.000000"),
    (datetime(2018, 9, 1, 3, 4, 5, 6), "2018-09-01T03:04:05.000006"),
    (datetime(2018, 9, 1, 12, tzinfo=timezone(timedelta(hours=2))), "2018-09-01T10:00:00.000000"),
    ("2018-09-01 10:00+02:00", "2018-09-01T08:00:00.000000"),
    (pd.Timestamp("2018-09-01T23:59:59.999999", tz="UTC"), "2018-09-01T23:59:59.999999"),
    (None, None),
])
def test_time_text_is_utc_without_offset_to_the_microsecond(value: object, text: str | None) -> None:
    """One function writes and bounds the log's times (keel.logformat.iso); plain and pandas times agree."""
    from keel.logformat import iso

    assert iso(value) == text
