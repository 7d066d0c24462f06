"""Monitoring and retraining end to end on a simulated shift: train, serve (log), monitor, retrain, promote.

The simulated world inflates amounts and starts card testing on day 50. A model trained before the shift is
served (its prediction log written directly, features from the offline pipeline), ``run_monitor`` must flag the
drift with exit code 2 and see no training–serving skew, and ``retrain`` must train a challenger on the shifted
data, compare both on the same most recent labelled rows, and promote it only if it wins.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.data.simulate import Shift, simulate
from keel.monitor import retrain, run_monitor
from keel.monitor.profile import profile_path
from keel.registry import Registry
from keel.serve.predlog import PredictionLog
from keel.spec import parse_spec
from keel.train import record, train

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("monitor-e2e")
    sim = simulate(n_customers=600, n_terminals=1200, n_days=120, seed=3,
                   shift=Shift(start_day=50, amount_factor=1.6, card_testing_cards_per_day=8))
    (root / "data").mkdir()
    sim.transactions.drop(columns=["tx_fraud_scenario"]).to_parquet(root / "data" / "transactions.parquet")
    content = tomllib.loads(EXAMPLE.read_text())
    content["data"]["exclude"] = []
    content["models"].update(candidates=["lightgbm"], search_trials=1, search_budget_seconds=10, bootstrap=0,
                             calibration=["sigmoid"])
    content["split"]["test_end"] = "2018-05-10"
    content["monitoring"].update(skew_sample=200, retrain_window="14d")
    spec = parse_spec(content, root=root)
    outcome = train(spec)
    registry = Registry.from_spec(spec)
    version = record(outcome, registry).version
    if registry.resolve("champion") is None:
        registry.promote(version, actor="test", reason="first model for the e2e test", force=True)
    # Serve days 50..95 of the shifted world with the champion; labels arrive 7 days after each event.
    frame, model = outcome.dataset.frame, outcome.model
    start = sim.start_date + pd.Timedelta(days=50)
    served = frame[(frame.tx_datetime >= start) & (frame.tx_datetime < start + pd.Timedelta(days=45))]
    scores = model.scores(served[model.feature_names])
    decisions = model.decide(scores)
    feats = served[model.feature_names].to_dict("records")
    cols = ["transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount"]
    events = served[cols].to_dict("records")
    with PredictionLog(spec.store_path(spec.serving.prediction_log), flush_rows=10_000) as log:
        for i, ev in enumerate(events):
            log.append({"request_id": f"r{i}", "event_id": str(ev["transaction_id"]), "event_time": ev["tx_datetime"],
                        "time": ev["tx_datetime"], "inputs": ev, "features": feats[i], "score": float(scores[i]),
                        "decision": decisions[i], "model_version": version, "latency_ms": 3.0})
        log.add_labels([(str(t), float(y), at + pd.Timedelta(days=7))
                        for t, y, at in zip(served.transaction_id, served.tx_fraud, served.tx_datetime, strict=True)])
    return spec, registry, version, root


def test_monitor_flags_the_shift_without_skew(project) -> None:
    spec, registry, version, root = project
    result = run_monitor(spec, out_dir=root / "monitor", registry=registry)
    assert result.version == version
    assert result.exit_code == 2
    assert "amount drift" in {f.name for f in result.fired}
    assert result.skew is not None and result.skew.compared == 200 and result.skew.max_rate == 0.0
    # The profile was computed once and is reused (same file, untouched by a second run).
    path = profile_path(spec.state_dir, spec.project.name, version)
    stamp = path.stat().st_mtime_ns
    again = run_monitor(spec, registry=registry, skew=False)
    assert path.stat().st_mtime_ns == stamp and again.level == result.level
    complete = [p for p in result.performance if p.complete]
    assert complete and all(p.label_coverage == 1.0 for p in complete)
    assert not result.performance[-1].complete
    data = json.loads((root / "monitor" / "monitor.json").read_text())
    assert data["exit_code"] == 2 and data["skew"]["max_rate"] == 0.0


def test_retrain_plans_trains_compares_and_decides(project) -> None:
    spec, registry, version, _ = project
    plan = retrain(spec, dry_run=True)
    assert plan.dry_run and plan.challenger_version is None
    assert plan.latest_labelled == plan.as_of - spec.data.label_delay
    assert all(w["rows"] > 0 for w in plan.windows.values())
    assert registry.resolve("champion") == version  # a dry run changes nothing
    result = retrain(spec, registry=registry)
    assert result.challenger_version == version + 1
    assert result.evaluation_rows > 0
    assert result.champion_value is not None and result.challenger_value is not None
    wins = result.challenger_value > result.champion_value + spec.monitoring.promote_margin
    assert result.promoted == wins
    assert registry.resolve("champion") == (result.challenger_version if wins else version)
    assert ("promoted" if wins else "kept champion") in result.decision
    assert profile_path(spec.state_dir, spec.project.name, result.challenger_version).is_file()
    assert np.isfinite(result.challenger_value)
