"""Monitoring speed: 1 M logged predictions x 15 features against a reference profile, vs Evidently's preset.

Each engine runs in its own process (so peak RSS is its own):

* ``keel-table``  — drift of the 1 M-row table (``DriftAccumulator``: PSI, KS, chi², JS, missing and range per
  feature and the score, per day), fed in 200 k-row batches;
* ``keel-log``    — ``run_monitor`` end to end on the SQLite prediction log (drift + performance + operations +
  triggers + monitor.json/.html), streamed from disk in one scan; the log is written as the service writes it
  (``keel.serve.predlog.write_rows``): rows with JSON text and the binary feature column, plus one columnar segment
  per 4096 rows (16 write batches of 256), which is what monitoring reads;
* ``keel-log-blob`` — the same on a log of the previous format (rows with the binary feature column, no columnar
  segments: the rows' base columns printed as text by SQLite and parsed by Arrow);
* ``keel-log-json`` — the same on an old log without the binary column (features read from the JSON text);
* ``evidently``   — Evidently's ``DataDriftPreset`` on the same reference and current frames (when installed).

Usage: ``python bench/bench_monitor.py [--rows 1000000] [--features 15] [--work DIR] [--no-evidently]
[--no-write]``; writes its section of bench/RESULTS.md unless ``--no-write``. ``--work`` keeps the log (built in bulk, ~1-2 min for 1 M rows) for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DAYS = 10
WRITE_BATCH = 256  # the service's default write batch (serving.log_flush_rows)
REF_ROWS = 200_000


def feature_names(features: int) -> list[str]:
    """The first feature is the transaction amount, a raw model input (``features.raw``) as in
    examples/card-fraud: the cost of a missed fraud reads it from the feature column, not the inputs' JSON."""
    return ["tx_amount", *(f"f{j}" for j in range(1, features))]


def _data(rows: int, features: int, seed: int = 0, *, current: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)

    def frame(n: int, shift: float) -> pd.DataFrame:
        cols = {}
        for j, name in enumerate(feature_names(features)):
            if j % 3 == 0:
                cols[name] = rng.gamma(2, 30, n) * (1 + shift)
            elif j % 3 == 1:
                cols[name] = rng.poisson(5 + 3 * shift, n).astype(float)
            else:
                cols[name] = rng.normal(shift, 1, n)
        cols["tx_amount"] = np.round(cols["tx_amount"], 2)  # an amount in cents
        cols["score"] = np.clip(rng.beta(1, 30, n) * (1 + shift), 0, 1)
        return pd.DataFrame(cols)

    ref = frame(REF_ROWS, 0.0)
    if not current:  # keel-log reads the current rows from the log: its RSS must not hold them
        return ref, ref.iloc[:0]
    cur = frame(rows, 0.0)
    late = np.arange(rows) >= rows // 2  # the second half of the period drifts
    cur.loc[late, "tx_amount"] = np.round(cur.loc[late, "tx_amount"] * 1.5, 2)  # PSI ~0.27 per day: fires
    cur.loc[late, "f2"] += 0.3
    cur["event_time"] = pd.Timestamp("2018-09-01") + pd.to_timedelta(np.linspace(0, DAYS * 86400 - 1, rows), "s")
    return ref, cur


