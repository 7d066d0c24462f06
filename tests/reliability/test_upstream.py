"""Upstream faults: what the data or the callers get wrong, through the CLI (CliRunner) and the API.

Each fault has one clear outcome: the CLI exits 2 (cannot use the data) or 1 (rows break the contract) with a
message naming the column or file; the API answers 422 naming the field, or accepts and says what it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import Project, to_event
from keel.cli import app as cli
from keel.features.offline import default_table_path, read_feature_table, read_lineage
from keel.serve import PathProvider, create_app, read_labels, read_predictions

runner = CliRunner()


@pytest.fixture
def proj(project: Project, tmp_path: Path) -> Project:
    return project.copy_to(tmp_path / "p")


def _small(proj: Project, frame: pd.DataFrame) -> None:
    frame.to_parquet(proj.data, index=False)


def _cli(proj: Project, *args: str) -> Any:
    return runner.invoke(cli, [*args, "-s", str(proj.spec_path)])


# --- the data --------------------------------------------------------------------------------------------
def test_source_file_missing(proj: Project) -> None:
    proj.data.unlink()
    for verb, message in ((["validate"], "does not exist"), (["features", "build"], "Cannot read the source")):
        result = _cli(proj, *verb)
        assert result.exit_code == 2 and message in result.output and "transactions.parquet" in result.output
    assert not default_table_path(proj.spec).exists()


def test_renamed_column_stops_validate_and_the_build_before_any_write(proj: Project) -> None:
    _small(proj, proj.transactions.rename(columns={"tx_amount": "amount"}))
    result = _cli(proj, "validate")
    assert result.exit_code == 2 and "'tx_amount'" in result.output and "missing" in result.output
    result = _cli(proj, "features", "build")
    assert result.exit_code == 2 and "tx_amount" in result.output
    assert read_lineage(default_table_path(proj.spec)) is None


def test_retyped_column_stops_validate_and_the_build(proj: Project) -> None:
    _small(proj, proj.transactions.assign(tx_amount=proj.transactions["tx_amount"].map(lambda v: f"{v:.2f} EUR")))
    result = _cli(proj, "validate")
    assert result.exit_code == 2 and "'tx_amount' should be float" in result.output
    result = _cli(proj, "features", "build")
    assert result.exit_code == 2 and "tx_amount" in result.output
    assert read_lineage(default_table_path(proj.spec)) is None


def test_schema_change_after_a_build_keeps_the_old_table(proj: Project) -> None:
    assert _cli(proj, "features", "build").exit_code == 0
    before = read_feature_table(default_table_path(proj.spec))
    _small(proj, proj.transactions.rename(columns={"customer_id": "card_id"}))
    result = _cli(proj, "features", "build")
    assert result.exit_code == 2 and "customer_id" in result.output
    pd.testing.assert_frame_equal(read_feature_table(default_table_path(proj.spec)), before)


def test_duplicate_events_are_a_contract_violation(proj: Project) -> None:
    tx = proj.transactions
    _small(proj, pd.concat([tx, tx.iloc[:7]], ignore_index=True))
    result = _cli(proj, "validate")
    assert result.exit_code == 1 and "7 duplicate rows" in result.output


def test_events_in_the_future_are_a_contract_violation(proj: Project) -> None:
    tx = proj.transactions.copy()
    tx.loc[tx.index[:3], "tx_datetime"] = pd.Timestamp.now() + pd.Timedelta(days=2)
    _small(proj, tx)
    result = _cli(proj, "validate")
    assert result.exit_code == 1 and "3 events in the future" in result.output


def test_an_empty_source_is_refused_and_an_empty_day_is_just_a_gap(proj: Project) -> None:
    tx = proj.transactions
    _small(proj, tx.iloc[:0])
    result = _cli(proj, "validate")
    assert result.exit_code == 2 and "the table has no rows" in result.output
    day = tx["tx_datetime"].dt.normalize()
    gap_day = day.unique()[30]
    _small(proj, tx[day != gap_day])
    assert _cli(proj, "validate").exit_code == 0
    result = _cli(proj, "features", "build")
    assert result.exit_code == 0, result.output
    table = read_feature_table(default_table_path(proj.spec))
    assert len(table) == int((day != gap_day).sum())
    after = table[pd.to_datetime(table["tx_datetime"]).dt.normalize() == gap_day + pd.Timedelta(days=1)]
    # The day after the gap: 1-day windows see only that day's own events (nothing from the empty day).
    assert (after["customer_id_nb_tx_1day_window"] <= after.groupby("customer_id").cumcount() + 1).all()


# --- the callers -----------------------------------------------------------------------------------------
@pytest.fixture
def client(proj: Project) -> Any:
    with TestClient(create_app(proj.spec, PathProvider(proj.model))) as c:
        yield c


def _event(proj: Project, *, tid: int, when: str, customer: int = 7, amount: float = 10.0) -> dict[str, Any]:
    base = to_event(proj.transactions.iloc[0])
    return {**base, "transaction_id": tid, "tx_datetime": when, "customer_id": customer, "tx_amount": amount}


def test_duplicate_event_is_answered_twice_but_counted_once(client: TestClient, proj: Project) -> None:
    first = _event(proj, tid=1, when="2024-01-01T10:00:00")
    a = client.post("/v1/predict", json=first)
    b = client.post("/v1/predict", json=first)
    nxt = client.post("/v1/predict", json=_event(proj, tid=2, when="2024-01-01T11:00:00"))
    assert a.status_code == b.status_code == nxt.status_code == 200
    client.app.state.service.predlog.flush()
    logged = read_predictions(proj.spec.store_path(proj.spec.serving.prediction_log))
    assert logged["event_id"].tolist() == ["1", "1", "2"]  # every answer is logged
    assert logged["customer_id_nb_tx_1day_window"].tolist() == [1.0, 1.0, 2.0]  # the duplicate is not counted


def test_late_events_out_of_order_get_point_in_time_features(client: TestClient, proj: Project) -> None:
    for tid, when in [(11, "2024-02-01T08:00:00"), (13, "2024-02-01T20:00:00"), (12, "2024-02-01T12:00:00")]:
        assert client.post("/v1/predict", json=_event(proj, tid=tid, when=when, customer=99,
                                                       amount=float(tid))).status_code == 200
    client.app.state.service.predlog.flush()
    logged = read_predictions(proj.spec.store_path(proj.spec.serving.prediction_log)).set_index("event_id")
    # The late event (12, 12:00) sees 11 and itself, not 13 (later in event time, earlier in arrival).
    assert logged.loc["12", "customer_id_nb_tx_1day_window"] == 2.0
    assert logged.loc["12", "customer_id_avg_amount_1day_window"] == pytest.approx((11 + 12) / 2)
    assert logged.loc["13", "customer_id_nb_tx_1day_window"] == 2.0  # answered before 12 arrived; not rewritten


def test_events_from_a_skewed_clock_are_refused_naming_the_field(client: TestClient, proj: Project) -> None:
    future = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)).isoformat()
    r = client.post("/v1/predict", json=_event(proj, tid=21, when=future))
    assert r.status_code == 422 and "tx_datetime" in r.json()["detail"] and "max_future_skew" in r.json()["detail"]
    within = (pd.Timestamp.now(tz="UTC") + pd.Timedelta(minutes=1)).isoformat()
    assert client.post("/v1/predict", json=_event(proj, tid=22, when=within)).status_code == 200
    r = client.post("/v1/labels", json={"labels": [{"event_id": 22, "label": 1, "at": future}]})
    assert r.status_code == 422 and "at" in r.json()["detail"]


def test_labels_for_unknown_ids_are_kept_and_reported_as_unknown(client: TestClient, proj: Project) -> None:
    client.post("/v1/predict", json=_event(proj, tid=31, when="2024-03-01T10:00:00"))
    r = client.post("/v1/labels", json={"labels": [{"event_id": 31, "label": 1}, {"event_id": 987654321, "label": 0}]})
    assert r.status_code == 200 and r.json() == {"count": 2, "known": 1}
    client.app.state.service.predlog.flush()
    labels = read_labels(proj.spec.store_path(proj.spec.serving.prediction_log))
    assert sorted(labels["event_id"]) == ["31", "987654321"]  # kept: the event may be logged by another replica
    assert client.get("/ready").status_code == 200


def test_empty_batches_are_refused(client: TestClient) -> None:
    for path, body in [("/v1/predict/batch", {"events": []}), ("/v1/labels", {"labels": []})]:
        r = client.post(path, json=body)
        assert r.status_code == 422 and r.json()["detail"]


def test_chunked_build_from_the_cli_equals_the_one_chunk_build(proj: Project) -> None:
    assert _cli(proj, "features", "build").exit_code == 0
    whole = read_feature_table(default_table_path(proj.spec))
    result = _cli(proj, "features", "build", "--full", "--chunk-rows", "97")
    assert result.exit_code == 0, result.output
    assert "chunk(s)" in result.output and " 1 chunk(s)" not in result.output
    pd.testing.assert_frame_equal(read_feature_table(default_table_path(proj.spec)), whole, check_exact=True)
    result = _cli(proj, "features", "build", "--full", "--chunk-rows", "0")
    assert result.exit_code == 2 and "chunk_rows" in result.output
    pd.testing.assert_frame_equal(read_feature_table(default_table_path(proj.spec)), whole, check_exact=True)
