"""Materialised feature tables: lineage, incremental and idempotent builds, staleness, schema stops before write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import FeatureError
from keel.features.definitions import feature_names, resolve_definitions
from keel.features.offline import (
    build_feature_table,
    compute_features,
    feature_status,
    read_feature_table,
    read_lineage,
)
from keel.spec import Data, Features

FEATURES = Features.model_validate(
    {
        "raw": ["amount"],
        "row": [{"name": "night", "kind": "is_night", "column": "ts"}],
        "windows": [
            {"entity": "card", "aggregates": ["count", "mean"], "column": "amount", "windows": ["1d", "3d"]},
            {"entity": "shop", "aggregates": ["count", "label_rate"], "windows": ["2d"], "delay": "1d"},
        ],
    }
)
DATA = Data.model_validate(
    {"source": "x", "timestamp": "ts", "label": "y", "label_delay": "1d", "id_column": "id"}
)
DEFS = resolve_definitions(FEATURES, DATA)
KW = {"timestamp": "ts", "label": "y", "id_column": "id"}
EXPECTED = {"id": "int", "ts": "timestamp", "card": "int", "shop": "int", "amount": "float", "y": "int"}


def make_events(days: int, seed: int = 0, per_day: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = days * per_day
    seconds = np.sort(rng.integers(0, days * 86_400, n))
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "ts": pd.Timestamp("2024-01-01") + pd.to_timedelta(seconds, unit="s"),
            "card": rng.integers(0, 15, n),
            "shop": rng.integers(0, 5, n),
            "amount": np.round(rng.gamma(2.0, 20.0, n), 2),
            "y": (rng.random(n) < 0.1).astype(np.int64),
        }
    )


def write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


def test_full_then_incremental_then_idempotent(tmp_path: Path) -> None:
    events = make_events(20)
    first_days = events[events["ts"] < pd.Timestamp("2024-01-15")]
    source = write(first_days, tmp_path / "events.parquet")
    table = tmp_path / "features"

    first = build_feature_table(source, table, DEFS, expected_schema=EXPECTED, **KW)
    assert first.full_rebuild and first.rows_added == first.rows_total == len(first_days)
    lineage = read_lineage(table)
    assert lineage is not None
    assert set(lineage) >= {"definitions_hash", "source", "max_event_time", "computed_at", "parts"}
    assert lineage["max_event_time"] == str(first_days["ts"].max())
    assert lineage["source"]["rows"] == len(first_days)
    first_part = lineage["parts"][0]
    part0 = (table / first_part).read_bytes()

    write(events, source)  # six new days arrive
    second = build_feature_table(source, table, DEFS, expected_schema=EXPECTED, **KW)
    assert not second.full_rebuild
    assert second.rows_added == len(events) - len(first_days) and second.rows_total == len(events)
    assert (table / first_part).read_bytes() == part0  # old days were not recomputed
    assert read_lineage(table)["parts"][0] == first_part
    built = read_feature_table(table)
    full = compute_features(events, DEFS, **KW)
    pd.testing.assert_frame_equal(built, full.reset_index(drop=True), check_exact=False, rtol=0, atol=1e-9)

    before = sorted(p.name for p in table.iterdir())
    third = build_feature_table(source, table, DEFS, expected_schema=EXPECTED, **KW)
    assert third.rows_added == 0 and third.reason == "up to date"
    assert sorted(p.name for p in table.iterdir()) == before


def test_status_reports_new_data_changed_definitions_and_changed_source(tmp_path: Path) -> None:
    events = make_events(10, seed=1)
    source = write(events.iloc[:400], tmp_path / "events.parquet")
    table = tmp_path / "features"
    missing = feature_status(source, table, DEFS, **KW)
    assert missing.stale and missing.reasons == ("no feature table yet",)

    build_feature_table(source, table, DEFS, **KW)
    fresh = feature_status(source, table, DEFS, **KW)
    assert not fresh.stale and fresh.reasons == () and fresh.rows == 400

    write(events, source)
    grown = feature_status(source, table, DEFS, **KW)
    assert grown.stale and grown.new_rows == len(events) - 400
    assert grown.reasons == (f"{len(events) - 400} new events past {events['ts'].iloc[399]}",)

    other = resolve_definitions(FEATURES.model_copy(update={"raw": []}), DATA)
    changed = feature_status(source, table, other, **KW)
    assert "feature definitions changed since the table was built" in changed.reasons

    edited = events.copy()
    edited.loc[5, "amount"] = 12345.0  # an already-covered row changes upstream
    write(edited, source)
    status = feature_status(source, table, DEFS, **KW)
    assert "source rows the table covers have changed (or the source moved)" in status.reasons
    rebuilt = build_feature_table(source, table, DEFS, **KW)
    assert rebuilt.full_rebuild and rebuilt.reason == "source rows already covered have changed"
    assert read_feature_table(table)["amount"].iloc[5] == 12345.0
    assert not feature_status(source, table, DEFS, **KW).stale


def test_changed_definitions_rebuild_everything(tmp_path: Path) -> None:
    source = write(make_events(6, seed=2), tmp_path / "events.parquet")
    table = tmp_path / "features"
    build_feature_table(source, table, DEFS, **KW)
    other = resolve_definitions(FEATURES.model_copy(update={"raw": []}), DATA)
    result = build_feature_table(source, table, other, **KW)
    assert result.full_rebuild and result.reason == "feature definitions changed"
    assert list(read_feature_table(table).columns)[4:] == feature_names(other)
    before = json.loads((table / "_lineage.json").read_text())["parts"]
    assert len(before) == 1 and sorted(p.name for p in table.glob("part-*.parquet")) == before


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda f: f.rename(columns={"amount": "AMOUNT"}),
            r"Column 'amount' needed by feature 'amount' is missing .* A column 'AMOUNT' exists; was it renamed\?",
        ),
        (
            lambda f: f.assign(card=f["card"].astype(str)),
            r"Column 'card' needed by feature 'card_count_1d' \(its entity\) changed type .* says int, the source has VARCHAR",
        ),
        (
            lambda f: f.drop(columns=["y"]),
            r"Column 'y' needed by feature 'shop_label_rate_2d' \(the label\) is missing",
        ),
    ],
)
def test_schema_change_stops_before_any_write(tmp_path: Path, mutate, match: str) -> None:
    events = make_events(4, seed=3)
    source = write(events, tmp_path / "events.parquet")
    table = tmp_path / "features"
    build_feature_table(source, table, DEFS, expected_schema=EXPECTED, **KW)
    snapshot = {p.name: p.read_bytes() for p in table.iterdir()}
    write(mutate(make_events(5, seed=3)), source)
    with pytest.raises(FeatureError, match=match):
        build_feature_table(source, table, DEFS, expected_schema=EXPECTED, **KW)
    assert {p.name: p.read_bytes() for p in table.iterdir()} == snapshot
