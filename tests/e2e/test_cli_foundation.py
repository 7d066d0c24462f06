"""`keel init`, `keel validate` and error handling from the command line, on tables Keel has never seen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.spec import load_spec

runner = CliRunner(env={"COLUMNS": "250"})


def churn_table(n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame({
        "account_id": rng.integers(0, 60, n),
        "event_uuid": [f"e{i:05d}" for i in range(n)],
        "event_time": pd.date_range("2023-03-01", periods=n, freq="37min").astype(str),
        "sessions": rng.poisson(4, n),
        "spend": rng.gamma(2.0, 30.0, n).round(2),
        "plan": rng.choice(["free", "pro", "team"], n),
        "churned": rng.choice(["yes", "no"], n, p=[0.2, 0.8]),
    })


def test_init_then_validate_on_an_unseen_csv(tmp_path: Path) -> None:
    table = tmp_path / "churn.csv"
    churn_table().to_csv(table, index=False)
    spec_path = tmp_path / "keel.toml"
    result = runner.invoke(app, ["init", str(table), "-o", str(spec_path)])
    assert result.exit_code == 0, result.output
    spec = load_spec(spec_path)
    # DuckDB's CSV sniffer reads yes/no as booleans; either way "yes" must be the positive class.
    assert spec.data.label == "churned" and spec.data.positive_label in ("yes", True)
    assert spec.data.timestamp == "event_time"
    assert spec.data.id_column == "event_uuid" and spec.data.entity_keys == ["account_id"]
    assert {"sessions", "spend", "plan"} <= set(spec.features.raw) and spec.data.categorical == ["plan"]
    assert spec.resolve(spec.data.source).resolve() == table.resolve()
    result = runner.invoke(app, ["validate", "-s", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert "contract holds" in result.output
    # Refuses to overwrite without --force.
    again = runner.invoke(app, ["init", str(table), "-o", str(spec_path)])
    assert again.exit_code == 2 and "already exists" in again.output


def _write_spec(tmp_path: Path, table: Path, extra: str = "") -> Path:
    spec = tmp_path / "keel.toml"
    spec.write_text(
        f'[project]\nname = "churn"\n[decision]\nquestion = "Call?"\npositive_class = "churns"\n'
        f'[data]\nsource = "{table.name}"\ntimestamp = "event_time"\nlabel = "churned"\npositive_label = "yes"\n'
        f'id_column = "event_uuid"\n{extra}'
    )
    return spec


def test_violations_exit_1_and_structural_problems_exit_2(tmp_path: Path) -> None:
    frame = churn_table()
    frame.loc[[1, 2], "spend"] = -1.0
    table = tmp_path / "churn.csv"
    frame.to_csv(table, index=False)
    spec = _write_spec(tmp_path, table, "[data.ranges]\nspend = { min = 0 }\n")
    result = runner.invoke(app, ["validate", "-s", str(spec)])
    assert result.exit_code == 1 and "outside [0.0, None]" in result.output
    frame.loc[5, "event_time"] = "not a time"
    frame.to_csv(table, index=False)
    result = runner.invoke(app, ["validate", "-s", str(spec)])
    assert result.exit_code == 2 and "cannot be read as a time" in result.output


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        ("[project\nname=", "is not valid TOML"),
        ('[project]\nname = "x"\n', "The key 'decision' in keel.toml is required but missing"),
    ],
)
def test_malformed_spec_is_one_paragraph_exit_2(tmp_path: Path, spec_text: str, message: str) -> None:
    spec = tmp_path / "keel.toml"
    spec.write_text(spec_text)
    result = runner.invoke(app, ["validate", "-s", str(spec)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_missing_column_exit_2(tmp_path: Path) -> None:
    table = tmp_path / "churn.csv"
    churn_table().drop(columns=["churned"]).to_csv(table, index=False)
    result = runner.invoke(app, ["validate", "-s", str(_write_spec(tmp_path, table))])
    assert result.exit_code == 2
    assert "column 'churned' named in data.label is missing" in result.output


def test_console_script_help_lists_every_verb() -> None:
    proc = subprocess.run([sys.executable, "-m", "keel.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("init", "validate", "simulate", "demo"):
        assert verb in proc.stdout
