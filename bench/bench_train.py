"""`keel train` end to end on the default simulated dataset (features, baselines, candidates, calibration,
threshold, intervals, slices, report) — the issue's goal is under 2 minutes on 2 cores.

    python bench/bench_train.py
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from results import HERE, machine, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    from keel.data.simulate import simulate, write_simulation
    from keel.evaluate.report import write_report
    from keel.spec import load_spec
    from keel.train import train

    root = Path(tempfile.mkdtemp(prefix="keel-bench-train-"))
    try:
        t0 = time.perf_counter()
        write_simulation(simulate(), root / "data")
        simulated = time.perf_counter() - t0
        shutil.copyfile(HERE.parent / "examples" / "card-fraud" / "keel.toml", root / "keel.toml")
        spec = load_spec(root / "keel.toml")
        t1 = time.perf_counter()
        outcome = train(spec)
        trained = time.perf_counter() - t1
        t2 = time.perf_counter()
        write_report(outcome, root / "report")
        reported = time.perf_counter() - t2
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = trained + reported
    s = outcome.seconds
    best = outcome.best
    lines = [
        "## Training end to end (default simulated data)",
        "",
        f"{machine()} {len(outcome.dataset.y):,} transactions (5,000 customers, 183 days; simulated in "
        f"{simulated:.1f} s, not counted). Flagship spec `examples/card-fraud/keel.toml`, single protocol. "
        "Reproduce: `python bench/bench_train.py`.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        f"| read + contract + fingerprint + 15 features | {s.get('data_and_features', 0):.1f} |",
        f"| baselines (prior, rule, single feature, logistic) | {s.get('baselines', 0):.1f} |",
        f"| candidate search ({outcome.search_budget['families']}) | {s.get('candidates', 0):.1f} |",
        f"| calibration, threshold, test metrics with {spec.models.bootstrap} bootstrap resamples, slices | "
        f"{trained - sum(s.get(k, 0) for k in ('data_and_features', 'baselines', 'candidates')):.1f} |",
        f"| report (Markdown, HTML, plots) | {reported:.1f} |",
        f"| **total** | **{total:.1f}** |",
        "",
        f"Goal: under 120 s. Chosen: {best.name}, test AP {best.test['average_precision']:.3f}, "
        f"Card Precision@100 {best.test.get('card_precision_at_k', float('nan')):.3f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("train", text)


if __name__ == "__main__":
    main()
