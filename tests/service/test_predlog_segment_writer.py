"""The writer stores column batches as segments alone (``PredictionLog(batch_segments=True)``): no row in
``predictions``, and every reader answers as for the same traffic written as rows (thread and process writers)."""

from __future__ import annotations

import sqlite3
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_predlog_columns import NAMES, _records, batches
from test_predlog_segment_only import T0, TIMES, _all_reads_agree

from keel.serve.predlog import PredictionLog


def _write(path: Path, requests: list[Any], columns: list[bool], labelled: list[str], *, batch_segments: bool,
           process: bool = False, segment_rows_: int = 4096) -> PredictionLog:
    log = PredictionLog(path, segment_rows=segment_rows_, batch_segments=batch_segments, process=process)
    if process:
        log.start()
    if labelled:
        log.add_labels([(labelled[0], 1.0, T0)])  # a label before its event
    for j, (batch, as_columns) in enumerate(zip(requests, columns, strict=True)):
        if as_columns:
            log.append_columns(batch)
        else:
            log.append_many(_records(batch))
        if j % 2:
            log.flush()
    log.add_labels([(e, float(i % 2), T0 + timedelta(hours=i)) for i, e in enumerate(labelled)])
    log.close()
    assert log.failures == 0 and log.written == sum(b.n for b in requests)
    return log


def _table_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (n,) = db.execute("select count(*) from predictions").fetchone()
    db.close()
    return int(n)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data(), names=NAMES, segment_rows_=st.sampled_from([5, 4096]))
def test_column_batches_written_as_segments_only_read_as_rows(tmp_path_factory: Any, data: Any,
                                                              names: tuple[str, ...], segment_rows_: int) -> None:
    requests = data.draw(st.lists(batches(names), min_size=1, max_size=5))
    columns = data.draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    ids = [str(e) for b in requests for e in (b.event_ids or []) if e is not None]
    labelled = data.draw(st.lists(st.sampled_from(ids), max_size=10)) if ids else []
    folder = tmp_path_factory.mktemp("logs")
    rows, only = folder / "rows.sqlite", folder / "only.sqlite"
    _write(rows, requests, columns, labelled, batch_segments=False, segment_rows_=segment_rows_)
    _write(only, requests, columns, labelled, batch_segments=True, segment_rows_=segment_rows_)
    # the column batches' rows are in no table row: only their records' rows are
    assert _table_rows(only) == sum(b.n for b, c in zip(requests, columns, strict=True) if not c)
    bounds = [(None, None), *data.draw(st.lists(st.tuples(TIMES, TIMES), min_size=1, max_size=1))]
    _all_reads_agree(rows, only, names, bounds)


def test_the_writer_process_writes_segment_only_batches(tmp_path: Path) -> None:
    names = ("tx_amount", "mean_1d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (example(): a fixed set of random requests is what this test wants)
        requests = [batches(names).example() for _ in range(6)]
    columns = [True, True, False, True, False, True]
    ids = [str(e) for b in requests for e in (b.event_ids or []) if e is not None]
    rows, only = tmp_path / "rows.sqlite", tmp_path / "only.sqlite"
    _write(rows, requests, columns, ids[:5], batch_segments=False)
    _write(only, requests, columns, ids[:5], batch_segments=True, process=True)
    assert _table_rows(only) == sum(b.n for b, c in zip(requests, columns, strict=True) if not c)
    _all_reads_agree(rows, only, names, [(None, None), (T0, T0 + timedelta(days=400))])


def test_a_write_of_many_batches_makes_segments_of_bounded_size(tmp_path: Path, monkeypatch: Any) -> None:
    from keel.serve import predlog

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (example(): any requests do)
        requests = [batches(("f",)).example() for _ in range(5)]
    cap = requests[0].n + requests[1].n  # the first two batches fill a segment, the third starts another
    monkeypatch.setattr(predlog, "SEGMENT_ONLY_ROWS", cap)
    rows, only = tmp_path / "rows.sqlite", tmp_path / "only.sqlite"
    for path, flag in ((rows, False), (only, True)):
        log = PredictionLog(path, batch_segments=flag)  # not started: one write at close
        for batch in requests:
            log.append_columns(batch)
        log.close()
    sizes = [b.n for b in requests]
    want, run = [], 0
    for n in sizes:
        if run and run + n > cap:
            want.append(run)
            run = 0
        run += n
    want.append(run)
    with sqlite3.connect(only) as db:
        assert [n for (n,) in db.execute("select n from prediction_segments order by seq0")] == want
    assert want[0] == cap and len(want) >= 2
    db.close()
    _all_reads_agree(rows, only, ("f",), [(None, None)])


def test_backfill_covers_only_rows_between_segment_only_segments(tmp_path: Path) -> None:
    from keel.serve.predlog import backfill_segments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (example(): any requests do)
        requests = [batches(("f",)).example() for _ in range(4)]
    columns = [True, False, True, False]
    rows, only = tmp_path / "rows.sqlite", tmp_path / "only.sqlite"
    _write(rows, requests, columns, [], batch_segments=False)
    _write(only, requests, columns, [], batch_segments=True)
    with sqlite3.connect(only) as db:  # the records' rows lose their segments: a log written before segments
        db.execute("delete from prediction_segments where segment_only is null")
    db.close()
    assert backfill_segments(only) == requests[1].n + requests[3].n
    assert backfill_segments(only) == 0
    _all_reads_agree(rows, only, ("f",), [(None, None)])


def test_a_killed_writer_loses_only_the_segment_only_batches_it_held(tmp_path: Path) -> None:
    import os
    import signal

    from test_predlog_process import QUIET, _handed_over, _until

    from keel.serve.predlog import read_predictions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (example(): any requests do)
        requests = [batches(("f",)).example() for _ in range(3)]
    path = tmp_path / "log.sqlite"
    log = PredictionLog(path, process=True, batch_segments=True, **QUIET).start()
    try:
        log.append_columns(requests[0])
        log.flush()
        log.append_columns(requests[1])
        os.kill(_handed_over(log), signal.SIGKILL)  # sent, not yet written
        _until(lambda: log.failures == requests[1].n)
        _until(lambda: log.writer_pid)  # replaced
        log.append_columns(requests[2])
        log.flush()
    finally:
        log.close()
    assert log.written == requests[0].n + requests[2].n and log.failures == requests[1].n
    frame = read_predictions(path)  # the held batch took no seq: the others follow each other
    assert frame["seq"].tolist() == list(range(1, 1 + requests[0].n + requests[2].n))
    assert frame["item"].tolist() == [*range(requests[0].n), *range(requests[2].n)]
