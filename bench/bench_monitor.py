"""Monitoring speed: 1 M logged predictions x 15 features against a reference profile, vs Evidently's preset.

Each engine runs in its own process (so peak RSS is its own):

* ``keel-table``  — drift of the 1 M-row table (``DriftAccumulator``: PSI, KS, chi², JS, missing and range per
  feature and the score, per day), fed in 200 k-row batches;
* ``keel-log``    — ``run_monitor`` end to end on the SQLite prediction log (drift + performance + operations +
  triggers + monitor.json/.html), streamed from disk;
* ``evidently``   — Evidently's ``DataDriftPreset`` on the same reference and current frames (when installed).

Usage: ``python bench/bench_monitor.py [--rows 1000000] [--features 15] [--no-evidently] [--write-results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
DAYS = 10
REF_ROWS = 200_000


def _data(rows: int, features: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)

    def frame(n: int, shift: float) -> pd.DataFrame:
        cols = {}
        for j in range(features):
            if j % 3 == 0:
                cols[f"f{j}"] = rng.gamma(2, 30, n) * (1 + shift)
            elif j % 3 == 1:
                cols[f"f{j}"] = rng.poisson(5 + 3 * shift, n).astype(float)
            else:
                cols[f"f{j}"] = rng.normal(shift, 1, n)
        cols["score"] = np.clip(rng.beta(1, 30, n) * (1 + shift), 0, 1)
        return pd.DataFrame(cols)

    ref = frame(REF_ROWS, 0.0)
    cur = frame(rows, 0.0)
    late = np.arange(rows) >= rows // 2  # the second half of the period drifts
    cur.loc[late, "f0"] *= 1.4
    cur.loc[late, "f2"] += 0.3
    cur["event_time"] = pd.Timestamp("2018-09-01") + pd.to_timedelta(np.linspace(0, DAYS * 86400 - 1, rows), "s")
    return ref, cur


def _write_log(path: Path, cur: pd.DataFrame, features: list[str]) -> None:
    from keel.serve.predlog import PREDICTION_COLUMNS, connect

    db = connect(path)
    times = cur["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f").to_numpy()
    feats = cur[features].to_numpy()
    scores = cur["score"].to_numpy()
    rng = np.random.default_rng(1)
    lat = rng.gamma(2, 2, len(cur))
    sql = f"insert into predictions ({', '.join(PREDICTION_COLUMNS)}) values ({', '.join('?' * len(PREDICTION_COLUMNS))})"
    batch = []
    for i in range(len(cur)):
        f = json.dumps(dict(zip(features, feats[i].tolist(), strict=True)), separators=(",", ":"))
        batch.append((f"r{i}", 0, times[i], times[i], str(i), "predict", "{}", f, float(scores[i]),
                      "review" if scores[i] > 0.1 else "approve", "1", 0, None, 0, float(lat[i])))
        if len(batch) == 100_000:
            db.executemany(sql, batch)
            batch = []
    if batch:
        db.executemany(sql, batch)
    db.close()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(state: Path, features: int):  # type: ignore[no-untyped-def]
    from keel.spec import parse_spec

    return parse_spec({
        "project": {"name": "bench", "state_dir": str(state)},
        "decision": {"question": "review?", "positive_class": "fraud", "capacity": {"max_positives": 100}},
        "data": {"source": "x.parquet", "timestamp": "t", "label": "y", "label_delay": "7d"},
        "monitoring": {"skew_sample": 0, "triggers": [
            {"name": "any drift", "metric": "psi", "feature": "*", "above": 0.2, "windows": 2}]},
    }, root=state)


def run_engine(engine: str, rows: int, features: int, work: Path) -> dict:
    from keel.monitor.profile import build_profile

    ref, cur = _data(rows, features)
    names = [f"f{j}" for j in range(features)]
    base_rss = _peak_mb()
    if engine == "keel-table":
        from keel.monitor.drift import DriftAccumulator

        t0 = time.perf_counter()
        prof = build_profile(ref[names], ref["score"], bins=10)
        t_prof = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = DriftAccumulator(prof, timedelta(days=1))
        for start in range(0, rows, 200_000):
            acc.update(cur.iloc[start:start + 200_000])
        res = acc.results()
        seconds = time.perf_counter() - t0
        drifted = sorted({c for w in res for c, v in w.columns.items() if v.psi > 0.2})
        return {"engine": engine, "seconds": seconds, "profile_seconds": t_prof, "windows": len(res),
                "drifted": drifted, "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss}
    if engine == "keel-log":
        from keel.monitor.triggers import run_monitor

        log = work / "predictions.sqlite"
        prof = build_profile(ref[names], ref["score"], bins=10, model="bench", version=1)
        del ref, cur
        t0 = time.perf_counter()
        result = run_monitor(_spec(work / "state", features), log_path=log, profile=prof, out_dir=work / "out",
                             skew=False)
        seconds = time.perf_counter() - t0
        return {"engine": engine, "seconds": seconds, "rows": result.rows, "windows": len(result.drift),
                "level": result.level, "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss}
    if engine == "evidently":
        import evidently
        from evidently import Report
        from evidently.presets import DataDriftPreset

        cur_frame = cur[[*names, "score"]]
        t0 = time.perf_counter()
        snapshot = Report([DataDriftPreset()]).run(current_data=cur_frame, reference_data=ref[[*names, "score"]])
        seconds = time.perf_counter() - t0
        text = json.dumps(snapshot.dict(), default=str)
        return {"engine": engine, "version": evidently.__version__, "seconds": seconds,
                "peak_rss_mb": _peak_mb(), "data_rss_mb": base_rss, "bytes": len(text)}
    raise SystemExit(f"unknown engine {engine}")


def _child(engine: str, rows: int, features: int, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--engine", engine, "--rows", str(rows), "--features",
                          str(features), "--work", str(work)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"engine": engine, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _markdown(rows: int, features: int, results: list[dict], write_seconds: float) -> str:
    by = {r["engine"]: r for r in results}
    ev = by.get("evidently", {})
    lines = [
        "## Monitoring",
        "",
        f"{rows:,} logged predictions x {features} features + score, {DAYS} daily windows, against a "
        f"{REF_ROWS:,}-row reference; {os.cpu_count()} cores. `python bench/bench_monitor.py --write-results` "
        f"({datetime.now():%Y-%m-%d}). Each engine in its own process; peak RSS is that process's (the input "
        "frames alone take the 'data' figure).",
        "",
        "| engine | what | seconds | peak RSS (MB) | data (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    what = {"keel-table": "PSI, KS, chi², JS, missing, range per feature and score, per day (in-memory table)",
            "keel-log": "`run_monitor` end to end from the SQLite log (drift, performance, operations, triggers, "
                        "HTML)",
            "evidently": f"Evidently {ev.get('version', '')} `DataDriftPreset` on the same frames"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | {what.get(r['engine'], '')} | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['engine']} | {what[r['engine']]} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['data_rss_mb']:.0f} |")
    kt = by.get("keel-table", {}).get("seconds")
    if kt and ev.get("seconds"):
        lines += ["", f"Speed-up on the same data: **{ev['seconds'] / kt:.0f}x** (table) and "
                      f"**{ev['seconds'] / by['keel-log']['seconds']:.1f}x** (from the log, everything included)."]
    lines += ["", f"Writing the 1 M-row log itself took {write_seconds:.0f} s (not counted). The reference profile is "
                  "computed once per model version and stored; it is not part of the timings."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=15)
    ap.add_argument("--engine")
    ap.add_argument("--work")
    ap.add_argument("--no-evidently", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.rows, args.features, Path(args.work)), default=str))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, cur = _data(args.rows, args.features)
        t0 = time.perf_counter()
        _write_log(work / "predictions.sqlite", cur, [f"f{j}" for j in range(args.features)])
        write_seconds = time.perf_counter() - t0
        del cur
        engines = ["keel-table", "keel-log"] + ([] if args.no_evidently else ["evidently"])
        results = []
        for engine in engines:
            r = _child(engine, args.rows, args.features, work)
            results.append(r)
            sys.stdout.write(json.dumps(r, default=str) + "\n")
            sys.stdout.flush()
        text = _markdown(args.rows, args.features, results, write_seconds)
        sys.stdout.write(text + "\n")
        if args.write_results:
            block = f"<!-- monitor:start -->\n{text}\n<!-- monitor:end -->"
            old = RESULTS.read_text() if RESULTS.exists() else ""
            pattern = re.compile(r"<!-- monitor:start -->.*?<!-- monitor:end -->", re.S)
            new = pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
            RESULTS.write_text(new)


if __name__ == "__main__":
    main()
