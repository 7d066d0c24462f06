"""A request's answers appended column-wise write exactly what its per-event records write: every table, byte
for byte (rows, JSON text, feature blobs, segments, label rows)."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.monitor.logread import read_log
from keel.serve import predlog
from keel.serve.predlog import PredictionBatch, PredictionLog, read_predictions

T0 = datetime(2018, 4, 1)
NOW = datetime(2026, 11, 30, 3, 29, 54, 730981, tzinfo=UTC)
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(float("nan")), st.just(-0.0),
                   st.integers(0, 2**64 - 1).map(lambda b: float(np.array([b], dtype="<u8").view("<f8")[0])))


def _tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the log, each value with its SQLite type (1 and 1.0 differ there); ``received`` aside."""
    db = sqlite3.connect(path)
    try:
        out = {}
        for table in ("predictions", "labels", "feature_sets", "prediction_segments", "label_rows"):
            # (a label's ``received`` is the wall clock when it was added)
            cols = [r[1] for r in db.execute(f"pragma table_info({table})") if r[1] != "received"]
            out[table] = db.execute(f"select {', '.join(f'typeof({c}), {c}' for c in cols)} from {table}"
                                    " order by rowid").fetchall()
        return out
    finally:
        db.close()


def _records(batch: PredictionBatch) -> list[dict[str, Any]]:
    """The per-event records the service builds for the same answers (what append_many gets): the events as
    ``model_dump`` gives them (a missing number None, the timestamp a datetime), the features as dicts."""
    n = batch.n
    events: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, values in batch.inputs.items():
        for i in range(n):
            v = values[i]
            if isinstance(values, np.ndarray) and values.dtype.kind == "M":
                v = None if np.isnat(v) else pd.Timestamp(v).to_pydatetime()
            elif isinstance(values, np.ndarray):
                v = None if math.isnan(v) else float(v)
            events[i][name] = v
    rows = batch.features.tolist()
    out = []
    for i in range(n):
        score = float(batch.scores[i])
        reason = batch.fallback_reasons[i]
        out.append({
            "request_id": batch.request_id if batch.endpoint == "predict" else f"{batch.request_id}.{i}",
            "event_id": None if batch.event_ids is None else batch.event_ids[i],
            "score": None if math.isnan(score) else score, "decision": batch.decisions[i],
            "model_version": batch.model_version, "fallback": reason is not None, "fallback_reason": reason,
            "stale": bool(batch.stale[i]), "latency_ms": batch.latency_ms, "item": i, "time": batch.time,
            "endpoint": batch.endpoint,
            "event_time": events[i].get(batch.timestamp) if batch.timestamp else None, "inputs": events[i],
            "features": None if batch.failed[i] else dict(zip(batch.feature_names, rows[i], strict=True)),
        })
    return out


@st.composite
def batches(draw: Any, names: tuple[str, ...]) -> PredictionBatch:
    n = draw(st.integers(1, 40))
    endpoint = draw(st.sampled_from(["batch", "predict"]))
    seconds = draw(st.lists(st.integers(-5 * 10**9, 5 * 10**9), min_size=n, max_size=n))
    micros = draw(st.lists(st.integers(0, 999_999), min_size=n, max_size=n))
    stamps = np.array([np.datetime64(T0) + np.timedelta64(s, "s") + np.timedelta64(u, "us")
                       for s, u in zip(seconds, micros, strict=True)], dtype="datetime64[ns]")
    if draw(st.booleans()):
        stamps[draw(st.integers(0, n - 1))] = np.datetime64("NaT")
    amounts = np.array(draw(st.lists(FLOATS, min_size=n, max_size=n)), dtype=np.float64)
    nothing = np.full(n, np.nan)  # an optional number no event has
    ints = draw(st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.integers(-10**30, 10**30), st.none()),
                         min_size=n, max_size=n))
    words = draw(st.lists(st.one_of(TEXT, st.none(), st.sampled_from(['a"b', "c\\d", "e\nf", "%s", "é"])),
                          min_size=n, max_size=n))
    flags = draw(st.lists(st.one_of(st.booleans(), st.none()), min_size=n, max_size=n))
    inputs = {"tx_id": list(range(n)), "tx_datetime": stamps, "amount": amounts, "note": words, "big": ints,
              "flag": flags, "unset": nothing}
    k = len(names)
    matrix = np.array(draw(st.lists(FLOATS, min_size=n * k, max_size=n * k)), dtype=np.float64).reshape(n, k)
    failed = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    scores = np.array(draw(st.lists(st.one_of(st.floats(0, 1), st.just(float("nan")), st.just(math.inf)),
                                    min_size=n, max_size=n)), dtype=np.float64)
    reasons = draw(st.lists(st.sampled_from([None, None, "model_error", "features_unavailable", "ü"]),
                            min_size=n, max_size=n))
    ids = draw(st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 10**6), TEXT, st.none()), min_size=n,
                                             max_size=n)))
    return PredictionBatch(
        request_id=draw(TEXT.filter(bool)), endpoint=endpoint, time=NOW + timedelta(seconds=draw(st.integers(0, 99))),
        inputs=inputs, event_ids=ids, timestamp="tx_datetime", scores=scores,
        decisions=draw(st.lists(st.sampled_from(["approve", "decline", 'say "no"', "été"]), min_size=n, max_size=n)),
        model_version=draw(st.sampled_from([None, "v1", "path:model@5e84"])), fallback_reasons=reasons,
        stale=np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        latency_ms=draw(st.floats(0, 1e4)), features=matrix, feature_names=names, failed=failed)


