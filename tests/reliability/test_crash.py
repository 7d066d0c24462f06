"""Crash safety: kill -9 the server under load, the feature build and batch scoring midway; then restart/resume.

The in-process tests stop a build at a chosen step by raising from inside the step (what a kill leaves on disk
is the same: every file written so far, nothing after). The ``slow`` tests send a real SIGKILL to a real process.

Registry: a promote killed midway is covered where the registry lives --
tests/unit/test_registry_lifecycle.py::test_interrupted_promote_leaves_old_alias_and_reconciles,
::test_promote_killed_after_the_alias_write_is_recorded_as_applied and
tests/e2e/test_models_cli_lib.py::test_process_killed_mid_promote_leaves_old_or_new_alias_and_a_reconciled_log.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from conftest import REPO, Project, children, wait_gone
from keel.features import offline
from keel.features.offline import build_features, read_feature_table, read_lineage
from keel.features.online import stored_rows
from keel.serve.predlog import iter_rows

sys.path.insert(0, str(REPO / "bench"))
from loadgen import fixed_rate, timed_events

FIELDS = ["transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount"]


def _logged(db: Path) -> int:
    """Rows in the prediction log (the answers of a batch request are stored only as a segment: its readers)."""
    return sum(1 for _ in iter_rows(db))


def _integrity(db: Path) -> str:
    con = sqlite3.connect(str(db))
    try:
        return str(con.execute("pragma integrity_check").fetchone()[0])
    finally:
        con.close()


# --- the service ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_killed_under_load_restarts_with_its_log_and_store_consistent(
        project: Project, tmp_path: Path, server_factory: Any) -> None:
    proj = project.copy_to(tmp_path / "p")
    spec = proj.spec
    server = server_factory(proj)
    rate, seconds = 40.0, 8.0
    events = timed_events(proj.transactions, FIELDS, count=int(rate * seconds))
    killed_at: list[float] = []
    writers: list[int] = []

    def kill_midway(elapsed: float, partial: Any) -> None:
        if not killed_at and elapsed >= seconds / 2:
            killed_at.append(elapsed)
            writers.extend(children(server.pid))  # the prediction log's writer process
            os.kill(server.pid, signal.SIGKILL)

    result = fixed_rate(server.base, events, rate=rate, seconds=seconds, timeout=3.0, on_tick=kill_midway)
    server.proc.wait(timeout=30)
    assert killed_at and server.proc.returncode == -signal.SIGKILL
    # The log's writer process sees the pipe close, writes what it had received and exits: no orphan stays.
    wait_gone(writers)
    assert result.ok > 0 and result.failed > 0  # some answered before the kill, the rest found no server

    log_db = spec.store_path(spec.serving.prediction_log)
    store_db = spec.store_path(spec.features.store)
    assert _integrity(log_db) == "ok" and _integrity(store_db) == "ok"
    logged = _logged(log_db)
    # Loss bound (docs/reliability.md): the records of the batch not yet committed, at most log_flush_rows.
    lost = result.ok - logged
    assert logged <= result.sent
    assert lost <= spec.serving.log_flush_rows, (result.ok, logged)
    # The store commits every event before its answer: every answered event is in it, none twice per entity.
    con = sqlite3.connect(f"file:{store_db}?mode=ro", uri=True)
    try:
        pairs = [(row[1], row[3]) for row in stored_rows(con)]  # (entity, event id) of rows and blocks
    finally:
        con.close()
    stored = len({event_id for entity, event_id in pairs if entity == "customer_id"})
    assert stored >= result.ok
    assert len(set(pairs)) == len(pairs)

    again = server_factory(proj)
    import httpx

    assert httpx.get(f"{again.base}/ready").json()["status"] == "ready"
    more = timed_events(proj.transactions, FIELDS, count=20, first_id=2 * 10**9)
    after = fixed_rate(again.base, more, rate=20, seconds=1)
    assert after.ok == 20
    assert again.stop() in (0, -signal.SIGTERM)
    assert _logged(log_db) == logged + 20
    print(f"\nkill -9 under load: answered {result.ok}, logged {logged}, lost {lost} (bound "
          f"{spec.serving.log_flush_rows}); store held {stored} events")


# --- keel features build -----------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so nothing on the way catches it."""


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: str, when: str) -> None:
    """Stop the build when ``_write_atomic`` is about to write (``before``) or has written (``after``) ``step``."""
    real = offline._write_atomic

    def write(path: Path, fn: Any) -> None:
        is_lineage = path.name == offline.LINEAGE_FILE
        target = (step == "lineage") == is_lineage
        if target and when == "before":
            raise _Killed
        real(path, fn)
        if target and when == "after":
            raise _Killed

    monkeypatch.setattr(offline, "_write_atomic", write)


