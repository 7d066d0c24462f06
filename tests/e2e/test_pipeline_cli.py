"""`keel pipeline run`: steps run once, are cached while their inputs stay the same, and re-run when they change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.data.simulate import simulate, write_simulation

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"
runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write_simulation(simulate(n_customers=300, n_terminals=600, n_days=70, seed=2), tmp_path / "data")
    text = FLAGSHIP.read_text().replace('candidates = ["lightgbm", "hist_gradient_boosting"]', 'candidates = ["lightgbm"]')
    (tmp_path / "keel.toml").write_text(text.replace("search_trials = 6", "search_trials = 1\nbootstrap = 10"))
    return tmp_path / "keel.toml"


def statuses(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ("validate", "features", "train", "score", "monitor"):
            found[parts[1]] = parts[2]
    return found


def test_cached_dag_reruns_only_what_changed(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = runner.invoke(app, ["pipeline", "run", "-s", str(project)])
    assert first.exit_code == 0, first.output
    ran = statuses(first.output)
    assert ran["validate"] == ran["features"] == ran["train"] == "ran" and ran["monitor"] == "skipped"
    assert "Schedule it:" in first.output and "keel pipeline run" in first.output
    if ran["score"] == "skipped":  # the first model stayed challenger: no champion to score with yet
        promoted = runner.invoke(app, ["models", "promote", "1", "--force", "--reason", "test", "-s", str(project)])
        assert promoted.exit_code == 0, promoted.output
        after = runner.invoke(app, ["pipeline", "run", "-s", str(project)])
        assert statuses(after.output) == {"validate": "cached", "features": "cached", "train": "cached",
                                          "score": "ran", "monitor": "skipped"}
    record = json.loads((project.parent / ".keel" / "pipeline.json").read_text())
    assert set(record) == {"validate", "features", "train", "score"}
    assert Path(record["score"]["outputs"]["scores"]).exists()

    second = runner.invoke(app, ["pipeline", "run", "-s", str(project)])
    assert statuses(second.output) == {"validate": "cached", "features": "cached", "train": "cached",
                                       "score": "cached", "monitor": "skipped"}

    third = runner.invoke(app, ["pipeline", "run", "-s", str(project), "--from", "score"])
    assert statuses(third.output)["score"] == "ran" and statuses(third.output)["train"] == "cached"

    # New data changes the source fingerprint: everything downstream runs again.
    write_simulation(simulate(n_customers=300, n_terminals=600, n_days=71, seed=2), project.parent / "data")
    import keel.data.fingerprint as fp
    import keel.train

    streamed: list[str] = []

    def counted(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        streamed.append(source.describe())
        return real(source, *args, **kwargs)

    real = fp.fingerprint_source
    monkeypatch.setattr(fp, "fingerprint_source", counted)
    monkeypatch.setattr(keel.train, "fingerprint_source", counted)
    fourth = runner.invoke(app, ["pipeline", "run", "-s", str(project)])
    assert fourth.exit_code == 0, fourth.output
    assert statuses(fourth.output)["validate"] == "ran" and statuses(fourth.output)["train"] == "ran"
    # The source is fingerprinted once per run (the steps' keys and the trained run share it), and the run
    # records the new data's fingerprint, not the old one's.
    assert len(streamed) == 1
    from keel.data.sources import source_from_spec
    from keel.registry import Registry
    from keel.spec import load_spec

    spec = load_spec(project)
    latest = Registry.from_spec(spec).runs(limit=1)[0]
    assert latest.data_fingerprint == real(source_from_spec(spec))


def test_unknown_from_step_is_refused(project: Path) -> None:
    result = runner.invoke(app, ["pipeline", "run", "-s", str(project), "--from", "deploy"])
    assert result.exit_code == 2 and "--from must be one of validate, features, train, score, monitor" in result.output
