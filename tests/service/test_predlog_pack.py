"""`keel log pack`: rows a segment already holds are stored only in it, and every reader returns what it did."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_predlog_segment_only import T0, _all_reads_agree

from keel.errors import MonitorError
from keel.serve.predlog import PredictionLog, pack_segments, read_predictions


def _records(day: int, n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` answered events, answered on 2026-01-``day + 1``."""
    return [{"request_id": f"r{day}.{j}", "item": j, "time": datetime(2026, 1, 1 + day, 0, j % 60, tzinfo=UTC),
             "event_time": T0 + timedelta(days=day, minutes=j), "event_id": f"e{day}.{j}",
             "inputs": {"amount": j * 1.5, "customer": f"c{j % 3}", "n": j}, "features": {"f": j / 7, "g": -1.5 * j},
             "score": j / (n + start + 1), "decision": "review" if j % 4 == 0 else "approve"}
            for j in range(start, start + n)]


def _log(path: Path, days: int = 3, per_day: int = 20) -> Path:
    """A log of ``days`` flushes of ``per_day`` answers each (a segment each), some of them labelled."""
    with PredictionLog(path, segment_rows=per_day) as log:
        for day in range(days):
            log.append_many(_records(day, per_day))
            log.flush()
        log.add_labels([(f"e{d}.{j}", float(j % 2), T0 + timedelta(days=5)) for d in range(days) for j in (1, 4, 9)])
    return path


def _copy(src: Path, dst: Path) -> Path:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()
    return dst


def _table_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        seqs = [s for (s,) in db.execute("select seq from predictions order by seq")]
    db.close()
    return seqs


def test_pack_stores_every_covered_row_in_its_segment_only_and_reads_the_same(tmp_path: Path) -> None:
    rows = _log(tmp_path / "rows.sqlite")
    packed = _copy(rows, tmp_path / "packed.sqlite")
    result = pack_segments(packed)
    assert (result.rows, result.mismatched, result.incomplete) == (60, 0, 0)
    assert _table_seqs(packed) == []
    with sqlite3.connect(packed) as db:  # labels of packed rows are matched at read time, not kept per row
        assert db.execute("select count(*) from label_rows").fetchone() == (0,)
    db.close()
    _all_reads_agree(rows, packed, ("f", "g"), [(None, None), (T0 + timedelta(hours=20), T0 + timedelta(days=2))])
    again = pack_segments(packed)  # nothing left to pack
    assert (again.rows, again.segments) == (0, 0)


def test_pack_before_a_time_leaves_newer_segments_as_rows(tmp_path: Path) -> None:
    rows = _log(tmp_path / "rows.sqlite", days=3, per_day=16)  # a segment a day
    packed = _copy(rows, tmp_path / "packed.sqlite")
    result = pack_segments(packed, before="2026-01-02T12:00:00+00:00")
    assert (result.rows, result.segments) == (32, 2)
    assert _table_seqs(packed) == list(range(33, 49))
    _all_reads_agree(rows, packed, ("f", "g"), [(None, None)])
    with pytest.raises(MonitorError, match="as a time"):
        pack_segments(packed, before="yesterday-ish")


def test_a_segment_whose_rows_differ_or_are_missing_is_left_as_it_is(tmp_path: Path) -> None:
    rows = _log(tmp_path / "rows.sqlite", days=3, per_day=8)  # segments at seq 1, 9, 17
    with sqlite3.connect(rows) as db:
        db.execute("update predictions set score = 0.123 where seq = 3")  # no longer what its segment holds
        db.execute("delete from predictions where seq = 20")  # a segment with a row missing
    db.close()
    packed = _copy(rows, tmp_path / "packed.sqlite")
    result = pack_segments(packed)
    assert (result.rows, result.segments, result.mismatched, result.incomplete) == (8, 1, 1, 1)
    assert _table_seqs(packed) == [*range(1, 9), *range(17, 20), *range(21, 25)]
    assert read_predictions(packed)["score"].tolist()[2] == 0.123


def test_pack_while_the_service_writes_loses_and_doubles_nothing(tmp_path: Path) -> None:
    want = tmp_path / "want.sqlite"
    live = tmp_path / "live.sqlite"
    batches = [_records(d, 12) for d in range(12)]
    with PredictionLog(want, segment_rows=4) as log:
        for b in batches:
            log.append_many(b)
            log.flush()
    done = threading.Event()
    packed = []

    def pack() -> None:
        while not done.is_set():
            packed.append(pack_segments(live).rows)

    with PredictionLog(live, segment_rows=4) as log:
        log.append_many(batches[0])
        log.flush()
        packer = threading.Thread(target=pack)
        packer.start()
        try:
            for b in batches[1:]:
                log.append_many(b)
                log.flush()
        finally:
            done.set()
            packer.join()
    assert log.failures == 0
    packed.append(pack_segments(live).rows)
    assert sum(packed) == 144 and _table_seqs(live) == []
    _all_reads_agree(want, live, ("f", "g"), [(None, None)])


def test_cli_log_pack_reports_and_vacuums_and_refuses_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from keel.cli import app

    rows = _log(tmp_path / "rows.sqlite", days=4, per_day=40)
    log = shutil.copyfile(rows, tmp_path / "p.sqlite")
    runner = CliRunner()
    done = runner.invoke(app, ["log", "pack", "--log", str(log), "--vacuum"], terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "160 rows in 4 segments now stored only in their segment" in done.output
    assert "after VACUUM" in done.output and log.stat().st_size < rows.stat().st_size
    _all_reads_agree(rows, log, ("f", "g"), [(None, None)])
    bad = runner.invoke(app, ["log", "pack", "--log", str(log), "--before", "2026-13-01"])
    assert bad.exit_code != 0 and "Cannot read '2026-13-01' as a time" in bad.output
    missing = tmp_path / "none.sqlite"
    refused = runner.invoke(app, ["log", "pack", "--log", str(missing)])
    assert refused.exit_code == 2 and "No prediction log" in refused.output
    assert not missing.exists()