def _records(cur: pd.DataFrame, features: list[str], feature_set: int) -> Iterator[tuple[dict, tuple]]:
    """Each logged prediction as the service hands it to the log (a record) and the row it writes (a tuple).

    Inputs are the card-fraud request's raw fields; time = event time (a replay). The tuple is built directly,
    the way ``keel.serve.predlog`` renders a record, so 1 M rows take seconds instead of minutes.
    """
    n = len(cur)
    times = cur["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f").to_numpy()
    feats = cur[features].to_numpy()
    scores = cur["score"].to_numpy()
    rng = np.random.default_rng(1)
    lat = np.round(rng.gamma(2, 2, n), 3)
    customer, terminal = rng.integers(0, 5000, n).tolist(), rng.integers(0, 10_000, n).tolist()
    amount = cur["tx_amount"].to_numpy().tolist()  # the raw input, logged unchanged as a feature
    from keel.logformat import feature_blob
    from keel.logformat import row_json as dumps  # the service's own text (floats below 1e-4 included)
    for i in range(n):
        f = dict(zip(features, feats[i].tolist(), strict=True))
        inputs = {"transaction_id": i, "tx_datetime": times[i], "customer_id": customer[i],
                  "terminal_id": terminal[i], "tx_amount": amount[i]}
        s = float(scores[i])
        decision = "review" if s > 0.1 else "approve"
        record = {"request_id": f"r{i}", "item": 0, "time": None,
                  "event_time": None, "event_id": i, "endpoint": "predict", "inputs": inputs, "features": f,
                  "score": s, "decision": decision, "model_version": "1", "fallback": False,
                  "fallback_reason": None, "stale": False, "latency_ms": float(lat[i])}
        yield record, (f"r{i}", 0, times[i], times[i], str(i), "predict", dumps(inputs), dumps(f), s, decision, "1", 0,
                       None, 0, float(lat[i]), feature_blob(features, f), feature_set)


def _write_log(path: Path, cur: pd.DataFrame, features: list[str], label_delay: timedelta) -> None:
    """The bench's log, in bulk: the service's schema, rows and columnar segments (write batches of ``WRITE_BATCH``
    rows, the service's default group commit, through its own ``write_rows`` and ``SegmentBuffer``; rows checked
    against its row function on the first 1000), then labels for the events whose delay has passed by the end of the period
    (through its ``write_labels``)."""
    from keel.logformat import feature_blob, feature_set_id
    from keel.serve.predlog import (
        PREDICTION_COLUMNS,
        SEGMENT_ROWS,
        SegmentBuffer,
        _prediction_row,
        connect,
        write_labels,
        write_rows,
    )

    tmp = path.with_suffix(".partial")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    db = connect(tmp)
    feature_set = feature_set_id(db, features)
    k = len(PREDICTION_COLUMNS)
    db.execute("begin")
    batch: list[tuple] = []
    inputs: list[dict] = []
    segments = SegmentBuffer(SEGMENT_ROWS)
    for i, (record, row) in enumerate(_records(cur, features, feature_set)):
        if i < 1000:
            record["time"] = record["event_time"] = cur["event_time"].iat[i]
            if _prediction_row(record)[:k] != row[:k] or row[k] != feature_blob(list(record["features"]),
                                                                                  record["features"]):
                raise SystemExit(f"bench row {i} differs from what the service writes:\n{_prediction_row(record)}\n{row}")
        batch.append(row)
        inputs.append(record["inputs"])
        if len(batch) == WRITE_BATCH:
            write_rows(db, batch, inputs, segments)
            segments.commit()
            batch, inputs = [], []
    if batch:
        write_rows(db, batch, inputs, segments)
    segments.stage_flush(db)  # what the service does at shutdown
    segments.commit()
    db.execute("commit")
    end = cur["event_time"].max()
    known = cur["event_time"] + label_delay <= end
    rng = np.random.default_rng(2)
    y = rng.random(len(cur)) < cur["score"].to_numpy()
    at = (cur["event_time"] + label_delay).dt.strftime("%Y-%m-%dT%H:%M:%S.%f").to_numpy()
    db.execute("begin")
    write_labels(db, [(str(i), float(y[i]), at[i], at[i]) for i in np.flatnonzero(known.to_numpy()).tolist()])
    db.execute("commit")
    db.close()
    os.replace(tmp, path)


def _write_blob_log(path: Path, source: Path) -> None:
    """The previous format: the same rows with their feature blobs, without the columnar segments."""
    import shutil
    import sqlite3

    tmp = path.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    db = sqlite3.connect(tmp)
    for ddl in ("drop table prediction_segments", "drop table label_rows", "drop index labels_by_at"):
        db.execute(ddl)
    db.execute("vacuum")
    db.close()
    os.replace(tmp, path)


