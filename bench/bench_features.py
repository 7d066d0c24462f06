"""Bench: the flagship 15 features on the published 1,754,155 transactions, side by side with their anchors.

Run: ``python bench/bench_features.py`` (``--no-write`` to leave bench/RESULTS.md alone). Needs
``../shared/data/fraud-handbook/simulated_raw_2018-04-01_2018-09-30.parquet`` (or ``KEEL_REFERENCE_DIR``);
without it, says so and exits 0.

1. Keel offline: read Parquet (DuckDB) -> ``compute_features`` -> 15 features in memory (best of 3).
2. ``keel features build`` out-of-core: the same 15 features streamed in time-ordered chunks into a Parquet
   table (one chunk, and ``--chunk-rows`` chunks), to show what chunking costs.
3. A hand-written DuckDB query with ``RANGE`` window frames for the same 15 features, into pandas (best of 3).
4. pandas, handbook style: per-customer ``groupby(...).apply`` of a function that sorts and rolls (customer
   windows only: 6 features).
5. pandas ``groupby().rolling()`` (customer windows only).
6. Feast's local offline store, ``get_historical_features(...).to_df()``, in its own process and its own venv
   (``bench/.feast-venv``, created here with ``pip install feast==FEAST_VERSION`` when missing: Feast's pins
   must not touch the project's). Feast has no sliding windows, so it is given what a Feast user would
   precompute in a batch job: one feature view per entity holding the 12 window features at each of that
   entity's transactions (computed by Keel beforehand, outside Feast's time), plus an on-demand feature view
   for the 3 row features. Feast then does the point-in-time join for every transaction. Keel's figure it is
   compared with computes all 15 from the raw columns, so the comparison favours Feast. On a subset
   (``--feast-rows``) the ratio is per row.
7. Keel online: ``OnlineStore.features(event)`` latency per event, store warm (state replayed for the
   preceding 40 days), labels fed when due; p50/p99 over the next events.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEAST_VERSION = "0.67.0"
# Feast's file offline store (dask) held 10 GB for 400,000 rows and grew faster than linearly (50k rows: 2.5 s CPU,
# 400k: 127 s), so all 1,754,155 would not fit a 23 GB shared machine: it joins subsets, the ratio per row, which
# flatters Feast (its time per row grows with the rows).
FEAST_ROWS = "50000,200000"


def feast_worker(workdir: Path) -> None:
    """Runs under bench/.feast-venv: register the feature views, time ``get_historical_features``, save the rows.

    Reads ``entity.parquet``, ``customer.parquet``, ``terminal.parquet`` and ``meta.json`` from ``workdir``;
    writes ``feast_out.parquet`` (transaction_id + Keel's feature names) and ``feast_result.json``.
    """
    import warnings

    warnings.filterwarnings("ignore")
    from datetime import timedelta

    import feast
    import pandas as pd
    from feast import (
        Entity,
        FeatureStore,
        FeatureView,
        Field,
        FileSource,
        RepoConfig,
        RequestSource,
        ValueType,
    )
    from feast.on_demand_feature_view import on_demand_feature_view
    from feast.types import Float64, Int64, UnixTimestamp

    meta = json.loads((workdir / "meta.json").read_text())
    views = []
    features = []
    entities = []
    for entity, columns in meta["windows"].items():
        ent = Entity(name=entity, join_keys=[entity], value_type=ValueType.INT64)
        view = FeatureView(
            name=f"{entity}_windows",
            entities=[ent],
            ttl=timedelta(days=365),
            schema=[Field(name=entity, dtype=Int64)] + [Field(name=c, dtype=Float64) for c in columns],
            source=FileSource(path=str(workdir / f"{entity}.parquet"), timestamp_field="event_timestamp"),
            online=False,
        )
        entities.append(ent)
        views.append(view)
        features += [f"{entity}_windows:{c}" for c in columns]
    request = RequestSource(
        name="transaction",
        schema=[Field(name="tx_amount", dtype=Float64), Field(name="tx_datetime", dtype=UnixTimestamp)],
    )

    @on_demand_feature_view(
        sources=[request],
        schema=[
            Field(name="amount", dtype=Float64),
            Field(name="tx_during_weekend", dtype=Int64),
            Field(name="tx_during_night", dtype=Int64),
        ],
        mode="pandas",
    )
    def row_features(inputs):  # type: ignore[no-untyped-def]  # Feast re-executes the source: imports inside
        import pandas as pd

        t = pd.to_datetime(inputs["tx_datetime"])
        return pd.DataFrame(
            {
                "amount": inputs["tx_amount"].astype("float64"),
                "tx_during_weekend": (t.dt.weekday >= 5).astype("int64"),
                "tx_during_night": (t.dt.hour <= 6).astype("int64"),
            }
        )

    features += ["row_features:amount", "row_features:tx_during_weekend", "row_features:tx_during_night"]
    config = RepoConfig(
        project="keel_bench",
        registry=str(workdir / "registry.db"),
        provider="local",
        offline_store={"type": "file"},
        online_store={"type": "sqlite", "path": str(workdir / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(workdir),
    )
    store = FeatureStore(config=config)
    store.apply([*entities, *views, row_features])
    entity_df = pd.read_parquet(workdir / "entity.parquet")
    load = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    out = store.get_historical_features(entity_df=entity_df, features=features).to_df()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = out.rename(columns={"amount": "tx_amount_feature"})
    keep = ["transaction_id", "tx_amount_feature", "tx_during_weekend", "tx_during_night"]
    keep += [c for cols in meta["windows"].values() for c in cols]
    out[keep].to_parquet(workdir / "feast_out.parquet", index=False)
    result = {"wall": wall, "cpu": cpu, "rows": len(out), "load": load, "feast": feast.__version__}
    (workdir / "feast_result.json").write_text(json.dumps(result))


if __name__ == "__main__" and sys.argv[1:2] == ["--feast-worker"]:
    feast_worker(Path(sys.argv[2]))  # under the Feast venv: nothing below (DuckDB, Keel) is importable there
    sys.exit(0)

import duckdb  # noqa: E402 (the Feast worker above must not import it)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from keel.features.definitions import feature_names, resolve_definitions  # noqa: E402
from keel.features.offline import compute_features  # noqa: E402
from keel.features.online import OnlineStore  # noqa: E402
from keel.spec import load_spec  # noqa: E402

RESULTS = HERE / "RESULTS.md"
START, END = "<!-- features:start -->", "<!-- features:end -->"
COMMAND = "python bench/bench_features.py"
FLAGSHIP = HERE.parent / "examples" / "card-fraud" / "keel.toml"
RAW_FILE = "simulated_raw_2018-04-01_2018-09-30.parquet"
SELECT = (
    "select TRANSACTION_ID as transaction_id, TX_DATETIME as tx_datetime, CUSTOMER_ID as customer_id,"
    " TERMINAL_ID as terminal_id, TX_AMOUNT as tx_amount, TX_FRAUD as tx_fraud from read_parquet(?)"
)


def reference_file() -> Path:
    override = os.environ.get("KEEL_REFERENCE_DIR")
    folder = Path(override) if override else HERE.parents[1] / "shared" / "data" / "fraud-handbook"
    return folder / RAW_FILE


def read(path: Path) -> pd.DataFrame:
    con = duckdb.connect()
    try:
        return con.execute(SELECT, [str(path)]).df()
    finally:
        con.close()


def keel_offline(path: Path, defs: list) -> pd.DataFrame:  # type: ignore[type-arg]
    frame = read(path)
    return compute_features(
        frame, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id"
    )


def duckdb_range(path: Path) -> pd.DataFrame:
    """The same features as window frames; (t - n, t] as RANGE ... n days - 1 microsecond PRECEDING."""

    def frame(entity: str, days: int, delay: int = 0) -> str:
        start = f"interval '{(days + delay) * 86_400_000_000 - 1} microseconds' preceding"
        end = "current row" if delay == 0 else f"interval '{delay} days' preceding"
        return f"over (partition by {entity} order by tx_datetime range between {start} and {end})"

    cols = [
        "tx_amount",
        "cast(isodow(tx_datetime) >= 6 as int) as tx_during_weekend",
        "cast(hour(tx_datetime) <= 6 as int) as tx_during_night",
    ]
    for n in (1, 7, 30):
        cols.append(f"count(*) {frame('customer_id', n)} as customer_id_nb_tx_{n}day_window")
    for n in (1, 7, 30):
        cols.append(f"avg(tx_amount) {frame('customer_id', n)} as customer_id_avg_amount_{n}day_window")
    for n in (1, 7, 30):
        cols.append(f"count(tx_fraud) {frame('terminal_id', n, 7)} as terminal_id_nb_tx_{n}day_window")
    for n in (1, 7, 30):
        cols.append(
            f"coalesce(sum(tx_fraud) {frame('terminal_id', n, 7)} / nullif(count(tx_fraud) {frame('terminal_id', n, 7)}, 0), 0)"
            f" as terminal_id_risk_{n}day_window"
        )
    sql = f"select transaction_id, {', '.join(cols)} from read_parquet(?) order by transaction_id"
    con = duckdb.connect()
    try:
        con.execute("set threads to 2")
        return con.execute(sql.replace("read_parquet(?)", f"({SELECT})"), [str(path)]).df()
    finally:
        con.close()


def _customer_rolling(group: pd.DataFrame) -> pd.DataFrame:
    group = group.sort_values("tx_datetime")
    rolled = group.set_index("tx_datetime")["tx_amount"]
    out = group.copy()
    for n in (1, 7, 30):
        total = rolled.rolling(f"{n}d").sum()
        count = rolled.rolling(f"{n}d").count()
        out[f"customer_id_nb_tx_{n}day_window"] = count.to_numpy()
        out[f"customer_id_avg_amount_{n}day_window"] = (total / count).to_numpy()
    return out


def pandas_apply(frame: pd.DataFrame) -> pd.DataFrame:
    return (
        frame.groupby("customer_id", group_keys=False)
        .apply(_customer_rolling, include_groups=False)
        .sort_values("transaction_id")
    )


def pandas_rolling(frame: pd.DataFrame) -> pd.DataFrame:
    indexed = frame.sort_values("tx_datetime", kind="stable").set_index("tx_datetime")
    grouped = indexed.groupby("customer_id")["tx_amount"]
    out = {}
    for n in (1, 7, 30):
        rolled = grouped.rolling(f"{n}d")
        out[f"customer_id_nb_tx_{n}day_window"] = rolled.count().to_numpy()
        out[f"customer_id_avg_amount_{n}day_window"] = rolled.mean().to_numpy()
    return pd.DataFrame(out)


def online_latency(frame: pd.DataFrame, defs: list, warm_days: int = 40, measured: int = 20_000) -> dict:  # type: ignore[type-arg]
    frame = frame.sort_values("tx_datetime", kind="stable").reset_index(drop=True)
    start = frame["tx_datetime"].iloc[0] + pd.Timedelta(days=warm_days)
    warm_n = int(np.searchsorted(frame["tx_datetime"].to_numpy(), start.to_datetime64()))
    rows = frame.iloc[: warm_n + measured].to_dict("records")
    due = list(
        zip(
            frame["tx_datetime"] + pd.Timedelta(days=7),
            frame["transaction_id"],
            frame["tx_fraud"],
            strict=True,
        )
    )
    due.sort(key=lambda x: x[0])
    latencies: list[int] = []
    cpu: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = OnlineStore(
            Path(tmp) / "online.sqlite",
            defs,
            timestamp="tx_datetime",
            label="tx_fraud",
            id_column="transaction_id",
            freshness=pd.Timedelta(days=30).to_pytimedelta(),
        )
        k = 0
        t_warm = time.perf_counter()
        with store.transaction():  # warm-up: the preceding days, labels as they come due, one transaction
            for event in rows[:warm_n]:
                while k < len(due) and due[k][0] <= event["tx_datetime"]:
                    store.add_label(due[k][1], due[k][2], due[k][0])
                    k += 1
                store.update(event)
        warm_seconds = time.perf_counter() - t_warm
        for event in rows[warm_n:]:
            with store.transaction():
                while k < len(due) and due[k][0] <= event["tx_datetime"]:
                    store.add_label(due[k][1], due[k][2], due[k][0])
                    k += 1
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            store.features(event)
            latencies.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
            store.update(event)
        store.close()
    lat = np.asarray(latencies) / 1e6
    cpu_ms = np.asarray(cpu) / 1e6
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "cpu_p50": float(np.percentile(cpu_ms, 50)),
        "cpu_p99": float(np.percentile(cpu_ms, 99)),
        "n": len(lat),
        "warm_events": warm_n,
        "warm_seconds": warm_seconds,
    }


FEAST_VENV = HERE / ".feast-venv"


def feast_python() -> tuple[Path | None, str]:
    """The Feast venv's interpreter, created (``venv`` + ``pip install feast==FEAST_VERSION``) when missing.

    Returns ``(None, why)`` when Feast cannot be installed here (no registry access, wheels that conflict...).
    """
    python = FEAST_VENV / "bin" / "python"
    probe = [str(python), "-c", f"import feast; assert feast.__version__ == {FEAST_VERSION!r}, feast.__version__"]

    def ready() -> bool:
        return python.exists() and subprocess.run(probe, capture_output=True).returncode == 0

    if ready():
        return python, ""
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in (
        [base, "-m", "venv", str(FEAST_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", f"feast=={FEAST_VERSION}"],
    ):
        print(f"Setting up Feast: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return None, f"`{' '.join(cmd[-3:])}` failed: {tail}"
    if not ready():
        return None, "feast installed but does not import: " + subprocess.run(probe, capture_output=True, text=True).stderr[-300:]
    return python, ""


def feast_offline(python: Path, keel: pd.DataFrame, frame: pd.DataFrame, names: list[str], rows: int) -> dict:  # type: ignore[type-arg]
    """Time Feast's ``get_historical_features`` on the first ``rows`` transactions (in time) in its own process.

    Feast gets the 12 window features Keel computed, as one feature table per entity (a row per transaction),
    and computes the 3 row features itself (on-demand view). Returns timings and the max abs difference of
    Feast's rows from Keel's on every feature.
    """
    subset = frame.sort_values(["tx_datetime", "transaction_id"], kind="stable").iloc[:rows].reset_index(drop=True)
    feats = keel.set_index("transaction_id").loc[subset["transaction_id"]].reset_index()
    ts = pd.DatetimeIndex(subset["tx_datetime"]).tz_localize("UTC")
    windows = {e: [n for n in names if n.startswith(f"{e}_")] for e in ("customer_id", "terminal_id")}
    with tempfile.TemporaryDirectory(prefix="keel-feast-") as tmp:
        work = Path(tmp)
        for entity, columns in windows.items():
            table = pd.DataFrame({entity: subset[entity].to_numpy(), "event_timestamp": ts})
            for c in columns:
                table[c] = feats[c].to_numpy()
            table.to_parquet(work / f"{entity}.parquet", index=False)
        entity_df = pd.DataFrame(
            {
                "transaction_id": subset["transaction_id"].to_numpy(),
                "customer_id": subset["customer_id"].to_numpy(),
                "terminal_id": subset["terminal_id"].to_numpy(),
                "event_timestamp": ts,
                "tx_amount": subset["tx_amount"].to_numpy(dtype=float),
                "tx_datetime": ts,
            }
        )
        entity_df.to_parquet(work / "entity.parquet", index=False)
        (work / "meta.json").write_text(json.dumps({"windows": windows}))
        proc = subprocess.run(
            [str(python), str(Path(__file__).resolve()), "--feast-worker", str(work)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return {"error": " / ".join(proc.stderr.strip().splitlines()[-3:])}
        result = json.loads((work / "feast_result.json").read_text())
        out = pd.read_parquet(work / "feast_out.parquet").rename(columns={"tx_amount_feature": "tx_amount"})
    # Feast's answer can miss entity rows (it drops duplicate entity rows); those count as missing, not as diffs.
    out = out.drop_duplicates("transaction_id").set_index("transaction_id").reindex(feats["transaction_id"])
    found = out[names[0]].notna().to_numpy() | out[names[-1]].notna().to_numpy()
    diffs = {n: np.abs(out[n].to_numpy(dtype=float) - feats[n].to_numpy(dtype=float))[found] for n in names}
    result["max_diff"] = max(float(np.nanmax(d)) if len(d) else 0.0 for d in diffs.values())
    result["rows_differing"] = int(np.any(np.vstack([d > 1e-9 for d in diffs.values()]), axis=0).sum())
    result["rows_missing"] = int((~found).sum())
    result["rows"] = len(subset)
    return result


def keel_build(path: Path, defs: list, chunk_rows: int) -> tuple[float, float, pd.DataFrame, int]:  # type: ignore[type-arg]
    """``build_feature_table`` on the renamed raw columns (written once beforehand), into a fresh table."""
    from keel.features.offline import build_feature_table, read_feature_table

    with tempfile.TemporaryDirectory(prefix="keel-build-") as tmp:
        source = Path(tmp) / "events.parquet"
        con = duckdb.connect()
        try:
            con.execute(f"copy ({SELECT.replace('?', repr(str(path)))}) to '{source}' (format parquet)")
        finally:
            con.close()
        c0, t0 = time.process_time(), time.perf_counter()
        result = build_feature_table(
            source, Path(tmp) / "features", defs, timestamp="tx_datetime", label="tx_fraud",
            id_column="transaction_id", chunk_rows=chunk_rows,
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        table = read_feature_table(Path(tmp) / "features")
    return wall, cpu, table, result.chunks


CPU: dict[str, float] = {}


def best_of(fn, repeats: int, name: str = ""):  # type: ignore[no-untyped-def]
    """Best wall-clock time of ``repeats`` runs; the CPU seconds of that run go to CPU[name]."""
    best, out = None, None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    assert best is not None
    CPU[name] = best[1]
    return best[0], out


def max_diff(a: pd.DataFrame, b: pd.DataFrame, names: list[str]) -> float:
    return max(
        float(np.nanmax(np.abs(a[n].to_numpy(dtype=float) - b[n].to_numpy(dtype=float)))) for n in names
    )


def write_results(section: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Bench results\n"
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.md.", dir=HERE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast implementations (best kept)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--skip-apply", action="store_true", help="skip the slow handbook-style pandas apply")
    parser.add_argument("--chunk-rows", type=int, default=250_000, help="chunk size of the out-of-core build row")
    parser.add_argument("--skip-feast", action="store_true", help="skip Feast (and its venv set-up)")
    parser.add_argument(
        "--feast-rows",
        default=FEAST_ROWS,
        help="comma-separated subset sizes Feast joins (the first transactions in time; 0 = all); the largest"
        " gives the table row, per row",
    )
    args = parser.parse_args()

    load = os.getloadavg()[0]
    path = reference_file()
    if not path.exists():
        print(f"Reference data not found at {path}; nothing to bench. Set KEEL_REFERENCE_DIR to run it.")
        return
    spec = load_spec(FLAGSHIP)
    defs = resolve_definitions(spec.features, spec.data)
    names = feature_names(defs)
    customer_names = [n for n in names if n.startswith("customer_id_")]

    read_s, _ = best_of(lambda: read(path), args.repeats, "read")
    keel_s, keel = best_of(lambda: keel_offline(path, defs), args.repeats, "keel")
    keel = keel.sort_values("transaction_id").reset_index(drop=True)
    duck_s, duck = best_of(lambda: duckdb_range(path), args.repeats, "duckdb")
    frame = read(path)
    rows = [
        ("Keel offline: read Parquet + `compute_features` (15 features)", keel_s, CPU["keel"], 15, 0.0),
        (
            "DuckDB `RANGE` window query (15 features, to pandas)",
            duck_s,
            CPU["duckdb"],
            15,
            max_diff(duck, keel, names),
        ),
    ]
    roll_s, roll = best_of(lambda: pandas_rolling(frame), 1, "rolling")
    sorted_keel = keel.set_index("transaction_id").loc[
        frame.sort_values(["customer_id", "tx_datetime"], kind="stable")["transaction_id"]
    ]
    roll_diff = max_diff(roll, sorted_keel.reset_index(), customer_names)
    if not args.skip_apply:
        apply_s, applied = best_of(lambda: pandas_apply(frame), 1, "apply")
        rows.append(
            (
                "pandas handbook style `groupby(...).apply(rolling)` (6 customer features)",
                apply_s,
                CPU["apply"],
                6,
                max_diff(applied.reset_index(drop=True), keel, customer_names),
            )
        )
    rows.append(("pandas `groupby().rolling()` (6 customer features)", roll_s, CPU["rolling"], 6, roll_diff))
    for position, chunk_rows in enumerate((len(frame), args.chunk_rows), start=1):
        wall, cpu, table, chunks = keel_build(path, defs, chunk_rows)
        table = table.sort_values("transaction_id").reset_index(drop=True)
        label = f"`keel features build`: {chunks} chunk{'s' if chunks > 1 else ''} of <= {chunk_rows:,} rows -> Parquet"
        rows.insert(position, (label, wall, cpu, 15, max_diff(table, keel, names)))
    feast_note = ""
    if args.skip_feast:
        feast_note = "Feast skipped (--skip-feast)."
    else:
        python, why = feast_python()
        if python is None:
            feast_note = f"Feast {FEAST_VERSION} could not be set up here: {why}"
        else:
            runs = []
            for n in sorted({min(int(r) or len(frame), len(frame)) for r in args.feast_rows.split(",")}):
                feast = feast_offline(python, keel, frame, names, n)
                if "error" in feast:
                    feast_note = f"Feast {FEAST_VERSION} failed on {n:,} rows: {feast['error']} "
                    break
                runs.append(feast)
            if runs:
                feast = runs[-1]  # the largest subset: per-row time grows with the rows, so this flatters Feast least
                scale = len(frame) / feast["rows"]
                label = (
                    f"Feast {feast['feast']} local offline store `get_historical_features` (precomputed windows"
                    + (")" if scale == 1 else f"; {feast['rows']:,} rows, time x{scale:.2f} per row)")
                )
                rows.append((label, feast["wall"] * scale, feast["cpu"] * scale, 15, feast["max_diff"]))
                feast_note += "Feast runs (own process; load average when each started): " + "; ".join(
                    f"{r['rows']:,} transactions in {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU"
                    f" ({r['cpu'] / r['rows'] * 1e6:.0f} us CPU per row; load {r['load']:.1f};"
                    f" {r['rows_missing']:,} missing from its answer, {r['rows_differing']:,} differing from Keel's"
                    " by more than 1e-9)"
                    for r in runs
                ) + "."
                if scale != 1:
                    feast_note += (
                        f" All {len(frame):,} were not run: the file offline store (dask) held 10 GB of memory for"
                        " 400,000 rows and its time per row grows with the rows, so the table row scales the"
                        " largest run per row, a lower bound on Feast's time for the full set."
                    )
    online = online_latency(frame, defs)

    when = dt.date.today().isoformat()
    lines = [
        "## Feature pipeline",
        "",
        f"The flagship spec's 15 features (`tx_amount`, 2 row, 12 window) on the published {len(frame):,} transactions.",
        f"Reproduce with `{COMMAND}`. Run {when} on {platform.machine()}, {os.cpu_count()} cores (shared),"
        f" Python {platform.python_version()}, DuckDB {duckdb.__version__}, pandas {pd.__version__}."
        f" Best of {args.repeats} for Keel and DuckDB; wall-clock seconds including the Parquet read"
        f" (the read alone: {read_s:.2f} s). CPU s = process CPU time of that run (all threads); load average"
        f" at start {load:.1f} (other jobs share the cores, so wall time is noisy).",
        "",
        "| implementation | wall s | CPU s | features | Keel faster by (wall) | by (CPU) | max abs diff vs Keel |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keel_cpu = CPU["keel"]
    for label, seconds, cpu, n, diff in rows:
        ratio = f"{seconds / keel_s:.1f}x" if seconds != keel_s else "-"
        cpu_ratio = f"{cpu / keel_cpu:.1f}x" if seconds != keel_s else "-"
        lines.append(f"| {label} | {seconds:.2f} | {cpu:.2f} | {n} | {ratio} | {cpu_ratio} | {diff:.2g} |")
    lines += [
        "",
        f"Online `OnlineStore.features(event)` with a warm SQLite store ({online['warm_events']:,} events of"
        f" 40 days replayed in {online['warm_seconds']:.1f} s, labels fed when due), over the next {online['n']:,}"
        f" events: wall p50 {online['p50']:.3f} ms, p99 {online['p99']:.3f} ms; thread CPU time per call p50"
        f" {online['cpu_p50']:.3f} ms, p99 {online['cpu_p99']:.3f} ms (wall p99 includes preemption by other jobs).",
        "",
        "Differences vs Keel: DuckDB's `RANGE` frames include same-timestamp peers that come later (29 customer"
        " ties), and pandas rolling sums differ in the last bits; the handbook columns themselves are checked"
        " exactly by `tests/data/test_features_reference.py`. The `keel features build` rows stream the source"
        " in event-time order (DuckDB sort), compute each chunk with the trailing 37 days it needs and write"
        " the Parquet table; chunked or not, their rows equal the in-memory ones.",
        "",
        "What Feast is given: Feast has no sliding windows, so, as a Feast user would, it gets the 12 window"
        " features precomputed (by Keel, outside Feast's time) as two feature views (customer, terminal) with a"
        " row per transaction, and computes the 3 row features in an on-demand feature view; its time is"
        " `get_historical_features(entity_df, 15 features).to_df()` only: the point-in-time join of every"
        " transaction, in a separate venv (`bench/.feast-venv`) and process. Keel's time computes all 15 from"
        " the raw columns, so the comparison favours Feast. " + feast_note,
        "",
        "Goals: all 15 features end to end in <= 2 s, >= 2x the DuckDB window query, >= 20x the handbook-style"
        " pandas apply, >= 100x Feast's local offline store; online p99 <= 1 ms.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"\nWrote the feature section of {RESULTS}.")


if __name__ == "__main__":
    main()
