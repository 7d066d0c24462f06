"""Bench: the flagship 15 features on the published 1,754,155 transactions, five ways side by side.

Run: ``python bench/bench_features.py`` (``--no-write`` to leave bench/RESULTS.md alone). Needs
``../shared/data/fraud-handbook/simulated_raw_2018-04-01_2018-09-30.parquet`` (or ``KEEL_REFERENCE_DIR``);
without it, says so and exits 0.

1. Keel offline: read Parquet (DuckDB) -> ``compute_features`` -> 15 features in memory (best of 3).
2. A hand-written DuckDB query with ``RANGE`` window frames for the same 15 features, into pandas (best of 3).
3. pandas, handbook style: per-customer ``groupby(...).apply`` of a function that sorts and rolls (customer
   windows only: 6 features).
4. pandas ``groupby().rolling()`` (customer windows only).
5. Keel online: ``OnlineStore.features(event)`` latency per event, store warm (state replayed for the
   preceding 40 days), labels fed when due; p50/p99 over the next events.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

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
        "| implementation | wall s | CPU s | features | Keel faster by (wall) | max abs diff vs Keel |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, seconds, cpu, n, diff in rows:
        ratio = f"{seconds / keel_s:.1f}x" if seconds != keel_s else "-"
        lines.append(f"| {label} | {seconds:.2f} | {cpu:.2f} | {n} | {ratio} | {diff:.2g} |")
    lines += [
        "",
        f"Online `OnlineStore.features(event)` with a warm SQLite store ({online['warm_events']:,} events of"
        f" 40 days replayed in {online['warm_seconds']:.1f} s, labels fed when due), over the next {online['n']:,}"
        f" events: wall p50 {online['p50']:.3f} ms, p99 {online['p99']:.3f} ms; thread CPU time per call p50"
        f" {online['cpu_p50']:.3f} ms, p99 {online['cpu_p99']:.3f} ms (wall p99 includes preemption by other jobs).",
        "",
        "Differences vs Keel: DuckDB's `RANGE` frames include same-timestamp peers that come later (29 customer"
        " ties), and pandas rolling sums differ in the last bits; the handbook columns themselves are checked"
        " exactly by `tests/data/test_features_reference.py`. Feast's local offline store was not measured"
        " (feast is not installed in the venv).",
        "",
        "Goals: all 15 features end to end in <= 2 s, >= 2x the DuckDB window query, >= 20x the handbook-style"
        " pandas apply; online p99 <= 1 ms.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"\nWrote the feature section of {RESULTS}.")


if __name__ == "__main__":
    main()
