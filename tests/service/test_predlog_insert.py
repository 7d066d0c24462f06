"""How the prediction log's writer puts rows into SQLite: many rows per insert statement, a new log's page size, the
writer process's direct binding of NULL and BLOB values. Each writes exactly what a plain row-by-row insert writes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from keel.serve import logwriter, predlog
from keel.serve.predlog import PredictionLog, connect, insert_rows, read_predictions

WIDTH = len(predlog.PREDICTION_COLUMNS) + len(predlog.FEATURE_COLUMNS)


def _row(i: int) -> tuple[Any, ...]:
    return (f"r{i}", i, "2026-11-30T06:00:00.000000", None if i % 5 == 0 else f"2018-04-01T00:00:{i % 60:02d}.000000",
            None if i % 7 == 0 else str(i), "batch", '{"x":1}', None if i % 3 == 0 else '{"f":0.5}',
            None if i % 4 == 0 else i / 7, "approve" if i % 2 else 'say "no" été', None if i % 6 == 0 else "v1",
            i % 2, None if i % 2 == 0 else "model_error", 0, -0.0 if i == 1 else 1.5,
            None if i % 3 == 0 else bytes([i % 256]) * 8, None if i % 3 == 0 else 1)


def _rows_typed(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    cols = ["seq", *predlog.PREDICTION_COLUMNS, *predlog.FEATURE_COLUMNS]
    return db.execute(f"select {', '.join(f'typeof({c}), {c}' for c in cols)} from predictions order by seq"
                      ).fetchall()


def test_rows_inserted_many_per_statement_are_the_rows_inserted_one_by_one(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(2 * predlog._MULTI_ROWS + 7)]  # two whole statements and 7 rows one by one
    one, many = connect(tmp_path / "one.sqlite"), connect(tmp_path / "many.sqlite")
    statements: list[str] = []
    many.set_trace_callback(statements.append)
    try:
        one.executemany(predlog._INSERT, rows)
        insert_rows(many, rows)
        inserts = [s for s in statements if s.lstrip().lower().startswith("insert into predictions")]
        assert len(inserts) == 2 + 7  # not one statement per row
        assert _rows_typed(many) == _rows_typed(one)  # same seq (consecutive, in order), values and SQLite types
    finally:
        one.close()
        many.close()


def test_a_row_of_another_length_is_refused_not_shifted_into_its_neighbours(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(predlog._MULTI_ROWS)]
    rows[3] = rows[3][:-1]
    db = connect(tmp_path / "log.sqlite")
    try:
        db.execute("begin")
        with pytest.raises(sqlite3.ProgrammingError):
            insert_rows(db, rows)
        db.execute("rollback")
        assert db.execute("select count(*) from predictions").fetchone() == (0,)
    finally:
        db.close()


def test_a_new_log_has_large_pages_and_an_existing_log_keeps_its_own(tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)
    db.execute("pragma page_size=4096")
    db.execute("create table something (x)")
    db.close()
    log = PredictionLog(old)
    log.append_many([{"request_id": "a", "decision": "approve", "inputs": {"x": 1}}])
    log.close()
    fresh = connect(tmp_path / "new.sqlite")
    db = sqlite3.connect(old)
    try:
        assert fresh.execute("pragma page_size").fetchone() == (predlog.PAGE_SIZE,) and predlog.PAGE_SIZE > 4096
        assert db.execute("pragma page_size").fetchone() == (4096,)
    finally:
        fresh.close()
        db.close()
    assert read_predictions(old)["request_id"].tolist() == ["a"]


def test_the_writer_process_binds_null_and_blob_values_as_sqlite3_does(monkeypatch: pytest.MonkeyPatch) -> None:
    none_key, bytes_key = (type(None), sqlite3.PrepareProtocol), (bytes, sqlite3.PrepareProtocol)
    db = sqlite3.connect(":memory:")
    db.execute("create table t (a, b)")
    db.execute("insert into t values (?, ?)", (None, b"\x00ab"))
    for key in (none_key, bytes_key):  # restored (removed) after the test: this process binds as before
        monkeypatch.setitem(sqlite3.adapters, key, None)
    logwriter._bind_directly()
    assert sqlite3.adapters[none_key](None) is None and sqlite3.adapters[bytes_key](b"x") == b"x"
    db.execute("insert into t values (?, ?)", (None, b"\x00ab"))
    assert db.execute("select typeof(a), a, typeof(b), b from t").fetchall() == [("null", None, "blob", b"\x00ab")] * 2
    db.close()