def _parts_only(table: Path, lineage: dict[str, Any] | None) -> bool:
    """The folder holds the lineage and exactly the parts it lists (nothing half-written beside them)."""
    assert lineage is not None
    return _visible(table) == sorted(["_lineage.json", *lineage["parts"]]) and len(lineage["parts"]) == 1


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture
def build_project(project: Project, tmp_path: Path) -> Project:
    return project.copy_to(tmp_path / "p")


@pytest.mark.parametrize(("step", "when"), [("part", "before"), ("part", "after"), ("lineage", "before")])
def test_first_build_stopped_midway_leaves_no_table_and_the_next_run_completes(
        build_project: Project, monkeypatch: pytest.MonkeyPatch, step: str, when: str) -> None:
    spec = build_project.spec
    with monkeypatch.context() as m:
        _stop_at(m, step, when)
        with pytest.raises(_Killed):
            build_features(spec)
    table = offline.default_table_path(spec)
    assert read_lineage(table) is None  # no lineage, no table: readers see nothing half-built
    with pytest.raises(Exception, match="No feature table"):
        read_feature_table(table)
    result = build_features(spec)
    assert result.full_rebuild and result.rows_total == len(build_project.transactions)
    assert len(read_feature_table(table)) == len(build_project.transactions)
    assert _parts_only(table, read_lineage(table))


def _two_part_table(proj: Project) -> Any:
    """A table built on the first 50 days, then updated with the rest (two parts)."""
    spec = proj.spec
    full = proj.transactions
    cut = full["tx_datetime"].min() + pd.Timedelta(days=50)
    full[full["tx_datetime"] < cut].to_parquet(proj.data, index=False)
    build_features(spec)
    full.to_parquet(proj.data, index=False)
    result = build_features(spec)
    assert not result.full_rebuild and len(read_lineage(offline.default_table_path(spec))["parts"]) == 2
    return spec


