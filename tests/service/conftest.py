"""Fixtures for the serving tests: a small simulated run, tiny LightGBM DecisionModels, and spec builders."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from keel.artifact import DecisionModel
from keel.data.simulate import simulate
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.offline import compute_features
from keel.spec import Spec, parse_spec

FLAGSHIP = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


def flagship_content() -> dict[str, Any]:
    return tomllib.loads(FLAGSHIP.read_text())


class FixedProvider:
    """One model, always: a provider for tests that need a model but no registry."""

    alias = "fixed"

    def __init__(self, model: DecisionModel) -> None:
        self.model = model

    def resolve(self) -> str:
        return "fixed-1"

    def load(self, version_label: str) -> DecisionModel:
        return self.model

    def current(self) -> tuple[str, DecisionModel]:
        return "fixed-1", self.model

    def describe(self, version_label: str) -> dict[str, Any]:
        return {}


def make_spec(root: Path, *, serving: dict[str, Any] | None = None, features: dict[str, Any] | None = None,
              data: dict[str, Any] | None = None) -> Spec:
    """The flagship spec with state under ``root`` and section overrides (polling off unless asked)."""
    content = copy.deepcopy(flagship_content())
    content["project"]["state_dir"] = str(root / "state")
    content["serving"] = {"reload_interval_seconds": 0, **content.get("serving", {}), **(serving or {})}
    content["features"].update(features or {})
    content["data"].update(data or {})
    return parse_spec(content, root=root)


@pytest.fixture(scope="session")
def flagship_spec(tmp_path_factory: pytest.TempPathFactory) -> Spec:
    return make_spec(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="session")
def transactions() -> pd.DataFrame:
    return simulate(n_customers=300, n_terminals=600, n_days=40, seed=3).transactions


@pytest.fixture(scope="session")
def feature_table(flagship_spec: Spec, transactions: pd.DataFrame) -> pd.DataFrame:
    defs = resolve_definitions(flagship_spec.features, flagship_spec.data)
    return compute_features(transactions, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id")


def train_model(table: pd.DataFrame, labels: pd.Series, *, rounds: int = 20, threshold: float = 0.3,
                abstain_band: tuple[float, float] | None = None, seed: int = 1) -> DecisionModel:
    names = [c for c in table.columns if c not in ("transaction_id", "customer_id", "terminal_id", "tx_datetime")]
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15, "seed": seed, "num_threads": 1},
                        lgb.Dataset(table[names].to_numpy(), labels.to_numpy()), num_boost_round=rounds)
    return DecisionModel(kind="lightgbm", feature_names=names, estimator=booster, threshold=threshold,
                         abstain_band=abstain_band, threads=1,
                         metadata={"data_source": "simulate(300, 600, 40)", "data_fingerprint": "sim-3",
                                   "test_metrics": {"average_precision": 0.61}, "spec_hash": "test"})


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, feature_table: pd.DataFrame,
               transactions: pd.DataFrame, flagship_spec: Spec) -> dict[str, Path]:
    """Artifact folders: 'a' and 'b' (two versions), 'abstain' (always abstains)."""
    assert list(feature_table.columns[4:]) == feature_names(
        resolve_definitions(flagship_spec.features, flagship_spec.data))
    base = tmp_path_factory.mktemp("models")
    y = transactions["tx_fraud"]
    out = {
        "a": train_model(feature_table, y, rounds=20, seed=1).save(base / "a"),
        "b": train_model(feature_table, y, rounds=35, threshold=0.4, seed=2).save(base / "b"),
        "abstain": train_model(feature_table, y, rounds=5, abstain_band=(0.0, 1.0)).save(base / "abstain"),
    }
    return out


def to_event(row: pd.Series | dict[str, Any]) -> dict[str, Any]:
    """A transaction row as the JSON body /v1/predict expects."""
    r = dict(row)
    return {"transaction_id": int(r["transaction_id"]), "tx_datetime": pd.Timestamp(r["tx_datetime"]).isoformat(),
            "customer_id": int(r["customer_id"]), "terminal_id": int(r["terminal_id"]),
            "tx_amount": float(r["tx_amount"])}


@pytest.fixture
def event(transactions: pd.DataFrame) -> dict[str, Any]:
    return to_event(transactions.iloc[100])


@pytest.fixture
def events(transactions: pd.DataFrame) -> Callable[[int, int], list[dict[str, Any]]]:
    def take(start: int, n: int) -> list[dict[str, Any]]:
        return [to_event(r) for _, r in transactions.iloc[start:start + n].iterrows()]
    return take


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = "s3cret-test-key-" + str(np.random.default_rng().integers(1 << 30))
    monkeypatch.setenv("KEEL_API_KEY", key)
    return key
