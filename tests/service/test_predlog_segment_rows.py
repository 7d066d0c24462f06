"""A columnar segment rebuilds exactly the rows the writer stores for the same traffic (what lets a batch's rows be
stored as a segment alone): every value with its SQLite type, the JSON and time texts byte for byte."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_predlog_columns import NAMES, _records, batches

from keel.logformat import Segment, read_feature_sets, segment_rows
from keel.serve.predlog import FEATURE_COLUMNS, PREDICTION_COLUMNS, PredictionLog

T0 = datetime(2018, 4, 1, tzinfo=UTC)


def _typed(row: tuple[Any, ...]) -> list[tuple[str, str]]:
    return [(type(v).__name__, repr(v)) for v in row]  # (1 and 1.0, 0.0 and -0.0 differ)


def _check(path: Path) -> int:
    """Every segment of the log against the rows it covers; returns the rows compared."""
    db = sqlite3.connect(path)
    try:
        sets = read_feature_sets(db)
        cols = ", ".join([*PREDICTION_COLUMNS, *FEATURE_COLUMNS])
        compared = 0
        for seq0, n, data in db.execute("select seq0, n, data from prediction_segments order by seq0").fetchall():
            stored = db.execute(f"select {cols} from predictions where seq >= ? and seq < ? order by seq",
                                (seq0, seq0 + n)).fetchall()
            assert len(stored) == n
            rebuilt = segment_rows(Segment(data), sets)
            assert [_typed(r) for r in rebuilt] == [_typed(r) for r in stored]
            picked = list(range(n))[::2][::-1]  # some rows, in any order
            assert [_typed(r) for r in segment_rows(Segment(data), sets, rows=picked)] == [
                _typed(stored[i]) for i in picked]
            # inputs and features as json.loads gives them (repr: 5 and 5.0, 0.0 and -0.0 differ)
            dicts = segment_rows(Segment(data), sets, input_dicts=True, feature_dicts=True)
            assert [repr(r[6:8]) for r in dicts] == [
                repr((json.loads(r[6]), None if r[7] is None else json.loads(r[7]))) for r in stored]
            assert [_typed(a[:6] + a[8:]) for a in dicts] == [_typed(r[:6] + r[8:]) for r in stored]
            compared += n
        return compared
    finally:
        db.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), names=NAMES, segment_rows_=st.sampled_from([5, 16, 4096]))
def test_segments_rebuild_the_rows_of_column_batches_and_their_records(tmp_path_factory: Any, data: Any,
                                                                       names: tuple[str, ...],
                                                                       segment_rows_: int) -> None:
    requests = data.draw(st.lists(batches(names), min_size=1, max_size=5))
    columns = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    path = tmp_path_factory.mktemp("logs") / "log.sqlite"
    log = PredictionLog(path, segment_rows=segment_rows_)  # not started: close() writes in this thread
    for batch, as_columns in zip(requests, columns, strict=True):
        if as_columns:
            log.append_columns(batch)
        else:
            log.append_many(_records(batch))
    log.close()
    assert log.failures == 0
    assert _check(path) == sum(b.n for b in requests)


def _record(i: int, inputs: dict[str, Any], features: dict[str, Any] | None) -> dict[str, Any]:
    return {"request_id": f"r{i}", "item": 0, "time": T0, "event_time": T0, "event_id": str(i),
            "endpoint": "predict", "inputs": inputs, "features": features, "score": 0.5, "decision": "approve",
            "model_version": "v1", "fallback": False, "fallback_reason": None, "stale": False, "latency_ms": 1.0}


def test_ints_and_floats_of_one_input_field_stay_apart(tmp_path: Path) -> None:
    # 5 and 5.0 in one field: a float64 column would rebuild the first row's text as {"x":5.0}
    path = tmp_path / "log.sqlite"
    with PredictionLog(path, segment_rows=3) as log:
        log.append_many([_record(0, {"x": 5, "y": None}, {"f": 1.5}), _record(1, {"x": 5.0, "y": 2.5}, {"f": 0.5}),
                         _record(2, {"x": None, "y": float("inf")}, None)])
    assert _check(path) == 3
    db = sqlite3.connect(path)
    try:
        texts = [r[0] for r in db.execute("select inputs from predictions order by seq")]
    finally:
        db.close()
    assert texts == ['{"x":5,"y":null}', '{"x":5.0,"y":2.5}', '{"x":null,"y":null}']
