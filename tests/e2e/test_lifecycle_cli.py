"""The lifecycle from the command line: train twice, promote, roll back — and the service follows the alias.

Also: runs are listed with what they recorded, and `keel reproduce` re-trains a run to the same numbers.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.data.simulate import simulate, write_simulation
from keel.spec import load_spec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"
runner = CliRunner(env={"COLUMNS": "250", "KEEL_ACTOR": "ci"})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle")
    write_simulation(simulate(n_customers=400, n_terminals=800, n_days=75, seed=5), root / "data")
    text = FLAGSHIP.read_text()
    text = text.replace('candidates = ["lightgbm", "hist_gradient_boosting"]', 'candidates = ["lightgbm"]')
    text = text.replace("search_trials = 6", "search_trials = 1\nbootstrap = 20")
    (root / "keel.toml").write_text(text)
    return root / "keel.toml"


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_promote_and_rollback_change_what_the_service_loads(project: Path, monkeypatch) -> None:
    spec = str(project)
    first = invoke("train", "-s", spec)
    assert "Tracked run" in first and "model version 1" in first
    assert (project.parent / "reports").is_dir()
    invoke("models", "promote", "1", "--force", "--reason", "first model", "-s", spec)
    second = invoke("train", "-s", spec)
    assert "model version 2" in second

    listing = invoke("models", "list", "-s", spec)
    assert re.search(r"\b2\b.*challenger", listing) and re.search(r"\b1\b.*champion", listing)

    # Promoting a model that does not beat the champion is refused unless forced; either way the audit log says.
    refused = runner.invoke(app, ["models", "promote", "2", "--reason", "try", "-s", spec])
    assert refused.exit_code in (0, 2)
    if refused.exit_code == 2:
        assert "does not beat the champion" in refused.output
        invoke("models", "promote", "2", "--force", "--reason", "forced for the test", "-s", spec)

    from keel.serve.app import create_app

    monkeypatch.setenv("KEEL_API_KEY", "secret")
    s = load_spec(project)
    with TestClient(create_app(s)) as client:
        assert client.get("/v1/model").json()["version"] == "v2"
        invoke("models", "rollback", "--reason", "alerts doubled", "-s", spec)
        assert client.post("/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/admin/reload", headers={"X-API-Key": "secret"}).status_code == 200
        assert client.get("/v1/model").json()["version"] == "v1"

    # `keel score` loads the alias too: after the rollback it scores with version 1.
    scored = project.parent / "scores.parquet"
    invoke("score", str(project.parent / "data" / "transactions.parquet"), "-o", str(scored), "-s", spec)
    import pandas as pd

    assert set(pd.read_parquet(scored, columns=["model_version"])["model_version"]) == {"1"}

    history = invoke("models", "history", "-s", spec)
    assert "rollback" in history and "alerts doubled" in history and "forced" in history


def test_runs_are_listed_and_reproduced(project: Path) -> None:
    spec = str(project)
    listing = invoke("runs", "list", "-s", spec)
    run_ids = re.findall(r"\b([0-9a-f]{32})\b", listing)
    assert len(run_ids) >= 1
    shown = invoke("runs", "show", run_ids[-1], "-s", spec)
    assert "data.fingerprint" in shown and "spec.hash" in shown and "test.average_precision" in shown
    result = runner.invoke(app, ["reproduce", run_ids[-1], "-s", spec])
    assert result.exit_code == 0, result.output
    assert "recorded metrics reproduced" in result.output