def _write_segment_only_log(path: Path, source: Path) -> None:
    """The same log as the service stores ``/v1/predict/batch`` answers by default (``serving.log_batch_segments``):
    every columnar segment holds its rows alone, with no row in ``predictions`` and no label rows (labels are
    matched at read time): ``keel log pack`` of a copy, each segment's rows checked against the rows they
    replace."""
    import shutil
    import sqlite3

    from keel.serve.predlog import pack_segments

    tmp = path.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    packed = pack_segments(tmp)
    db = sqlite3.connect(tmp)
    (left,) = db.execute("select count(*) from predictions").fetchone()
    if left or packed.mismatched or packed.incomplete:
        raise SystemExit(f"the bench log did not pack whole: {left} rows left, {packed}")
    db.execute("vacuum")
    db.close()
    os.replace(tmp, path)


def _write_json_log(path: Path, source: Path) -> None:
    """An old log: the same rows without the binary feature column (as written before it existed)."""
    import shutil
    import sqlite3

    tmp = path.with_suffix(".partial")
    shutil.copyfile(source, tmp)
    db = sqlite3.connect(tmp)
    for column in ("features_f64", "feature_set"):
        db.execute(f"alter table predictions drop column {column}")
    db.execute("drop table feature_sets")
    db.execute("vacuum")
    db.close()
    os.replace(tmp, path)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(state: Path, features: int):  # type: ignore[no-untyped-def]
    from keel.spec import parse_spec

    return parse_spec({
        "project": {"name": "bench", "state_dir": str(state)},
        "decision": {"question": "review?", "positive_class": "fraud", "positive_action": "review",
                     "negative_action": "approve", "capacity": {"max_positives": 100},
                     "costs": {"false_negative": "tx_amount", "false_positive": 2.0, "true_positive": 2.0},
                     "precision_at_k": {"entity": "customer_id", "k": 100, "per": "1d"}},
        "data": {"source": "x.parquet", "timestamp": "t", "label": "y", "label_delay": "7d"},
        "monitoring": {"skew_sample": 0, "triggers": [
            {"name": "any drift", "metric": "psi", "feature": "*", "above": 0.2, "windows": 2}]},
        "features": {"raw": ["tx_amount"]},
    }, root=state)