RECORDS_ROWS = predlog._records_rows


def _refuse(*args: object) -> None:
    raise ValueError("records one by one")


NAMES = st.sampled_from([("tx_amount", "mean_1d", "nb%_tx"), ("naïve \"q\"",), ()])


def _append(log: PredictionLog, requests: list[PredictionBatch], columns: list[bool], flush_after: list[bool],
            *, check: bool = False) -> None:
    """Append each request as columns or as its records, labels after the second, flushing where asked."""
    for j, batch in enumerate(requests):
        if columns[j]:
            log.append_columns(batch)
        else:
            log.append_many(_records(batch))
        if j == 1:
            log.add_labels([(0, 1.0, T0), ("x", 0.0, T0)])
        if flush_after[j]:
            log.flush()
            if check:  # everything appended so far is written once flush() returns
                assert log.written == sum(b.n for b in requests[:j + 1]) and log.pending == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), names=NAMES, segment_rows=st.sampled_from([5, 16, 4096]))
def test_columns_write_what_the_records_write(tmp_path_factory: Any, data: Any, names: tuple[str, ...],
                                              segment_rows: int) -> None:
    requests = data.draw(st.lists(batches(names), min_size=1, max_size=6))
    flush_after = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    mixed = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    folder = tmp_path_factory.mktemp("logs")
    paths = {way: folder / f"{way}.sqlite" for way in ("records", "columns", "mixed", "one_by_one")}
    try:
        for way, path in paths.items():
            log = PredictionLog(path, segment_rows=segment_rows)  # not started: flush() writes in this thread
            # one_by_one: records through _prediction_row each (the writer's path when a record is malformed)
            predlog._records_rows = _refuse if way == "one_by_one" else RECORDS_ROWS
            _append(log, requests, [way == "columns" or (way == "mixed" and m) for m in mixed], flush_after)
            log.close()
            assert log.failures == 0
    finally:
        predlog._records_rows = RECORDS_ROWS
    expected = _tables(paths["records"])
    assert sum(n for (_, n) in [(r[0], r[3]) for r in expected["prediction_segments"]]) == sum(
        b.n for b in requests)
    assert _tables(paths["columns"]) == expected
    assert _tables(paths["mixed"]) == expected
    assert _tables(paths["one_by_one"]) == expected


