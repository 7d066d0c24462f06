"""Triggers over consecutive windows, delayed-label performance, operations, and run_monitor on a written log."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import MonitorError
from keel.evaluate import metrics as M
from keel.monitor.drift import drift_table
from keel.monitor.performance import estimate_performance, window_performance
from keel.monitor.profile import build_profile
from keel.monitor.triggers import evaluate_triggers, run_monitor
from keel.serve.predlog import PredictionLog
from keel.spec import Trigger, parse_spec

T0 = datetime(2018, 9, 1)


def _spec(tmp_path: Path, triggers: list[dict] | None = None, **monitoring) -> object:
    return parse_spec({
        "project": {"name": "fraud", "state_dir": str(tmp_path / "state")},
        "decision": {"question": "review?", "positive_class": "fraud",
                     "costs": {"false_negative": "tx_amount", "false_positive": 2.0, "true_positive": 2.0},
                     "capacity": {"max_positives": 50, "per": "1d"},
                     "precision_at_k": {"entity": "customer_id", "k": 5, "per": "1d"}},
        "data": {"source": "x.parquet", "timestamp": "tx_datetime", "label": "tx_fraud", "label_delay": "7d",
                 "id_column": "transaction_id"},
        "monitoring": {"window": "1d", "triggers": triggers if triggers is not None else [
            {"name": "amount drift", "metric": "psi", "feature": "tx_amount", "above": 0.2, "windows": 2},
            {"name": "fallbacks", "metric": "fallback_rate", "above": 0.05, "level": "warn"},
        ], **monitoring},
    }, root=tmp_path)


def _write_log(path: Path, *, days: int = 4, per_day: int = 600, shift_from: int | None = 2,
               label_days: int | None = None, seed: int = 0, fallback_rate: float = 0.0) -> None:
    rng = np.random.default_rng(seed)
    with PredictionLog(path, flush_rows=2000) as log:
        i = 0
        for d in range(days):
            factor = 2.0 if shift_from is not None and d >= shift_from else 1.0
            for s in np.sort(rng.uniform(0, 86400, per_day)):
                t = T0 + timedelta(days=d, seconds=float(s))
                amount = float(rng.gamma(2, 30) * factor)
                score = float(np.clip(rng.beta(1, 20), 0, 1))
                fb = bool(rng.random() < fallback_rate)
                log.append({"request_id": f"r{i}", "event_id": str(i), "event_time": t, "time": t,
                            "inputs": {"tx_amount": amount, "customer_id": int(rng.integers(100)),
                                       "transaction_id": i},
                            "features": {"tx_amount": amount, "f1": float(rng.normal())}, "score": score,
                            "decision": "review" if score > 0.15 else "approve", "fallback": fb,
                            "fallback_reason": "model_error" if fb else None, "latency_ms": float(rng.gamma(2, 2))})
                if label_days is not None and d < label_days:
                    log.add_labels([(str(i), float(rng.random() < score), t + timedelta(days=7))])
                i += 1


def _profile(seed: int = 1) -> object:
    rng = np.random.default_rng(seed)
    ref = pd.DataFrame({"tx_amount": rng.gamma(2, 30, 5000), "f1": rng.normal(size=5000)})
    return build_profile(ref, np.clip(rng.beta(1, 20, 5000), 0, 1), model="fraud", version=1,
                         reference_metrics={"average_precision": 0.3})


def _rows(values: list[float | None], metric: str = "fallback_rate") -> list[dict]:
    return [{"start": T0 + timedelta(days=i), metric: v} for i, v in enumerate(values)]


@pytest.mark.parametrize(("values", "windows", "fired", "streak"), [
    ([0.1, 0.3, 0.3], 2, True, 2),
    ([0.3, 0.3, 0.1], 2, False, 0),       # the latest window is back below
    ([0.3, 0.1, 0.3], 2, False, 1),       # not consecutive
    ([0.3, None, 0.3], 2, True, 2),       # windows without a value (labels not in yet) are skipped
    ([0.3], 1, True, 1),
    ([0.2], 1, False, 0),                 # strictly above
])
def test_consecutive_windows(values, windows, fired, streak) -> None:
    t = Trigger(name="fb", metric="fallback_rate", above=0.2, windows=windows, level="act")
    [f] = evaluate_triggers([t], _rows(values))
    assert (f.fired, f.streak, f.level) == (fired, streak, "act" if fired else "ok")
    assert ("> 0.2" in f.reason) == fired


def test_trigger_on_any_feature_names_the_worst_one_and_skew_uses_its_rate() -> None:
    prof = _profile()
    rng = np.random.default_rng(5)
    calm = drift_table(prof, pd.DataFrame({"tx_amount": rng.gamma(2, 30, 3000), "f1": rng.normal(size=3000)}))
    moved = drift_table(prof, pd.DataFrame({"tx_amount": rng.gamma(2, 30, 3000), "f1": rng.normal(1, 1, 3000)}))

    class W:
        def __init__(self, cols):
            self.columns = cols
    rows = [{"start": T0, "drift": W(calm)}, {"start": T0 + timedelta(days=1), "drift": W(moved)}]
    any_psi, skew = evaluate_triggers(
        [Trigger(name="any", metric="psi", feature="*", above=0.2),
         Trigger(name="skew", metric="skew_rate", above=0.0, level="act")], rows, skew_rate=0.02)
    assert any_psi.fired and any_psi.values[-1]["feature"] == "f1"
    assert skew.fired and skew.values[-1]["value"] == 0.02


def test_window_performance_matches_metrics_and_estimates_from_scores() -> None:
    rng = np.random.default_rng(6)
    n = 40_000
    s = rng.beta(1, 10, n)
    y = (rng.random(n) < s).astype(int)
    act = s > 0.2
    amount = rng.gamma(2, 30, n)
    costs = M.make_row_costs(n, false_negative=amount, false_positive=2.0, true_positive=2.0)
    out = window_performance(y, s, act, costs=costs)
    assert out["average_precision"] == pytest.approx(M.average_precision(y, s))
    assert out["expected_cost"] == pytest.approx(M.expected_cost(y, s, 0.2, costs))
    assert out["precision"] == pytest.approx(y[act].mean())
    est = estimate_performance(s, act, costs)
    assert est["expected_precision"] == pytest.approx(s[act].mean())
    # Calibrated scores: the estimate is close to the truth (labels drawn from the scores).
    assert est["expected_cost"] == pytest.approx(out["expected_cost"], rel=0.05)
    assert est["expected_positives"] == pytest.approx(s.sum())


def test_run_monitor_flags_drift_and_reports_label_completeness(tmp_path: Path) -> None:
    log = tmp_path / "predictions.sqlite"
    _write_log(log, shift_from=2, label_days=2, fallback_rate=0.1)
    spec = _spec(tmp_path)
    result = run_monitor(spec, log_path=log, profile=_profile(), out_dir=tmp_path / "out", skew=False)
    assert result.level == "act" and result.exit_code == 2
    fired = {f.name for f in result.fired}
    assert {"amount drift", "fallbacks"} <= fired
    assert [round(w.columns["tx_amount"].psi, 1) > 0.2 for w in result.drift] == [False, False, True, True]
    # Labels known for days 0-1 (at = event + 7d); as_of = newest label time, so day 0 is complete.
    perf = result.performance
    assert [p.labelled > 0 for p in perf] == [True, True, False, False]
    assert perf[0].complete and not perf[-1].complete and perf[-1].is_estimate
    assert perf[0].metrics["average_precision"] is not None
    assert perf[-1].metrics["average_precision"] is None and perf[-1].estimate["expected_precision"] is not None
    ops = result.operations
    assert sum(o.requests for o in ops) == 4 * 600 == result.rows
    assert all(o.error_rate == pytest.approx(o.fallback_rate) for o in ops)
    assert ops[0].capacity_per_day == 50
    data = json.loads((tmp_path / "out" / "monitor.json").read_text())
    assert data["level"] == "act" and data["exit_code"] == 2
    page = (tmp_path / "out" / "monitor.html").read_text()
    assert "amount drift" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_run_monitor_is_ok_without_drift_and_honours_as_of(tmp_path: Path) -> None:
    log = tmp_path / "predictions.sqlite"
    _write_log(log, shift_from=None, days=3)
    spec = _spec(tmp_path)
    result = run_monitor(spec, log_path=log, profile=_profile(), skew=False)
    assert result.level == "ok" and result.exit_code == 0 and not result.fired
    assert result.rows == 3 * 600  # as of the newest event: that event counts too
    early = run_monitor(spec, log_path=log, profile=_profile(), skew=False, as_of=T0 + timedelta(days=1))
    assert len(early.drift) == 1 and early.rows == 600


def test_warn_level_and_missing_log(tmp_path: Path) -> None:
    log = tmp_path / "predictions.sqlite"
    _write_log(log, shift_from=0, days=1)
    spec = _spec(tmp_path, triggers=[])  # no triggers: strong drift is only a warning
    result = run_monitor(spec, log_path=log, profile=_profile(), skew=False)
    assert result.level == "warn" and result.exit_code == 1
    assert any(f.feature == "tx_amount" for f in result.fired)
    with pytest.raises(MonitorError, match="No prediction log"):
        run_monitor(spec, log_path=tmp_path / "missing.sqlite", profile=_profile())


def test_calendar_features_do_not_raise_implicit_drift_warnings_in_short_windows() -> None:
    from pathlib import Path

    from keel.monitor.triggers import calendar_features
    from keel.spec import load_spec

    flagship = load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")
    assert calendar_features(flagship) == {"tx_during_weekend"}  # daily windows: weekend share is the calendar
    weekly = flagship.model_copy(update={"monitoring": flagship.monitoring.model_copy(
        update={"window": __import__("datetime").timedelta(days=7)})})
    assert calendar_features(weekly) == set()


def test_implicit_psi_warnings_skip_only_the_named_calendar_features() -> None:
    from datetime import datetime
    from types import SimpleNamespace

    from keel.monitor.triggers import implicit_drift_findings

    window = SimpleNamespace(start=datetime(2018, 9, 1), columns={
        "tx_during_weekend": SimpleNamespace(psi=2.3), "tx_amount": SimpleNamespace(psi=0.5),
        "score": SimpleNamespace(psi=0.05)})
    names = {f.feature for f in implicit_drift_findings([window], 0.2, skip={"tx_during_weekend"})}
    assert names == {"tx_amount"}
    assert {f.feature for f in implicit_drift_findings([window], 0.2)} == {"tx_amount", "tx_during_weekend"}


@pytest.mark.parametrize("raw", [False, True])
def test_one_scan_performance_equals_each_window_computed_on_its_own(tmp_path: Path, raw: bool) -> None:
    from keel.serve.predlog import read_labels, read_predictions

    log = tmp_path / "predictions.sqlite"
    _write_log(log, days=4, label_days=3, per_day=300)
    spec = _spec(tmp_path)
    if raw:  # the cost column is also a logged raw feature: read from the feature column, not the inputs' JSON
        spec = spec.model_copy(update={"features": spec.features.model_copy(update={"raw": ["tx_amount"]})})
        with contextlib.closing(sqlite3.connect(log)) as db, db:  # so the inputs can no longer provide it
            db.execute("update predictions set inputs = json_remove(inputs, '$.tx_amount')")
    as_of = T0 + timedelta(days=9, hours=12)  # day 0-1 labels known and complete, day 2's partly known
    result = run_monitor(spec, log_path=log, profile=_profile(), skew=False, as_of=as_of, batch_rows=250)
    frame = read_predictions(log).merge(read_labels(log)[["event_id", "label", "at"]], on="event_id", how="left")
    assert [p.labelled > 0 for p in result.performance] == [True, True, True, False]
    for p in result.performance:
        f = frame[(frame["event_time"] >= p.start) & (frame["event_time"] < p.end)].reset_index(drop=True)
        inputs = pd.DataFrame(f["inputs"].tolist())
        inputs["tx_amount"] = f["tx_amount"].to_numpy() if raw else inputs["tx_amount"]
        known = (f["label"].notna() & (f["at"].isna() | (f["at"] <= as_of))).to_numpy()
        y = (f["label"].to_numpy() == 1.0).astype(float)
        s, acted = f["score"].to_numpy(), (f["decision"] == "review").to_numpy()
        costs = M.row_costs(spec.decision.costs, inputs, n=len(f))
        want = window_performance(y[known], s[known], acted[known], costs=costs.take(known),
                                  entity=inputs["customer_id"].astype(str).to_numpy()[known],
                                  times=f["event_time"].to_numpy()[known], k=5, per=timedelta(days=1))
        assert p.rows == len(f) and p.labelled == int(known.sum()) and p.positives == int(y[known].sum())
        assert p.label_coverage == pytest.approx(known.mean())
        for name, value in want.items():
            assert (p.metrics[name] is None) == (value is None), name
            if value is not None:
                assert p.metrics[name] == pytest.approx(value, rel=1e-12), name
        for name, value in estimate_performance(s, acted, costs).items():
            assert p.estimate[name] == pytest.approx(value, rel=1e-12), name
    assert result.performance[1].complete and not result.performance[2].complete
    assert 0 < result.performance[2].label_coverage < 1


def test_card_precision_periods_equal_the_metric_modules_period_index() -> None:
    from keel.errors import TrainingError
    from keel.monitor.performance import _periods

    rng = np.random.default_rng(5)
    t = (np.datetime64("2018-09-01T07:00") + rng.integers(0, 20 * 86_400_000_000, 5000).astype("timedelta64[us]"))
    for per in (timedelta(days=1), timedelta(hours=6), timedelta(days=7)):
        assert np.array_equal(_periods(t, per), M.period_index(t, per))
    with pytest.raises(TrainingError, match="missing values"):
        _periods(np.array(["2018-09-01", "NaT"], dtype="datetime64[ns]"), timedelta(days=1))


def test_integer_entities_give_the_card_precision_of_their_text() -> None:
    """Integer entity ids are grouped as codes in their text order: the same metric, ties broken the same way."""
    from keel.monitor.performance import _entities, _entity_ids

    rng = np.random.default_rng(7)
    n = 4000
    ids = rng.integers(0, 300, n)
    scores = rng.integers(0, 3, n) / 2  # ties at the top-k boundary: broken by entity order (int order differs)
    y = (rng.random(n) < 0.1).astype(int)
    period = rng.integers(0, 5, n)
    parts = [_entity_ids(ids[:1500].astype(object)), _entity_ids(ids[1500:])]
    assert all(p.dtype == np.int64 for p in parts)
    fast = M.card_precision_at_k(scores, y, entity=_entities(parts), period=period, k=20)
    text = M.card_precision_at_k(scores, y, entity=ids.astype(str), period=period, k=20)
    assert fast.mean == text.mean and np.array_equal(fast.per_period, text.per_period)
    mixed = _entities([_entity_ids(np.array([5, 6], dtype=object)), _entity_ids(np.array(["5", "x"], dtype=object))])
    assert mixed.tolist() == ["5", "6", "5", "x"]
