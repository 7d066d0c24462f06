"""Materialised feature tables: lineage, incremental and idempotent builds, staleness, schema stops before write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keel.errors import DataError, FeatureError
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


# --- out-of-core builds ------------------------------------------------------------------------------------
def tied_events(n: int = 240, seed: int = 7) -> pd.DataFrame:
    """Events on a coarse clock (many share a timestamp, so chunk borders fall inside ties), in time order."""
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.integers(0, 8 * 48, n))  # half hours
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "ts": pd.Timestamp("2024-02-01") + pd.to_timedelta(slots * 1800, unit="s"),
            "card": rng.integers(0, 6, n),
            "shop": rng.integers(0, 3, n),
            "amount": np.round(rng.gamma(2.0, 20.0, n), 2),
            "y": (rng.random(n) < 0.2).astype(np.int64),
        }
    )


def built(table: Path) -> pd.DataFrame:
    return read_feature_table(table)


@pytest.mark.parametrize("chunk_rows", [1, 7, 13])
def test_tiny_chunks_give_exactly_the_one_chunk_table(tmp_path: Path, chunk_rows: int) -> None:
    events = tied_events()
    ts = events["ts"].to_numpy()
    borders = np.arange(chunk_rows, len(ts), chunk_rows)
    assert (ts[borders] == ts[borders - 1]).any()  # some chunk borders split a group of same-time events
    source = write(events, tmp_path / "events.parquet")
    one = build_feature_table(source, tmp_path / "one", DEFS, chunk_rows=10**9, **KW)
    many = build_feature_table(source, tmp_path / "many", DEFS, chunk_rows=chunk_rows, **KW)
    assert one.chunks == 1 and many.chunks == -(-len(events) // chunk_rows)
    pd.testing.assert_frame_equal(built(tmp_path / "many"), built(tmp_path / "one"), check_exact=True)
    # ...and both are the in-memory definition, label-delayed terminal-style rates included.
    pd.testing.assert_frame_equal(built(tmp_path / "one"), compute_features(events, DEFS, **KW), check_exact=True)
    assert built(tmp_path / "one")["shop_label_rate_2d"].gt(0).any()


def test_chunks_read_the_source_in_time_order_with_ties_in_file_order(tmp_path: Path) -> None:
    events = tied_events(seed=8).sample(frac=1.0, random_state=3).reset_index(drop=True)  # file order != time order
    source = write(events, tmp_path / "events.parquet")
    build_feature_table(source, tmp_path / "t", DEFS, chunk_rows=5, **KW)
    table = built(tmp_path / "t")
    assert table["ts"].is_monotonic_increasing
    expected = compute_features(events, DEFS, **KW)  # ties: input (file) order, as everywhere
    got = table.set_index("id").loc[expected["id"]].reset_index()
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


@pytest.mark.parametrize("chunk_rows", [3, 1_000_000])
def test_incremental_build_in_tiny_chunks_equals_the_whole_computation(tmp_path: Path, chunk_rows: int) -> None:
    events = tied_events(400, seed=9)
    cut = events["ts"].iloc[250]
    source = write(events[events["ts"] <= cut], tmp_path / "events.parquet")
    table = tmp_path / "features"
    build_feature_table(source, table, DEFS, chunk_rows=chunk_rows, **KW)
    write(events, source)
    second = build_feature_table(source, table, DEFS, chunk_rows=chunk_rows, **KW)
    assert not second.full_rebuild and second.rows_added == int((events["ts"] > cut).sum())
    pd.testing.assert_frame_equal(built(table), compute_features(events, DEFS, **KW), check_exact=True)


class _Stop(BaseException):
    """An interruption (like Ctrl-C or a kill) that no ``except Exception`` on the way can swallow."""


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> list[int]:
    from keel.features import offline

    real = offline.compute_features
    calls: list[int] = []

    def compute(frame: pd.DataFrame, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(frame))
        if len(calls) == call:
            raise _Stop
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(offline, "compute_features", compute)
    return calls


def test_an_interrupted_first_build_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tied_events(), tmp_path / "events.parquet")
    table = tmp_path / "features"
    with monkeypatch.context() as m:
        calls = _fail_on_call(m, 4)  # three chunks already went into the part's temporary file
        with pytest.raises(_Stop):
            build_feature_table(source, table, DEFS, chunk_rows=20, **KW)
    assert len(calls) == 4
    assert not table.exists()  # no folder, no part, no temporary, no spill folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet"]


def test_an_interrupted_rebuild_keeps_the_previous_table_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tied_events(), tmp_path / "events.parquet")
    table = tmp_path / "features"
    build_feature_table(source, table, DEFS, **KW)
    snapshot = {p.name: p.read_bytes() for p in table.iterdir()}
    with monkeypatch.context() as m:
        _fail_on_call(m, 3)
        with pytest.raises(_Stop):
            build_feature_table(source, table, DEFS, chunk_rows=20, full=True, **KW)
    assert {p.name: p.read_bytes() for p in table.iterdir()} == snapshot


def test_memory_is_bounded_by_chunk_rows_plus_one_horizon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By construction: the reader hands over at most chunk_rows at a time, and each computation sees one chunk
    plus the carried rows of the last horizon (3 days here) - never the table."""
    from keel.features import offline

    events = tied_events(600, seed=10)  # 8 days: a horizon holds well under the table
    source = write(events, tmp_path / "events.parquet")
    chunk_rows = 40
    batch_sizes: list[int] = []
    real_batches = offline.time_ordered_batches

    def batches(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert kwargs["batch_rows"] <= chunk_rows
        for batch in real_batches(*args, **kwargs):
            batch_sizes.append(len(batch))
            yield batch

    monkeypatch.setattr(offline, "time_ordered_batches", batches)
    calls = _fail_on_call(monkeypatch, -1)  # never fails; records the rows of each computation
    build_feature_table(source, tmp_path / "t", DEFS, chunk_rows=chunk_rows, **KW)

    assert max(batch_sizes) <= chunk_rows and sum(batch_sizes) == len(events)
    t = events["ts"].to_numpy()
    horizon = np.timedelta64(3, "D")  # longest window + delay: card 3d, shop 1d delay + 2d
    for k, rows in enumerate(calls):
        start = k * chunk_rows
        carried = int(np.sum(t[:start] > t[start - 1] - horizon)) if start else 0
        assert rows == min(chunk_rows, len(events) - start) + carried
    assert max(calls) < len(events) / 2
    pd.testing.assert_frame_equal(built(tmp_path / "t"), compute_features(events, DEFS, **KW), check_exact=True)


def test_chunked_features_pulls_one_chunk_at_a_time_and_carries_history() -> None:
    """The shared loop (build and batch scoring): lazy, and history warms the first chunk without being yielded."""
    from keel.features.chunked import chunked_features

    events = tied_events(120, seed=11)
    history, rest = events.iloc[:50], events.iloc[50:].reset_index(drop=True)
    pulled: list[int] = []

    def chunks():  # type: ignore[no-untyped-def]
        for a in range(0, len(rest), 9):
            pulled.append(a)
            yield rest.iloc[a : a + 9]

    out = []
    for k, (chunk, features) in enumerate(
        chunked_features(
            chunks(),
            lambda f: compute_features(f, DEFS, **KW),
            timestamp="ts",
            horizon_ns=3 * 86_400 * 10**9,
            history=history,
        )
    ):
        assert len(pulled) == k + 1  # never reads ahead
        assert chunk["id"].tolist() == features["id"].tolist()
        out.append(features)
    whole = compute_features(events, DEFS, **KW).iloc[50:].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.concat(out, ignore_index=True), whole, check_exact=True)


def test_chunk_rows_must_be_positive(tmp_path: Path) -> None:
    source = write(tied_events(10), tmp_path / "events.parquet")
    with pytest.raises(FeatureError, match=r"chunk_rows must be a positive number of rows\. Got 0 instead\."):
        build_feature_table(source, tmp_path / "t", DEFS, chunk_rows=0, **KW)
    assert not (tmp_path / "t").exists()


def test_a_missing_id_column_or_source_is_named_before_any_write(tmp_path: Path) -> None:
    source = write(tied_events(10).drop(columns=["id"]), tmp_path / "events.parquet")
    with pytest.raises(DataError, match=r"Column 'id' \(the id column\) is missing from .*events\.parquet"):
        build_feature_table(source, tmp_path / "t", DEFS, **KW)
    with pytest.raises(DataError, match=r"Cannot read the source: The data source .*nowhere\.parquet does not exist"):
        build_feature_table(tmp_path / "nowhere.parquet", tmp_path / "t", DEFS, **KW)
    assert not (tmp_path / "t").exists()
