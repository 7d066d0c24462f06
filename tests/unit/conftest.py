"""Fixtures of the registry test modules (test_registry.py, test_registry_lifecycle.py)."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from test_registry_support import make_spec, small_booster, template_db, train_data

from keel.registry import Registry
from keel.spec import Spec


@pytest.fixture(scope="session")
def mlflow_template(pytestconfig: pytest.Config) -> Path:
    return template_db(pytestconfig)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture
def spec(tmp_path: Path, mlflow_template: Path) -> Spec:
    return make_spec(tmp_path / "project", mlflow_template)


@pytest.fixture
def registry(spec: Spec) -> Registry:
    return Registry(spec)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return train_data()


@pytest.fixture(scope="module")
def booster(data) -> lgb.Booster:
    return small_booster(*data)
