"""Model behaviour through `keel.train.train`: minimum functionality, invariance, direction, bad inputs.

Small tables with a known signal: fraud is likelier when ``tx_amount > 220`` and when ``signal`` (and, less,
``weak``) is high.
Models run single-threaded (``models.threads = 1``): on a shared 2-core machine OpenMP's spinning threads
make a multi-threaded LightGBM far slower on tables this small.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from keel.data.simulate import simulate, write_simulation
from keel.errors import LeakageError, TrainingError
from keel.evaluate.report import build_report, render_markdown
from keel.evaluate.split import RANDOM_SPLIT_WARNING
from keel.spec import Spec, load_spec, parse_spec
from keel.train import TrainOutcome, train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


def _table(n: int = 20_000, days: int = 60, seed: int = 0) -> pd.DataFrame:
    # Big and clear enough that the 14-day test window holds ~400 positives: with a few dozen, test AP moves by
    # several hundredths between two equally good models and no invariance bound below 0.05 would hold.
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.choice(days * 86_400, n, replace=False))  # unique times: a stable row order
    amount = np.round(rng.exponential(70, n), 2)
    signal, weak = rng.normal(size=(2, n))
    logit = -4.5 + 4.0 * (amount > 220) + 2.5 * signal + 1.0 * weak
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({
        "tx_id": np.arange(n), "ts": pd.Timestamp("2024-01-01") + pd.to_timedelta(seconds, unit="s"),
        "customer_id": rng.integers(0, 500, n), "tx_amount": amount, "signal": signal, "weak": weak, "y": y,
    })


def _spec(frame: pd.DataFrame, folder: Path, name: str, **sections: dict[str, Any]) -> Spec:
    """Write ``frame`` to Parquet and return a small spec for it; ``sections`` update the defaults."""
    path = folder / f"{name}.parquet"
    frame.to_parquet(path)
    content: dict[str, Any] = {
        "project": {"name": name, "state_dir": str(folder / ".keel")},
        "decision": {"question": "Should this transaction go to review?", "positive_class": "fraud",
                     "costs": {"false_negative": "tx_amount", "false_positive": 2.0}},
        "data": {"source": str(path), "id_column": "tx_id", "timestamp": "ts", "label": "y",
                 "label_delay": "3d", "entity_keys": ["customer_id"]},
        "split": {"train": "28d", "validation": "7d", "test": "14d"},
        "models": {"candidates": ["lightgbm"], "search_trials": 1, "bootstrap": 0, "threads": 1,
                   "rule": "tx_amount > 220"},
    }
    for key, value in sections.items():
        content[key] = {k: v for k, v in {**content.get(key, {}), **value}.items() if v is not None}
    return parse_spec(content, root=folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("behaviour")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _table()


@pytest.fixture(scope="module")
def base(table: pd.DataFrame, folder: Path) -> TrainOutcome:
    return train(_spec(table, folder, "base"))


def _ap(o: TrainOutcome) -> float:
    return float(o.best.test["average_precision"])


# ------------------------------------------------------------------------------------ functionality
def test_minimum_functionality_beats_the_prior_on_a_known_signal_table(base: TrainOutcome):
    prior = next(e for e in base.evaluated if e.name == "prior")
    assert base.dataset.feature_names == ["tx_amount", "signal", "weak"]  # roles and ids are not inputs
    assert prior.test["average_precision"] == pytest.approx(prior.test["prevalence"], rel=0.2)
    assert _ap(base) > 3 * prior.test["average_precision"]
    assert base.best.test["roc_auc"] > 0.85


# ----------------------------------------------------------------------------------------- invariance
def test_invariance_to_a_declared_id_column(table: pd.DataFrame, folder: Path, base: TrainOutcome):
    frame = table.assign(event_ref=np.random.default_rng(3).permutation(len(table)))
    o = train(_spec(frame, folder, "with_ref", data={"id_column": "event_ref"}))
    assert "event_ref" not in o.dataset.feature_names and "tx_id" in o.dataset.feature_names
    # tx_id now enters as an id-like input (monotone in time): it must not move the test AP.
    assert abs(_ap(o) - _ap(base)) < 0.02


def test_invariance_to_a_shuffled_irrelevant_column(table: pd.DataFrame, folder: Path, base: TrainOutcome):
    rng = np.random.default_rng(7)
    frame = table.assign(noise=rng.permutation(rng.normal(size=len(table))))
    o = train(_spec(frame, folder, "with_noise"))
    assert "noise" in o.dataset.feature_names
    assert abs(_ap(o) - _ap(base)) < 0.02


# ------------------------------------------------------------------------------------------ direction
def test_direction_a_larger_amount_scores_higher_in_the_flagship_model(tmp_path: Path):
    write_simulation(simulate(n_customers=400, n_terminals=800, n_days=75, seed=0), tmp_path / "data")
    shutil.copy(EXAMPLE, tmp_path / "keel.toml")
    spec = load_spec(tmp_path / "keel.toml")
    models = spec.models.model_copy(update={"candidates": ["lightgbm"], "search_trials": 1, "threads": 1,
                                            "bootstrap": 0})
    o = train(spec.model_copy(update={"models": models}))
    X = o.dataset.X[o.test_mask].to_numpy(dtype=np.float64)[:300]
    amount = o.dataset.feature_names.index("tx_amount")
    below, above = X.copy(), X.copy()
    below[:, amount], above[:, amount] = 100.0, 300.0  # the same events, either side of the 220 rule
    low, high = o.model.scores(below), o.model.scores(above)
    assert (high >= low).all()  # calibration is monotone: never lower
    assert np.median(high) > 2 * np.median(low)
    # Strictly higher for most events on the model's own scale (isotonic calibration maps nearby raw scores to one
    # plateau, so strictness is checked before it).
    assert (o.model.raw_scores(above) > o.model.raw_scores(below)).mean() > 0.9


# ----------------------------------------------------------------------------------------- bad inputs
def test_a_table_without_time_gets_a_random_split_and_a_loud_warning(table: pd.DataFrame, folder: Path):
    frame = table.drop(columns=["ts"])
    o = train(_spec(frame, folder, "no_time", data={"timestamp": None, "entity_keys": []},
                    split={"strategy": "random", "train": None, "validation": None, "test": None}))
    assert o.split_warning == RANDOM_SPLIT_WARNING
    assert o.windows["test"].start is None
    assert _ap(o) > 3 * o.best.test["prevalence"]
    text = render_markdown(build_report(o, figures=False))
    assert text.index("> **WARNING:** Random split") < text.index("## 1.")


def test_a_leaking_column_stops_training_unless_allowed(table: pd.DataFrame, folder: Path):
    frame = table.assign(chargeback=table["y"] * 1.0)
    with pytest.raises(LeakageError, match="chargeback"):
        train(_spec(frame, folder, "leak"))
    o = train(_spec(frame, folder, "leak_allowed", models={"allow_leakage": True}))
    assert any(f.column == "chargeback" and f.severity == "severe" for f in o.leakage)


def test_a_single_class_is_a_training_error(table: pd.DataFrame, folder: Path):
    with pytest.raises(TrainingError, match="single class"):
        train(_spec(table.assign(y=0), folder, "one_class"))


def test_nans_in_features_train_fine(table: pd.DataFrame, folder: Path):
    rng = np.random.default_rng(5)
    frame = table.copy()
    frame.loc[rng.random(len(frame)) < 0.1, "signal"] = np.nan
    frame.loc[rng.random(len(frame)) < 0.1, "tx_amount"] = np.nan
    frame.loc[rng.random(len(frame)) < 0.1, "weak"] = np.nan
    spec = _spec(frame, folder, "nans", decision={"costs": {"false_negative": 50.0, "false_positive": 2.0}},
                 data={"nullable": ["signal", "tx_amount", "weak"]})
    o = train(spec)
    assert np.isfinite(o.test_scores).all()
    assert _ap(o) > 3 * o.best.test["prevalence"]


def test_nan_in_a_cost_column_is_named(table: pd.DataFrame, folder: Path):
    frame = table.copy()
    frame.loc[::10, "tx_amount"] = np.nan
    with pytest.raises(TrainingError, match="false_negative cost"):
        train(_spec(frame, folder, "nan_cost", data={"nullable": ["tx_amount"]}))


def _twenty_rows(table: pd.DataFrame) -> pd.DataFrame:
    positives = np.flatnonzero(table["y"].to_numpy() == 1)
    rows = np.unique(np.r_[np.linspace(0, len(table) - 1, 14).astype(int), positives[:: len(positives) // 6][:6]])
    frame = table.iloc[rows].head(20)
    assert len(frame) == 20 and 0 < frame["y"].sum() < 20
    return frame


def test_twenty_rows_is_a_training_error_not_a_result(table: pd.DataFrame, folder: Path):
    with pytest.raises(TrainingError):
        train(_spec(_twenty_rows(table), folder, "twenty"))


def test_twenty_rows_says_too_few(table: pd.DataFrame, folder: Path):
    with pytest.raises(TrainingError, match=r"(?i)too few"):
        train(_spec(_twenty_rows(table), folder, "twenty_clear"))
