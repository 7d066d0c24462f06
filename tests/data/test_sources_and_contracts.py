"""Reading sources through DuckDB, the data contract and the fingerprint."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from keel.data.contracts import check_contract
from keel.data.fingerprint import fingerprint_frame, fingerprint_source
from keel.data.sources import open_source, require_columns
from keel.errors import DataError
from keel.spec import parse_spec


def loans(n: int = 200, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "loan_id": np.arange(n),
        "applicant_id": rng.integers(0, 50, n),
        "applied_at": pd.date_range("2024-01-01", periods=n, freq="h"),
        "income": rng.normal(50_000, 10_000, n).round(2),
        "amount": rng.uniform(1_000, 20_000, n).round(2),
        "region": rng.choice(["north", "south", "east"], n),
        "defaulted": rng.integers(0, 2, n),
    })


def spec_for(path: Path, **data: object):
    return parse_spec({
        "project": {"name": "loans"},
        "decision": {"question": "Refer?", "positive_class": "defaults"},
        "data": {"source": str(path), "id_column": "loan_id", "timestamp": "applied_at", "label": "defaulted",
                 "entity_keys": ["applicant_id"],
                 "schema": {"income": "float", "amount": "float", "applied_at": "timestamp"},
                 "ranges": {"amount": {"min": 0}}, **data},
    })


@pytest.fixture()
def csv(tmp_path: Path) -> Path:
    path = tmp_path / "loans.csv"
    loans().to_csv(path, index=False)
    return path


def test_formats_and_globs_read_the_same_rows(tmp_path: Path, csv: Path) -> None:
    frame = pd.read_csv(csv)
    frame.iloc[:100].to_parquet(tmp_path / "part-1.parquet")
    frame.iloc[100:].to_parquet(tmp_path / "part-2.parquet")
    with duckdb.connect(str(tmp_path / "db.duckdb")) as con:
        con.execute(f"CREATE TABLE loans AS SELECT * FROM read_csv('{csv}')")
    sources = [
        open_source(csv),
        open_source(tmp_path / "part-*.parquet"),
        open_source(tmp_path / "db.duckdb", table="loans"),
    ]
    counts = {s.format: s.count() for s in sources}
    assert counts == {"csv": 200, "parquet": 200, "duckdb": 200}
    sums = [s.read(columns=["amount"])["amount"].sum() for s in sources]
    assert np.allclose(sums, frame["amount"].sum())
    batches = list(sources[1].batches(columns=["loan_id"], batch_rows=64))
    assert sum(b.num_rows for b in batches) == 200 and max(b.num_rows for b in batches) <= 64


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "missing.csv", {}), r"does not exist.*data\.source"),
        (lambda d: (d / "*.nothing", {}), r"matches no file"),
        (lambda d: (d, {}), r"is a folder"),
        (lambda d: ((d / "x.xlsx").touch() or d / "x.xlsx", {}), r"Cannot tell the format.*\.xlsx"),
        (lambda d: ((d / "x.duckdb").touch() or d / "x.duckdb", {}), r"no table is named"),
    ],
)
def test_source_errors(tmp_path: Path, make, message: str) -> None:
    path, kwargs = make(tmp_path)
    with pytest.raises(DataError, match=message):
        open_source(path, **kwargs)


def test_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"Cannot read .*bad\.parquet as parquet"):
        open_source(bad).schema()


def test_require_columns_names_what_is_missing(csv: Path) -> None:
    with pytest.raises(DataError, match=r"Columns 'incme', 'x' are missing from .*loans\.csv, which has: loan_id"):
        require_columns(open_source(csv), ["income", "incme", "x"])


def test_clean_table_holds_its_contract(csv: Path) -> None:
    report = check_contract(spec_for(csv), open_source(csv))
    assert report.rows == 200 and report.ok and report.findings == []


def test_contract_finds_every_kind_of_violation(tmp_path: Path) -> None:
    frame = loans()
    frame.loc[3, "income"] = np.nan
    frame.loc[[5, 6], "amount"] = -10.0
    frame.loc[7, "loan_id"] = 8
    frame["applied_at"] = frame["applied_at"].astype(str)
    frame.loc[9, "applied_at"] = "2999-01-01 00:00:00"
    path = tmp_path / "dirty.csv"
    frame.to_csv(path, index=False)
    report = check_contract(spec_for(path), open_source(path), now=datetime(2025, 1, 1))
    found = {(f.check, f.column): f for f in report.findings}
    assert found[("nulls", "income")].rows == 1
    assert found[("ranges", "amount")].rows == 2
    assert found[("duplicates", "loan_id")].rows == 1
    assert found[("timestamps", "applied_at")].rows == 1 and "future" in found[("timestamps", "applied_at")].message
    assert not report.ok and not report.structural


def test_structural_findings(tmp_path: Path) -> None:
    frame = loans().rename(columns={"income": "Income"})
    frame["applied_at"] = frame["applied_at"].astype(str)
    frame.loc[4, "applied_at"] = "next tuesday"
    frame["amount"] = frame["amount"].astype(str) + "EUR"
    path = tmp_path / "broken.csv"
    frame.to_csv(path, index=False)
    report = check_contract(spec_for(path), open_source(path))
    messages = " | ".join(f.message for f in report.structural)
    assert "column 'income' named in data.schema is missing (did you mean 'Income'?)" in messages
    assert "'applied_at' has 1 value that cannot be read as a time (e.g. 'next tuesday')" in messages
    assert "column 'amount' should be float (data.schema) but is VARCHAR" in messages
    with pytest.raises(DataError, match="cannot be used"):
        report.raise_for_findings()


def test_label_checks(tmp_path: Path) -> None:
    frame = loans()
    frame["defaulted"] = 0
    path = tmp_path / "one-class.csv"
    frame.to_csv(path, index=False)
    report = check_contract(spec_for(path), open_source(path))
    assert any(f.check == "labels" for f in report.findings)
    frame["defaulted"] = np.arange(len(frame)) % 3
    frame.to_csv(path, index=False)
    report = check_contract(spec_for(path), open_source(path))
    assert any(f.check == "labels" and f.severity == "structural" for f in report.findings)


def test_fingerprint_is_about_content_not_format(tmp_path: Path, csv: Path) -> None:
    frame = pd.read_csv(csv, parse_dates=["applied_at"])
    frame.to_parquet(tmp_path / "same.parquet")
    a = fingerprint_source(open_source(csv))
    b = fingerprint_source(open_source(tmp_path / "same.parquet"), batch_rows=37)
    assert a == b
    changed = frame.copy()
    changed.loc[17, "amount"] += 0.01
    assert fingerprint_frame(changed) != fingerprint_frame(frame)
    assert fingerprint_frame(frame.iloc[::-1]) != fingerprint_frame(frame)  # order is part of the content