def test_a_batch_reads_back_as_its_answers(tmp_path: Path) -> None:
    n = 3
    batch = PredictionBatch(
        request_id="r1", endpoint="batch", time=NOW,
        inputs={"tx_id": [7, 8, 9], "tx_datetime": np.array(["2018-04-01T00:00", "2018-04-01T01:00",
                                                               "2018-04-01T02:00:00.5"], dtype="datetime64[ns]"),
                "tx_amount": np.array([1.5, np.nan, 3.0]), "who": ["é", None, 'a"b']},
        event_ids=[7, 8, 9], timestamp="tx_datetime", scores=np.array([0.25, np.nan, 0.75]),
        decisions=["approve", "review", "decline"], model_version="v1",
        fallback_reasons=[None, "features_unavailable", None], stale=np.array([False, False, True]),
        latency_ms=2.5, features=np.array([[1.0, np.nan], [0.0, 0.0], [2.0, np.inf]]),
        feature_names=["f", "g"], failed=np.array([False, True, False]))
    path = tmp_path / "log.sqlite"
    with PredictionLog(path) as log:
        log.append_columns(batch)
        log.add_labels([(9, 1.0, T0)])
    frame = read_predictions(path)
    assert frame["request_id"].tolist() == ["r1.0", "r1.1", "r1.2"] and frame["item"].tolist() == [0, 1, 2]
    assert frame["event_id"].tolist() == ["7", "8", "9"] and frame["fallback"].tolist() == [False, True, False]
    assert frame["inputs"][1] == {"tx_id": 8, "tx_datetime": "2018-04-01T01:00:00.000000", "tx_amount": None,
                                  "who": None}
    assert frame["inputs"][0]["who"] == "é" and frame["inputs"][2]["who"] == 'a"b'
    assert frame["event_time"].tolist() == list(pd.to_datetime(["2018-04-01T00:00:00", "2018-04-01T01:00:00",
                                                                "2018-04-01T02:00:00.5"], format="ISO8601"))
    assert frame["f"].tolist()[0] == 1.0 and np.isnan(frame["g"][0]) and np.isnan(frame["f"][1])
    seg = pd.concat(read_log(path, features=["f", "g"], inputs=["tx_amount"], labels=True, batch_rows=n))
    assert seg["score"].tolist()[::2] == [0.25, 0.75] and np.isnan(seg["score"][1])
    assert seg["f"].tolist()[::2] == [1.0, 2.0] and seg["label"].tolist()[2] == 1.0
    assert np.isnan(seg["input.tx_amount"][1]) and seg["input.tx_amount"][2] == 3.0


def test_a_malformed_record_loses_only_itself_and_rows_keep_their_order(tmp_path: Path) -> None:
    batch = PredictionBatch(
        request_id="b", endpoint="batch", time=NOW, inputs={"x": [1, 2]}, event_ids=None, timestamp=None,
        scores=np.array([0.5, 0.5]), decisions=["a", "a"], model_version=None, fallback_reasons=[None, None],
        stale=np.zeros(2, dtype=bool), latency_ms=1.0, features=np.zeros((2, 1)), feature_names=["f"],
        failed=np.zeros(2, dtype=bool))
    records = _records(batch)
    good = [{**r, "request_id": f"r{i}"} for i, r in enumerate(records * 150)]
    bad = {**records[0]}
    del bad["decision"]
    path = tmp_path / "log.sqlite"
    log = PredictionLog(path, segment_rows=64)
    log.append_many([*good[:200], bad, *good[200:]])
    log.append_columns(batch)
    log.close()
    assert log.failures == 1
    frame = read_predictions(path)
    assert frame["request_id"].tolist() == [f"r{i}" for i in range(300)] + ["b.0", "b.1"]
    assert len(pd.concat(read_log(path, batch_rows=1000))) == 302


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data(), names=NAMES, segment_rows=st.sampled_from([5, 4096]))
def test_the_writer_process_writes_what_the_writer_thread_writes(tmp_path_factory: Any, data: Any,
                                                                 names: tuple[str, ...], segment_rows: int) -> None:
    requests = data.draw(st.lists(batches(names), min_size=1, max_size=5))
    flush_after = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    mixed = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    folder = tmp_path_factory.mktemp("logs")
    for way in ("thread", "process"):
        # a write at each flush() and at close() only, in both modes (the same transactions, so the same segments)
        log = PredictionLog(folder / f"{way}.sqlite", segment_rows=segment_rows, flush_rows=10**9,
                            flush_ms=10**9, process=way == "process").start()
        _append(log, requests, mixed, flush_after, check=True)
        log.close()
        assert log.failures == 0 and log.written == sum(b.n for b in requests)
    assert _tables(folder / "process.sqlite") == _tables(folder / "thread.sqlite")