def _timed(fn):  # type: ignore[no-untyped-def]
    """(result, wall seconds, CPU seconds of the whole process, every thread included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_engine(engine: str, rows: int, features: int, work: Path) -> dict:
    from keel.monitor.profile import build_profile

    ref, cur = _data(rows, features, current=not engine.startswith("keel-log"))
    names = feature_names(features)
    base_rss = _peak_mb()
    load = os.getloadavg()[0]
    if engine == "keel-table":
        from keel.monitor.drift import DriftAccumulator

        prof = build_profile(ref[names], ref["score"], bins=10)

        def table() -> list:
            acc = DriftAccumulator(prof, timedelta(days=1))
            for start in range(0, rows, 200_000):
                acc.update(cur.iloc[start:start + 200_000])
            return acc.results()

        res, seconds, cpu = _timed(table)
        drifted = sorted({c for w in res for c, v in w.columns.items() if v.psi > 0.2})
        return {"engine": engine, "seconds": seconds, "cpu_seconds": cpu, "load": load, "windows": len(res),
                "drifted": drifted, "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss}
    if engine in LOGS:
        from keel.monitor.triggers import run_monitor

        prof = build_profile(ref[names], ref["score"], bins=10, model="bench", version=1)
        del ref, cur
        base_rss = _peak_mb()
        spec = _spec(work / "state", features)
        log = work / LOGS[engine]
        result, seconds, cpu = _timed(lambda: run_monitor(spec, log_path=log, profile=prof, out_dir=work / engine,
                                                          skew=False))
        labelled = sum(p.labelled for p in result.performance)
        return {"engine": engine, "seconds": seconds, "cpu_seconds": cpu, "load": load, "rows": result.rows,
                "windows": len(result.drift), "labelled": labelled, "level": result.level,
                "fired": [f.name for f in result.fired], "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss}
    if engine == "evidently":
        import evidently
        from evidently import Report
        from evidently.presets import DataDriftPreset

        cols = [*names, "score"]
        snapshot, seconds, cpu = _timed(
            lambda: Report([DataDriftPreset()]).run(current_data=cur[cols], reference_data=ref[cols]))
        text = json.dumps(snapshot.dict(), default=str)
        return {"engine": engine, "version": evidently.__version__, "seconds": seconds, "cpu_seconds": cpu,
                "load": load, "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss, "bytes": len(text)}
    raise SystemExit(f"unknown engine {engine}")


LOGS = {"keel-log": "predictions.sqlite", "keel-log-segments": "predictions-segments.sqlite",
        "keel-log-blob": "predictions-blob.sqlite", "keel-log-json": "predictions-json.sqlite"}


def _child(engine: str, rows: int, features: int, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--engine", engine, "--rows", str(rows), "--features",
                          str(features), "--work", str(work)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"engine": engine, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


GOAL_SECONDS = 5.0
GOAL_SPEEDUP = 50.0


def _markdown(rows: int, features: int, results: list[dict], log_note: str, load: tuple[float, ...]) -> str:
    by = {r["engine"]: r for r in results}
    ev = by.get("evidently", {})
    lines = [
        "## Monitoring",
        "",
        f"{rows:,} logged predictions x {features} features + score, {DAYS} daily windows, against a "
        f"{REF_ROWS:,}-row reference; {os.cpu_count()} cores; load average at start {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1/5/15 min). `python bench/bench_monitor.py` ({datetime.now():%Y-%m-%d}). "
        "Each engine in its own process; CPU is the process's CPU time (all threads), wall is elapsed time; peak "
        "RSS is that process's ('data' is the RSS before the engine starts: the frames, or the profile alone "
        "for keel-log, which reads the log from disk).",
        "",
        "| engine | what | wall (s) | CPU (s) | load at start | peak RSS (MB) | data (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    what = {"keel-table": "PSI, KS, chi², JS, missing, range per feature and score, per day (in-memory table)",
            "keel-log": "`run_monitor` end to end from the SQLite log: drift, performance with delayed labels "
                        "(AP, Card Precision@100 by the `customer_id` input, cost from the `tx_amount` raw feature as in "
                        "examples/card-fraud), operations, triggers, monitor.json/.html; read from the log's columnar "
                        "segments",
            "keel-log-segments": "the same on the log as the service stores batch answers by default "
                                 "(`serving.log_batch_segments`): columnar segments only, no row per prediction, "
                                 "labels matched at read time",
            "keel-log-blob": "the same on a log of the previous format (rows with the binary feature column, no "
                             "columnar segments)",
            "keel-log-json": "the same on an old log without the binary feature column (features parsed from "
                             "the JSON text)",
            "evidently": f"Evidently {ev.get('version', '')} `DataDriftPreset` on the same frames"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {what.get(r['engine'], '')} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['engine']} | {what[r['engine']]} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                     f"{r['load']:.2f} | {r['peak_rss_mb']:.0f} | {r['data_rss_mb']:.0f} |")
    lines.append("")
    kl = by.get("keel-log", {}).get("seconds")
    if kl:
        klc = by["keel-log"]["cpu_seconds"]
        lines.append(f"- Goal: the log end to end in <= {GOAL_SECONDS:g} s on 2 cores: **{kl:.2f} s** wall "
                     f"({'met' if kl <= GOAL_SECONDS else 'not met'}; {kl / GOAL_SECONDS:.2f}x the budget), "
                     f"{klc:.2f} s CPU ({'met' if klc <= GOAL_SECONDS else 'not met'} by CPU).")
    ks = by.get("keel-log-segments", {}).get("seconds")
    if ks:
        ksc = by["keel-log-segments"]["cpu_seconds"]
        lines.append(f"- The same goal on the segment-only log (batch answers as the service stores them): **{ks:.2f} s** "
                     f"wall ({'met' if ks <= GOAL_SECONDS else 'not met'}), {ksc:.2f} s CPU.")
        keys = ("rows", "windows", "labelled", "level", "fired")
        same = all(by["keel-log-segments"].get(k) == by.get("keel-log", {}).get(k) for k in keys)
        lines.append(f"  It read {'the same' if same else '**not the same**'} rows, windows, labelled rows, level and "
                     "fired triggers as keel-log.")
    if ev.get("seconds"):
        for name in ("keel-table", *LOGS):
            t = by.get(name, {}).get("seconds")
            if t:
                x, xc = ev["seconds"] / t, ev["cpu_seconds"] / by[name]["cpu_seconds"]
                if name == "keel-table":  # the goal's comparison: the same frames in memory, drift only
                    lines.append(f"- Goal: >= {GOAL_SPEEDUP:g}x Evidently's preset on the same data: {name} "
                                 f"**{x:.1f}x** by wall ({'met' if x >= GOAL_SPEEDUP else 'not met'}), "
                                 f"**{xc:.1f}x** by CPU ({'met' if xc >= GOAL_SPEEDUP else 'not met'}).")
                else:
                    lines.append(f"- For scale, not the goal's comparison: {name} reads the log from disk and also "
                                 f"computes performance and operations, while Evidently gets the frames in memory "
                                 f"and computes drift only: {x:.1f}x Evidently by wall, {xc:.1f}x by CPU.")
    kl_r = by.get("keel-log", {})
    if kl_r.get("rows"):
        lines.append(f"- keel-log read {kl_r['rows']:,} rows in {kl_r['windows']} windows, {kl_r['labelled']:,} "
                     f"with a known label; level {kl_r['level']} (fired: {', '.join(kl_r['fired']) or 'none'}).")
    lines += ["", f"{log_note} The reference profile is computed once per model version and stored; it is not part "
                  "of the timings."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=15)
    ap.add_argument("--engine")
    ap.add_argument("--work", help="folder for the log and outputs; the log there is reused when its size matches")
    ap.add_argument("--no-evidently", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section without updating RESULTS.md")
    ap.add_argument("--write-results", action="store_true", help=argparse.SUPPRESS)  # the default now
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.rows, args.features, Path(args.work)), default=str))
        return
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        log = work / "predictions.sqlite"
        meta = work / "predictions.json"
        want = {"rows": args.rows, "features": args.features, "format": 8}
        if log.exists() and meta.exists() and json.loads(meta.read_text()) == want:
            log_note = "The log was reused from an earlier run (built in bulk, not timed)."
        else:
            _, cur = _data(args.rows, args.features)
            t0 = time.perf_counter()
            _write_log(log, cur, feature_names(args.features), timedelta(days=7))
            _write_segment_only_log(work / LOGS["keel-log-segments"], log)
            _write_blob_log(work / "predictions-blob.sqlite", log)
            _write_json_log(work / "predictions-json.sqlite", work / "predictions-blob.sqlite")
            meta.write_text(json.dumps(want))
            log_note = (f"Writing the log in bulk (the service's rows, feature blobs and segments through its write_rows, "
                        "rows checked against its row function and feature_blob; a copy whose segments hold their rows "
                        "alone; the previous-format copy without segments; the old-format copy without the binary column) took "
                        f"{time.perf_counter() - t0:.0f} s (not counted).")
            del cur
        engines = ["keel-table", *LOGS] + ([] if args.no_evidently else ["evidently"])
        results = []
        for engine in engines:
            r = _child(engine, args.rows, args.features, work)
            results.append(r)
            sys.stdout.write(json.dumps(r, default=str) + "\n")
            sys.stdout.flush()
        text = _markdown(args.rows, args.features, results, log_note, load)
        sys.stdout.write(text + "\n")
        if not args.no_write:
            sys.path.insert(0, str(HERE))
            from results import write_section

            write_section("monitor", text)


if __name__ == "__main__":
    main()
