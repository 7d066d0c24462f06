"""Pure parts of batch scoring: the plan (schema checks, validation rules), the summary statistics, the output."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from keel.artifact import DecisionModel
from keel.errors import DataError, FeatureError, ScoringError
from keel.features import feature_names, resolve_definitions
from keel.score import ScoreSummary, _ScoreStats, output_table, plan_scoring
from keel.spec import load_spec, parse_spec

SPEC = load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")
NAMES = feature_names(resolve_definitions(SPEC.features, SPEC.data))
SCHEMA = {
    "transaction_id": "BIGINT",
    "tx_datetime": "TIMESTAMP_NS",
    "customer_id": "BIGINT",
    "terminal_id": "BIGINT",
    "tx_amount": "DOUBLE",
    "tx_fraud": "TINYINT",
}
MODEL = DecisionModel(kind="lightgbm", feature_names=NAMES, estimator=None)


def test_plan_reads_the_keys_and_feature_columns_and_the_label_when_present() -> None:
    plan = plan_scoring(SPEC, SCHEMA, MODEL, source="t.parquet", now=datetime(2030, 1, 1))
    assert plan.key_columns == ["transaction_id", "tx_datetime", "customer_id", "terminal_id"]
    assert plan.columns == [*plan.key_columns, "tx_amount", "tx_fraud"]
    assert plan.label == "tx_fraud" and plan.label_in_input
    assert plan.horizon_ns == 37 * 86_400 * 10**9  # 30d window + 7d delay
    unlabelled = plan_scoring(SPEC, {k: v for k, v in SCHEMA.items() if k != "tx_fraud"}, MODEL, source="t")
    assert not unlabelled.label_in_input and "tx_fraud" not in unlabelled.columns
    # ranges on a column the input lacks (the label of new events) are skipped, not an error
    assert [r.column for r in unlabelled.rules if r.kind in ("below", "above")] == ["tx_amount"]


def test_rules_cover_null_keys_future_times_ranges_and_text_times() -> None:
    plan = plan_scoring(SPEC, SCHEMA | {"tx_datetime": "VARCHAR"}, MODEL, source="t.csv", now=datetime(2030, 1, 1))
    assert [(r.kind, r.column) for r in plan.rules] == [
        ("null", "transaction_id"), ("null", "customer_id"), ("null", "terminal_id"), ("null", "tx_datetime"),
        ("unparseable", "tx_datetime"), ("future", "tx_datetime"), ("below", "tx_amount"),
        ("below", "tx_fraud"), ("above", "tx_fraud"),
    ]
    assert plan.future_limit == datetime(2030, 1, 1, 0, 5)
    assert plan.timestamp_sql == 'TRY_CAST("tx_datetime" AS TIMESTAMP)'


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("terminal_id", r"Column 'terminal_id' needed to score is missing from t\.parquet, which has: "),
        ("tx_amount", r"Column 'tx_amount' needed to score is missing"),
        ("tx_datetime", r"Column 'tx_datetime' needed to score is missing"),
    ],
)
def test_a_missing_column_is_named(drop: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        plan_scoring(SPEC, {k: v for k, v in SCHEMA.items() if k != drop}, MODEL, source="t.parquet")


def test_specs_and_schemas_that_cannot_score_are_refused() -> None:
    content = SPEC.content()
    content["data"] = {k: v for k, v in content["data"].items() if k != "id_column"}
    no_id = parse_spec(content)
    with pytest.raises(ScoringError, match=r"Batch scoring needs data\.id_column"):
        plan_scoring(no_id, SCHEMA, MODEL, source="t")
    with pytest.raises(DataError, match=r"The timestamp column 'tx_datetime' of t is BIGINT, not a time"):
        plan_scoring(SPEC, SCHEMA | {"tx_datetime": "BIGINT"}, MODEL, source="t")
    with pytest.raises(FeatureError, match=r"Column 'tx_fraud' needed by feature 'terminal_id_risk_1day_window'"):
        plan_scoring(SPEC, SCHEMA | {"tx_fraud": "VARCHAR"}, MODEL, source="t")


@pytest.mark.parametrize("arrow", [False, True])
def test_summary_statistics_stream_over_chunks(arrow: bool) -> None:
    rng = np.random.default_rng(0)
    scores = rng.beta(1, 8, 50_000)
    decisions = np.where(scores >= 0.3, "review", "approve").astype(object)
    stats = _ScoreStats()
    for part in np.array_split(np.arange(len(scores)), 7):
        stats.add(scores[part], pa.array(decisions[part]) if arrow else decisions[part])
    summary = ScoreSummary("local", "1", "in", "out", "rej", "sum")
    stats.fill(summary)
    assert summary.decisions == {"approve": int((scores < 0.3).sum()), "review": int((scores >= 0.3).sum())}
    for key, q in (("p01", 0.01), ("p50", 0.5), ("p99", 0.99)):
        assert abs(summary.score_quantiles[key] - np.quantile(scores, q)) < 2e-5
    assert summary.score_min == scores.min() and summary.score_max == scores.max()
    assert summary.score_mean == pytest.approx(scores.mean(), rel=1e-12)


def test_output_table_has_keys_score_decision_and_version() -> None:
    keys = pd.DataFrame({"id": [3, 4], "t": pd.to_datetime(["2024-01-01", "2024-01-02"])})
    table = output_table(keys, np.array([0.1, 0.9]), np.array(["approve", "review"], dtype=object), "12")
    assert table.column_names == ["id", "t", "score", "decision", "model_version"]
    assert table.column("model_version").to_pylist() == ["12", "12"]
    assert str(table.schema.field("model_version").type) == "string"