def test_incremental_build_stopped_before_its_lineage_keeps_the_previous_table(
        build_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = build_project.spec
    full = build_project.transactions
    cut = full["tx_datetime"].min() + pd.Timedelta(days=50)
    full[full["tx_datetime"] < cut].to_parquet(build_project.data, index=False)
    build_features(spec)
    table = offline.default_table_path(spec)
    before = read_feature_table(table)
    full.to_parquet(build_project.data, index=False)
    with monkeypatch.context() as m:
        _stop_at(m, "part", "after")
        with pytest.raises(_Killed):
            build_features(spec)
    pd.testing.assert_frame_equal(read_feature_table(table), before)  # the new part is not part of the table
    result = build_features(spec)
    assert result.rows_total == len(full) and len(read_feature_table(table)) == len(full)


def test_full_rebuild_stopped_before_its_lineage_keeps_the_previous_table(  # found here; fixed in 0156367
        build_project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _two_part_table(build_project)
    table = offline.default_table_path(spec)
    before = read_feature_table(table)
    with monkeypatch.context() as m:
        _stop_at(m, "part", "after")
        with pytest.raises(_Killed):
            build_features(spec, full=True)
    after = build_features(spec)  # the next ordinary run must end with a correct table
    rows = read_feature_table(table)
    assert len(rows) == len(before) == after.rows_total
    assert rows["transaction_id"].is_unique


# --- real SIGKILLs (slow) -----------------------------------------------------------------------------------
_KILL_BUILD = textwrap.dedent("""
    import os, signal, sys
    from keel.features import offline
    from keel.spec import load_spec
    real = offline._write_atomic
    def write(path, fn):
        if path.name.startswith("part-"):
            def partial(tmp):
                fn(tmp)
                os.kill(os.getpid(), signal.SIGKILL)  # the temp file is complete, the replace never happens
            real(path, partial)
        real(path, fn)
    offline._write_atomic = write
    offline.build_features(load_spec(sys.argv[1]))
""")


@pytest.mark.slow
def test_features_build_process_killed_midway_leaves_no_partial_table_and_resumes(build_project: Project) -> None:
    spec = build_project.spec
    proc = subprocess.run([sys.executable, "-c", _KILL_BUILD, str(build_project.spec_path)], capture_output=True,
                          cwd=build_project.root, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    table = offline.default_table_path(spec)
    assert read_lineage(table) is None and _visible(table) == []
    done = subprocess.run([sys.executable, "-m", "keel.cli", "features", "build", "-s", str(build_project.spec_path)],
                          capture_output=True, cwd=build_project.root, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert len(read_feature_table(table)) == len(build_project.transactions)
    assert _parts_only(table, read_lineage(table))


_KILL_SCORE = textwrap.dedent("""
    import os, signal, sys
    from keel.artifact import DecisionModel
    from keel.data.sources import open_source
    from keel.score import score
    from keel.spec import load_spec
    spec_path, data, model_path, out, kill = sys.argv[1:6]
    def progress(done, total):
        if kill == "1" and done >= 10_000:
            os.kill(os.getpid(), signal.SIGKILL)
    score(load_spec(spec_path), open_source(data), out, model=DecisionModel.load(model_path), model_version="t",
          chunk_rows=5_000, progress=progress)
""")


@pytest.mark.slow
def test_score_process_killed_midway_leaves_no_partial_output_and_reruns_whole(build_project: Project,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "out" / "scores.parquet"
    args = [str(build_project.spec_path), str(build_project.data), str(build_project.model), str(out)]
    killed = subprocess.run([sys.executable, "-c", _KILL_SCORE, *args, "1"], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not out.exists()
    assert _visible(out.parent) == []  # nothing a reader would pick up as output
    done = subprocess.run([sys.executable, "-c", _KILL_SCORE, *args, "0"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    scored = pd.read_parquet(out)
    assert len(scored) > 0 and scored["transaction_id"].is_unique
    # The rerun swept the killed run's temporary output (its rejects temporary and spill folder: xfail below).
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".scores.parquet.") and
            p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_a_rerun_sweeps_temporary_files_left_by_a_killed_run(build_project: Project, tmp_path: Path) -> None:
    """Found by this suite (killed runs accumulated hidden temporaries); fixed in 0156367."""
    out = tmp_path / "out" / "scores.parquet"
    out.parent.mkdir(parents=True)
    stale = out.parent / ".scores.parquet.dead0001.tmp"
    stale.write_bytes(b"left by a run killed with SIGKILL")
    args = [str(build_project.spec_path), str(build_project.data), str(build_project.model), str(out)]
    done = subprocess.run([sys.executable, "-c", _KILL_SCORE, *args, "0"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not stale.exists()


@pytest.mark.slow
def test_a_rerun_sweeps_the_rejects_temporary_and_spill_folder_of_a_killed_run(build_project: Project, tmp_path: Path) -> None:
    out = tmp_path / "out" / "scores.parquet"
    out.parent.mkdir(parents=True)
    stale = out.parent / ".scores.rejects.parquet.dead0002.tmp"
    stale.write_bytes(b"left by a run killed with SIGKILL")
    spill = out.parent / ".scores.parquet.spill.dead0003"
    spill.mkdir()
    (spill / "duckdb_temp_block").write_bytes(b"x" * 1024)
    args = [str(build_project.spec_path), str(build_project.data), str(build_project.model), str(out)]
    done = subprocess.run([sys.executable, "-c", _KILL_SCORE, *args, "0"], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not stale.exists() and not spill.exists()
