"""Tracking and registry: what a run records, versions, loading with integrity checks, configuration."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from test_registry_support import (
    lgb_model,
    log,
    make_spec,
    version_with,
)

from keel.artifact import DecisionModel
from keel.errors import IntegrityError, RegistryError
from keel.registry import CHAMPION, Registry, resolve_tracking_uri
from keel.spec import Spec


# ------------------------------------------------------------------------------------------ tracking
def test_log_run_records_spec_code_data_windows_params_metrics_and_environment(
    registry: Registry, spec: Spec, booster, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    report.write_text("<h1>report</h1>")
    run_id = log(registry, spec, lgb_model(booster), 0.61, artifacts={"report.html": report},
                 tags={"trigger": "manual"})
    details = registry.run(run_id)

    assert details.metrics["average_precision"] == pytest.approx(0.61)
    assert details.metrics["baseline.rule.average_precision"] == pytest.approx(0.1)
    assert details.params["lightgbm.num_leaves"] == "5"
    assert details.params["window.test.start"] == "2024-01-29" and details.params["window.train.end"] == "2024-01-08"
    assert details.params["data.fingerprint"] == "fp-0.61"
    tags = details.tags
    assert tags["keel.spec_hash"] == spec.spec_hash()
    assert tags["keel.data_source"] == "data/tx.parquet"
    assert tags["keel.owner"] == "risk team" and tags["keel.deployment"] == "batch"
    assert tags["keel.git_commit"] == "unknown" and tags["keel.git_dirty"] == "unknown"  # tmp_path: no git
    assert tags["trigger"] == "manual"
    for package in ("keel", "numpy", "pandas", "scikit-learn", "lightgbm", "mlflow", "duckdb"):
        assert tags[f"keel.version.{package}"] not in ("", "not installed")
    assert {"model/manifest.json", "model/model.txt", "model/pipeline.json", "spec/spec.json", "spec/keel.toml",
            "spec/features.json", "reports/report.html", "keel/inputs.json"} <= set(details.artifacts)
    assert details.summary.status == "FINISHED" and details.summary.headline_value == pytest.approx(0.61)


def test_recorded_inputs_rebuild_the_same_spec(registry: Registry, spec: Spec, booster) -> None:
    run_id = log(registry, spec, lgb_model(booster), 0.5)
    recorded = registry.recorded_inputs(run_id)
    assert recorded.spec_hash == spec.spec_hash()
    assert recorded.spec().spec_hash() == spec.spec_hash()
    assert recorded.spec().resolve(recorded.spec().data.source) == spec.resolve(spec.data.source)
    assert recorded.data_fingerprint == "fp-0.5" and recorded.data_source == "data/tx.parquet"
    assert recorded.windows["validation"] == ["2024-01-15", "2024-01-22"]
    assert recorded.metrics["average_precision"] == pytest.approx(0.5)
    assert recorded.params["lightgbm.num_leaves"] == 5


def test_git_commit_and_dirty_flag_are_recorded(registry: Registry, spec: Spec, booster) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(spec.root), "-c", "user.name=t", "-c", "user.email=t@e", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "keel.toml")
    git("commit", "-q", "-m", "spec")
    commit = git("rev-parse", "HEAD")
    clean = registry.run(log(registry, spec, lgb_model(booster), 0.5)).tags
    assert (clean["keel.git_commit"], clean["keel.git_dirty"]) == (commit, "false")
    with open(spec.root / "keel.toml", "a") as fh:
        fh.write("# edited\n")
    dirty = registry.run(log(registry, spec, lgb_model(booster), 0.5)).tags
    assert (dirty["keel.git_commit"], dirty["keel.git_dirty"]) == (commit, "true")


def test_runs_list_newest_first_and_unknown_run_is_a_clear_error(registry: Registry, spec: Spec, booster) -> None:
    assert registry.runs() == []
    first = log(registry, spec, lgb_model(booster), 0.4)
    second = log(registry, spec, lgb_model(booster), 0.5)
    assert [r.run_id for r in registry.runs()] == [second, first]
    with pytest.raises(RegistryError, match="No run 'deadbeef' in the tracking store"):
        registry.run("deadbeef")


# ------------------------------------------------------------------------------------------ registry
def test_register_sets_challenger_and_list_shows_versions(registry: Registry, spec: Spec, booster) -> None:
    v1 = version_with(registry, spec, booster, 0.5)
    v2 = version_with(registry, spec, booster, 0.6)
    assert (v1, v2) == (1, 2)
    listed = registry.list_versions()
    assert [(v.version, v.aliases) for v in listed] == [(1, []), (2, ["challenger"])]
    assert [v.headline_value for v in listed] == pytest.approx([0.5, 0.6])
    assert listed[1].data_fingerprint == "fp-0.6" and listed[1].data_source == "data/tx.parquet"
    assert registry.resolve("challenger") == 2 and registry.resolve(CHAMPION) is None


def test_registering_a_run_twice_is_refused(registry: Registry, spec: Spec, booster) -> None:
    run_id = log(registry, spec, lgb_model(booster), 0.5)
    registry.register(run_id)
    with pytest.raises(RegistryError, match="already registered as version 1"):
        registry.register(run_id)


def test_load_round_trips_lightgbm_and_skops_models(registry: Registry, spec: Spec, booster, data) -> None:
    x, y = data
    version = version_with(registry, spec, booster, 0.5)
    registry.promote(version, actor="ana", reason="first model")
    model, info = registry.load()
    assert info.version == 1 and info.aliases == ["challenger", "champion"]
    np.testing.assert_array_equal(model.scores(x), lgb_model(booster).scores(x))

    logistic = DecisionModel(kind="logistic_regression", feature_names=["a", "b", "c"],
                             estimator=LogisticRegression().fit(x, y), threshold=0.3)
    skops_version = registry.register(log(registry, spec, logistic, 0.7)).version
    loaded, _ = registry.load(skops_version)
    np.testing.assert_array_equal(loaded.scores(x), logistic.scores(x))
    assert loaded.threshold == 0.3


def test_tampered_artifact_is_refused(registry: Registry, spec: Spec, booster) -> None:
    version = version_with(registry, spec, booster, 0.5)
    info = registry.version(version)
    stored = Path(info.source.removeprefix("file://")) / "model.txt"
    stored.write_text(stored.read_text().replace("leaf_value=", "leaf_valuX=", 1))  # same size
    with pytest.raises(IntegrityError, match=r"model\.txt .* does not match its SHA-256"):
        registry.load(version)


def test_missing_version_or_alias_names_what_exists(registry: Registry, spec: Spec, booster) -> None:
    with pytest.raises(RegistryError, match="No model is registered under 'fraud' yet"):
        registry.load()
    version_with(registry, spec, booster, 0.5)
    with pytest.raises(RegistryError, match=r"no version 7 of 'fraud'\. Versions of 'fraud': 1 \(aliases: challenger → 1\)"):
        registry.load(7)
    with pytest.raises(RegistryError, match="No version of 'fraud' has the alias 'champion'"):
        registry.load("champion")


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("explicit", "env", "spec_uri", "expected"),
    [
        ("sqlite:///a.db", "sqlite:///b.db", "sqlite:///c.db", "sqlite:///a.db"),
        (None, "sqlite:///b.db", "sqlite:///c.db", "sqlite:///b.db"),
        (None, None, "sqlite:///c.db", "sqlite:///c.db"),
        (None, None, None, "default"),
    ],
)
def test_tracking_uri_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, explicit, env, spec_uri, expected
) -> None:
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    state = tmp_path / ".keel"
    default = f"sqlite:///{(state / 'mlflow.db').resolve().as_posix()}"
    assert resolve_tracking_uri(explicit, spec_uri, state) == (default if expected == "default" else expected)


def test_registry_uses_spec_uri_env_and_argument_in_that_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow_template: Path, booster
) -> None:
    other = tmp_path / "shared-store"
    other.mkdir()
    shutil.copy(mlflow_template, other / "mlflow.db")
    spec_uri = f"sqlite:///{other / 'mlflow.db'}"
    spec = make_spec(tmp_path / "p", mlflow_template, extra_project=f'tracking_uri = "{spec_uri}"')
    assert Registry(spec).tracking_uri == spec_uri
    assert Registry(spec, tracking_uri="sqlite:///x.db").tracking_uri == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert Registry(spec).tracking_uri == "sqlite:///env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # The run lands in the spec's store, not in the default one under state_dir.
    registry = Registry(spec)
    log(registry, spec, lgb_model(booster), 0.5)
    assert len(registry.runs()) == 1
    assert Registry(spec, tracking_uri=f"sqlite:///{spec.state_dir / 'mlflow.db'}").runs() == []


def test_ui_command_points_at_the_local_store(registry: Registry, spec: Spec) -> None:
    argv = registry.ui_command(port=5055)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{(spec.state_dir / 'mlflow.db').resolve()}"
    assert argv[argv.index("--default-artifact-root") + 1] == (spec.state_dir / "mlartifacts").resolve().as_uri()
    assert argv[-2:] == ["--port", "5055"]


def test_state_folder_registry_needs_a_model_name(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="needs model_name"):
        Registry(tmp_path)


