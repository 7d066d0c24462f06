"""The prediction log's writer process (``PredictionLog(process=True)``): what happens when it, or the serving
process, dies, when a write fails in it, and when it hangs at close. (That it writes the same tables as the writer
thread: test_predlog_columns.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keel.serve.predlog import PredictionBatch, PredictionLog

NOW = datetime(2026, 11, 30, 4, 0, tzinfo=UTC)
QUIET = {"flush_rows": 10**9, "flush_ms": 10**9}  # the child writes only when asked (flush, close, EOF)


def _records(n: int, first: int = 0) -> list[dict[str, Any]]:
    return [{"request_id": f"r{i}", "time": NOW, "event_time": NOW, "event_id": str(i), "decision": "approve",
             "inputs": {"id": i, "amount": 1.5 * i}, "features": {"f": float(i)}, "score": 0.25}
            for i in range(first, first + n)]


def _rows(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("select count(*) from predictions").fetchone()[0])
    finally:
        db.close()


def _until(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _handed_over(log: PredictionLog) -> int:
    """Wait until the queue went to the writer process (sent, not yet acknowledged); its pid."""
    return int(_until(lambda: log.writer_pid if not log._queue and log._inflight_items else None))


def _died_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if "predlog_writer_died" in r.getMessage()]


def test_a_killed_writer_is_replaced_and_what_it_held_is_counted_as_failures(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "log.sqlite"
    caplog.set_level(logging.ERROR, logger="keel.serve.predlog")
    log = PredictionLog(path, process=True, **QUIET).start()
    try:
        log.append_many(_records(40))
        log.append(_records(1, first=40)[0])
        pid = _handed_over(log)
        os.kill(pid, signal.SIGKILL)
        _until(lambda: log.failures == 41)
        assert log.written == 0 and log.pending == 0
        (line,) = _died_lines(caplog)
        assert line["pid"] == pid and line["lost"] == 41 and line["exitcode"] == -signal.SIGKILL
        new = _until(lambda: log.writer_pid)  # replaced before the next records come
        assert new != pid and _alive(new)
        log.append_many(_records(25, first=100))
        log.flush()
        assert log.written == 25 and log.failures == 41 and _rows(path) == 25
    finally:
        log.close()
    assert _rows(path) == 25 and len(_died_lines(caplog)) == 1  # a clean close is not a death


def test_the_writer_writes_what_it_received_and_exits_when_the_serving_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_predlog_process import QUIET, _handed_over, _records
        from keel.serve.predlog import PredictionLog
        log = PredictionLog(sys.argv[1], process=True, **QUIET).start()
        log.append_many(_records(30))
        log.append_many(_records(7, first=30))
        print(_handed_over(log), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child) and _rows(path) == 0  # received, not written (flush_ms is far away)
        parent.kill()
        parent.wait(timeout=30)
        _until(lambda: not _alive(child), timeout=30)  # no orphan left behind
        assert _rows(path) == 37
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_failed_write_in_the_writer_counts_its_rows_as_failures(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    with PredictionLog(path, process=True, **QUIET) as log:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("create trigger full before insert on predictions begin select raise(abort, 'disk full'); end")
        log.append_many(_records(12))
        log.flush()
        assert log.failures == 12 and log.written == 0
        db.execute("drop trigger full")
        db.close()
        log.append_many(_records(5, first=12))
        log.flush()
        assert log.failures == 12 and log.written == 5
    assert _rows(path) == 5


def _batch(n: int, ids: list[Any]) -> PredictionBatch:
    return PredictionBatch(
        request_id="b", endpoint="batch", time=NOW, inputs={"id": ids}, event_ids=None, timestamp=None,
        scores=np.full(n, 0.5), decisions=["approve"] * n, model_version=None, fallback_reasons=[None] * n,
        stale=np.zeros(n, dtype=bool), latency_ms=1.0, features=np.zeros((n, 1)), feature_names=["f"],
        failed=np.zeros(n, dtype=bool))


def test_a_record_or_batch_that_does_not_pickle_loses_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    bad = {**_records(1, first=99)[0], "inputs": {"id": lambda: 0}}
    with PredictionLog(path, process=True) as log:
        log.append_many(_records(3))
        log.append(bad)
        log.append_columns(_batch(4, [1, 2, lambda: 0, 4]))
        log.append_columns(_batch(2, [5, 6]))
        log.append_many(_records(2, first=3))
        log.flush()
        assert log.failures == 5 and log.written == 7
    assert _rows(path) == 7


def test_close_with_a_stuck_writer_returns_after_its_timeout_and_ends_the_writer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "log.sqlite"
    caplog.set_level(logging.ERROR, logger="keel.serve.predlog")
    log = PredictionLog(path, process=True, **QUIET).start()
    log.append_many(_records(10))
    pid = _handed_over(log)
    os.kill(pid, signal.SIGSTOP)
    try:
        log.append_many(_records(3, first=10))
        started = time.monotonic()
        log.close(timeout=1.0)
        assert time.monotonic() - started < 6.0
        _until(lambda: not _alive(pid), timeout=10)
        assert log.failures == 13 and log.written == 0
        (line,) = _died_lines(caplog)
        assert line["reason"] == "close_timeout" and line["lost"] == 13
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
