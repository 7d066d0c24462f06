"""Helpers shared by the registry test files (no tests here).

MLflow's SQLite store takes seconds to create (schema migrations), so one migrated empty database is built
once per MLflow version in pytest's cache and copied into each test's state folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from keel.artifact import DecisionModel
from keel.registry import Registry
from keel.spec import Spec, load_spec

SPEC_TOML = """
[project]
name = "{name}"
owner = "risk team"
deployment = "batch"
{extra_project}

[decision]
question = "Review this transaction?"
positive_class = "fraud"
headline_metric = "{metric}"

[data]
source = "data/tx.parquet"
label = "y"
timestamp = "t"

[features]
raw = ["a", "b", "c"]

[monitoring]
promote_margin = {margin}
"""


def template_db(config: pytest.Config) -> Path:
    """A migrated, empty MLflow SQLite database, cached across sessions per MLflow version."""
    import mlflow

    folder = config.cache.mkdir(f"keel-mlflow-template-{mlflow.__version__}")
    db = folder / "mlflow.db"
    if not db.exists():
        build = folder / "build"
        shutil.rmtree(build, ignore_errors=True)
        Registry(build, model_name="template", tracking_uri=f"sqlite:///{build / 'mlflow.db'}").runs()
        (build / "mlflow.db").replace(db)
        shutil.rmtree(build, ignore_errors=True)
    return db


def train_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0.8).astype(int)
    return x, y


def small_booster(x: np.ndarray, y: np.ndarray) -> lgb.Booster:
    return lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 5, "seed": 1}, lgb.Dataset(x, y), 8)


def make_spec(root: Path, template: Path, *, name: str = "fraud", metric: str = "average_precision",
              margin: float = 0.0, extra_project: str = "") -> Spec:
    root.mkdir(parents=True, exist_ok=True)
    (root / "keel.toml").write_text(
        SPEC_TOML.format(name=name, metric=metric, margin=margin, extra_project=extra_project)
    )
    spec = load_spec(root / "keel.toml")
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    if not (spec.state_dir / "mlflow.db").exists():
        shutil.copy(template, spec.state_dir / "mlflow.db")
    return spec


def lgb_model(booster: lgb.Booster, threshold: float = 0.5) -> DecisionModel:
    return DecisionModel(kind="lightgbm", feature_names=["a", "b", "c"], estimator=booster, threshold=threshold)


def log(registry: Registry, spec: Spec, model: DecisionModel, value: float, **extra) -> str:
    info = registry.log_run(
        spec=spec,
        model=model,
        metrics={spec.decision.headline_metric: value, "baseline": {"rule": {spec.decision.headline_metric: 0.1}}},
        params={"lightgbm": {"num_leaves": 5}, "seed": 1},
        data_source="data/tx.parquet",
        data_fingerprint=f"fp-{value}",
        windows={"train": ("2024-01-01", "2024-01-08"), "validation": ("2024-01-15", "2024-01-22"),
                 "test": ("2024-01-29", "2024-02-05")},
        **extra,
    )
    return info.run_id


def version_with(registry: Registry, spec: Spec, booster: lgb.Booster, value: float) -> int:
    return registry.register(log(registry, spec, lgb_model(booster), value)).version
