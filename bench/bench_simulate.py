"""Bench: the vectorised simulator against a straightforward loop implementation, at the default size.

Run: ``python bench/bench_simulate.py`` (``make bench`` calls it). Prints a markdown table and replaces the
``## Simulator`` section of ``bench/RESULTS.md`` (between the simulate markers), creating the file if needed.

The loop implementation runs at full size when a 10 % probe projects under 3 minutes; otherwise it runs on
a fraction of the customers and its time is extrapolated linearly (work is proportional to customers), and
the output says so.
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from naive_simulator import naive_simulate  # noqa: E402

from keel.data.simulate import simulate  # noqa: E402

RESULTS = HERE / "RESULTS.md"
START, END = "<!-- simulate:start -->", "<!-- simulate:end -->"
COMMAND = "python bench/bench_simulate.py"
DEFAULT = {"n_customers": 5000, "n_terminals": 10000, "n_days": 183}
NAIVE_BUDGET_SECONDS = 180.0


def _timed(fn, **kwargs):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(**kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the vectorised simulator (best kept)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()

    fast_times = []
    for _ in range(args.repeats):
        seconds, sim = _timed(simulate, **DEFAULT, seed=0)
        fast_times.append(seconds)
    fast = min(fast_times)
    fast_summary = sim.summary()

    probe_customers = DEFAULT["n_customers"] // 10
    probe_seconds, _ = _timed(naive_simulate, **{**DEFAULT, "n_customers": probe_customers}, seed=0)
    projected = probe_seconds * DEFAULT["n_customers"] / probe_customers
    if projected <= NAIVE_BUDGET_SECONDS:
        naive_seconds, naive_tx = _timed(naive_simulate, **DEFAULT, seed=0)
        naive_customers, note = DEFAULT["n_customers"], "measured at full size"
        naive_full = naive_seconds
    else:
        naive_customers = DEFAULT["n_customers"] // 5
        naive_seconds, naive_tx = _timed(
            naive_simulate, **{**DEFAULT, "n_customers": naive_customers}, seed=0
        )
        naive_full = naive_seconds * DEFAULT["n_customers"] / naive_customers
        note = (
            f"run on {naive_customers:,} customers ({naive_seconds:.1f} s) and extrapolated linearly to "
            f"{DEFAULT['n_customers']:,}, because a 10 % probe projected {projected:.0f} s (> 3 min)"
        )
    ratio = naive_full / fast

    size = f"{DEFAULT['n_customers']:,} customers x {DEFAULT['n_terminals']:,} terminals x {DEFAULT['n_days']} days"
    lines = [
        "| implementation | seconds | ratio | transactions | fraud rate |",
        "|---|---:|---:|---:|---:|",
        f"| `keel.data.simulate` (vectorised NumPy, best of {args.repeats}) | {fast:.2f} | 1.0x | "
        f"{fast_summary['n_transactions']:,} | {fast_summary['fraud_rate']:.3%} |",
        f"| `bench/naive_simulator.py` (per-customer loops) | {naive_full:.1f} | {ratio:.0f}x | "
        f"{len(naive_tx) * DEFAULT['n_customers'] // naive_customers:,} | {naive_tx['tx_fraud'].mean():.3%} |",
    ]
    table = "\n".join(lines)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"
    section = "\n".join(
        [
            START,
            "## Simulator",
            "",
            f"Default size ({size}), seed 0. Reproduce with `{COMMAND}`.",
            f"Run {dt.date.today().isoformat()} on {machine}. Naive implementation: {note}.",
            "",
            table,
            "",
            "Goal: default size under 15 s on 2 cores and at least 20x faster than the loop implementation.",
            END,
        ]
    )
    print(f"Simulator bench, {size}\n")
    print(table)
    print(f"\nNaive implementation: {note}.")
    if not args.no_write:
        _write_section(section)
        print(f"Updated {RESULTS.relative_to(HERE.parent)}")


def _write_section(section: str) -> None:
    """Replace (or append) the simulate section of RESULTS.md, atomically."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.", suffix=".md.tmp", dir=HERE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, RESULTS)


if __name__ == "__main__":
    main()
