"""The handbook's protocol on its published data, beside the handbook's published results.

Runs `keel train --protocol prequential` with bench/handbook/keel.toml (a plain spec: the handbook's 15
features, 7-day train / 7-day delay / 7-day test blocks, 4 folds shifted by 7 days, known-compromised cards
removed from test, hyper-parameters chosen on the validation folds only) and writes the `handbook` section of
bench/RESULTS.md.

    python bench/bench_handbook.py            # about 30 minutes of CPU (one core) with 10 trials per family
    python bench/bench_handbook.py --ratios   # the same spec plus three declared ratio features
    python bench/bench_handbook.py --ratios --trials 6   # 25 CPU-minutes measured with random forest at 4 trials

The spec searches four families (LightGBM, HistGradientBoosting, random forest, logistic regression) and sets
``models.ensemble = "mean"``: the mean of each family's best model is one more candidate, chosen only if it wins on
the validation folds. Trials per family are fixed (``--trials``, default ``models.search_trials``); random forest
takes about 60 % of the time.

``--ratios`` adds, as ``[[features.ratios]]`` of the spec (a Keel feature kind, computed the same way offline,
online and on Spark), each transaction's amount relative to its card's recent average amounts. The protocol,
data and search are unchanged; the section says which feature set each table used.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from results import HERE, machine, reference_dir, write_section

# Declared in the spec by --ratios: the amount against the card's usual amounts (spends far above a card's habit
# are what a compromised card looks like; trees cannot form a ratio of two inputs on their own).
RATIOS = [
    ("AMOUNT_TO_CUSTOMER_AVG_7DAY", "TX_AMOUNT", "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW"),
    ("AMOUNT_TO_CUSTOMER_AVG_30DAY", "TX_AMOUNT", "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW"),
    ("CUSTOMER_AVG_1DAY_TO_30DAY", "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW", "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW"),
]

# Declared in the spec by --more (with the ratios above): what the delayed labels say about a terminal week by week
# (a compromised terminal stays compromised 28 days, so when its frauds started tells whether they go on), and the
# card's habit before the last label delay (its recent amounts may already be a fraudster's). Chosen on the
# validation folds only: validation AP 0.703 -> 0.720 with LightGBM; validation CP@100 moved by noise only.
MORE_WINDOWS = [
    {"entity": "TERMINAL_ID", "aggregates": ["label_rate"], "windows": ["2d", "3d", "14d", "60d"], "delay": "7d",
     "name": "TERMINAL_ID_RISK_{days}DAY_WINDOW"},
    {"entity": "TERMINAL_ID", "aggregates": ["label_count"], "windows": ["1d", "7d", "30d"], "delay": "7d",
     "name": "TERMINAL_ID_NB_FRAUD_{days}DAY_WINDOW"},
    *({"entity": "TERMINAL_ID", "aggregates": ["label_rate"], "windows": ["7d"], "delay": f"{7 * w}d",
       "name": f"TERMINAL_ID_RISK_WEEK_{w}"} for w in (2, 3, 4, 5)),
    {"entity": "CUSTOMER_ID", "aggregates": ["mean", "std", "max"], "column": "TX_AMOUNT", "windows": ["30d"],
     "delay": "7d", "name": "CUSTOMER_ID_{aggregate}_AMOUNT_30DAY_BEFORE_DELAY"},
]
MORE_RATIOS = [
    ("AMOUNT_TO_CUSTOMER_BASELINE", "TX_AMOUNT", "CUSTOMER_ID_mean_AMOUNT_30DAY_BEFORE_DELAY"),
    ("AMOUNT_TO_CUSTOMER_BASELINE_MAX", "TX_AMOUNT", "CUSTOMER_ID_max_AMOUNT_30DAY_BEFORE_DELAY"),
]

# Handbook ch. 6 (prequential test results at the best validation parameters): AUC, AP, CP@100.
PUBLISHED = {
    "decision tree": (0.797, 0.579, 0.284),
    "logistic regression": (0.868, 0.623, 0.297),
    "random forest": (0.870, 0.678, 0.299),
    "XGBoost": (0.869, 0.687, 0.303),
    "balanced bagging": (0.879, 0.680, 0.305),
    "feed-forward net": (0.876, 0.675, 0.303),
}


def ceiling_section(ref: Path) -> str:
    """How high Card Precision@100 can go on the handbook's test folds, from the labels and fraud scenarios alone.

    * oracle: every fraud card ranked first (a model that knows the labels);
    * delayed-label ceiling: only the frauds a model can see with labels 7 days late ranked first: scenario 1
      (amount over 220) and 3 (a card spending 5x its habit) always, scenario 2 (a compromised terminal) when the
      same terminal had a fraud in (t - 37 d, t - 7 d], the reach of the handbook's 30-day terminal risk window.
      Frauds at a terminal compromised less than a label delay ago leave no trace in any feature.
    Folds, known-card removal and the metric are Keel's own (``prequential_split``, ``card_precision_at_k``).
    """
    import numpy as np
    import pandas as pd

    from keel.evaluate.metrics import card_precision_at_k, period_index
    from keel.evaluate.split import prequential_split
    from keel.spec import load_spec

    spec = load_spec(HERE / "handbook" / "keel.toml")
    sp = spec.split
    raw = pd.read_parquet(ref / "simulated_raw_2018-04-01_2018-09-30.parquet")
    t = raw["TX_DATETIME"].to_numpy()
    y = raw["TX_FRAUD"].to_numpy()
    card = raw["CUSTOMER_ID"].to_numpy()
    scenario = raw["TX_FRAUD_SCENARIO"].to_numpy()
    delay = spec.data.label_delay
    reach = pd.Timedelta(days=30)
    # the latest fraud on the row's terminal at or before t - delay (merge_asof by terminal)
    query = pd.DataFrame({"TERMINAL_ID": raw["TERMINAL_ID"], "edge": raw["TX_DATETIME"] - delay,
                          "row": np.arange(len(raw))}).sort_values("edge")
    frauds = raw.loc[raw["TX_FRAUD"] == 1, ["TERMINAL_ID", "TX_DATETIME"]].rename(
        columns={"TX_DATETIME": "last_fraud"}).sort_values("last_fraud")
    seen = pd.merge_asof(query, frauds, left_on="edge", right_on="last_fraud", by="TERMINAL_ID",
                         direction="backward").sort_values("row")
    terminal_seen = (seen["last_fraud"].notna() & (seen["last_fraud"] > seen["edge"] - reach)).to_numpy()
    visible = (scenario == 1) | (scenario == 3) | ((scenario == 2) & terminal_seen)
    split = prequential_split(t, train=sp.train, validation=sp.validation, test=sp.test, gap=sp.gap,
                              label_delay=delay, folds=sp.folds, fold_step=sp.fold_step, test_start=sp.test_start,
                              y=y, entity=card, exclude_known_positives=True)
    k = spec.decision.precision_at_k.k
    rows, oracle, ceiling = [], [], []
    for fold in sorted(split.test, key=lambda f: f.assess_window.start):
        m = fold.assess
        period = period_index(t[m], per="1D", origin=fold.assess_window.start)
        o = card_precision_at_k(y[m].astype(float), y[m], entity=card[m], period=period, k=k).mean
        c = card_precision_at_k((visible[m] & (y[m] == 1)).astype(float), y[m], entity=card[m], period=period,
                                k=k).mean
        oracle.append(o)
        ceiling.append(c)
        cards = int(pd.Series(card[m][y[m] == 1]).nunique())
        rows.append(f"| {fold.assess_window.label()} | {cards} | {o:.3f} | {c:.3f} |")
    best = max(v[2] for v in PUBLISHED.values())
    lines = [
        "## Handbook protocol: how high Card Precision@100 can go",
        "",
        f"{machine()} Reproduce: `python bench/bench_handbook.py --ceiling` (seconds; labels and the published fraud"
        " scenarios only, no model). Same test folds, known-card removal and metric as the sections above.",
        "",
        "The oracle ranks every fraud card first. The delayed-label ceiling ranks first only the frauds a model can"
        f" see with labels {delay.days} days late: scenario 1 (amount over 220) and 3 (a card spending 5x its"
        " habit) always, scenario 2 (compromised terminal) only when the same terminal had a fraud in"
        f" (t - {delay.days + reach.days} d, t - {delay.days} d], the reach of the 30-day terminal risk window."
        " A terminal compromised less than a label delay ago leaves no trace in any feature.",
        "",
        "| test fold | fraud cards (after removing known ones) | oracle CP@100 | delayed-label ceiling |",
        "|---|---:|---:|---:|",
        *rows,
        f"| **mean** | | **{np.mean(oracle):.3f}** | **{np.mean(ceiling):.3f}** |",
        "",
        f"The best published CP@100 ({best:.3f}) is {best / np.mean(ceiling):.0%} of the delayed-label ceiling;"
        f" {np.mean(ceiling) - best:.3f} is left for any model fed these labels.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--trials", type=int, default=None, help="override models.search_trials")
    parser.add_argument("--ratios", action="store_true",
                        help="add three declared ratio features (section handbook-ratios)")
    parser.add_argument("--more", action="store_true",
                        help="the ratios plus more declared window features (section handbook-more)")
    parser.add_argument("--ceiling", action="store_true",
                        help="only the Card Precision@100 ceilings of the test folds (section handbook-ceiling; seconds)")
    args = parser.parse_args()
    ref = reference_dir()
    if ref is None:
        print("Handbook data not found (../shared/data/fraud-handbook or $KEEL_REFERENCE_DIR); nothing measured.")
        return
    if args.ceiling:
        text = ceiling_section(ref)
        print(text)
        if not args.no_write:
            write_section("handbook-ceiling", text)
        return
    from keel.spec import RatioFeature, WindowFeature, load_spec
    from keel.train import train

    spec = load_spec(HERE / "handbook" / "keel.toml")
    data = spec.data.model_copy(update={"source": str(ref / "simulated_raw_2018-04-01_2018-09-30.parquet")})
    models = spec.models if args.trials is None else spec.models.model_copy(update={"search_trials": args.trials})
    spec = spec.model_copy(update={"data": data, "models": models})
    if args.ratios or args.more:
        ratios = [RatioFeature(name=n, numerator=a, denominator=b)
                  for n, a, b in (RATIOS + MORE_RATIOS if args.more else RATIOS)]
        windows = [*spec.features.windows, *(WindowFeature(**w) for w in MORE_WINDOWS)] if args.more else (
            spec.features.windows)
        spec = spec.model_copy(update={"features": spec.features.model_copy(
            update={"ratios": ratios, "windows": windows})})
    section = "handbook-more" if args.more else "handbook-ratios" if args.ratios else "handbook"
    flag = " --more" if args.more else " --ratios" if args.ratios else ""
    load_start = os.getloadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    # Fixed trials per family, never cut by models.search_budget_seconds: a timeboxed search would make the
    # figures depend on the machine's load (a 4-family run on a busy 2-core machine stopped random forest at 4).
    trials = {family: spec.models.search_trials for family in spec.models.candidates}
    outcome = train(spec, progress=lambda m: print("  ·", m, flush=True), trials=trials)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    def fmt(e, m):  # type: ignore[no-untyped-def]
        return f"{e.test[m]:.3f} ± {e.test[m + '_std']:.3f}"

    ratio_note = (" plus `[[features.ratios]]` " + ", ".join(f"{n} = {a} / {b}" for n, a, b in RATIOS)
                  if args.ratios else "")
    if args.more:
        ratio_note = (f" plus {len(RATIOS) + len(MORE_RATIOS)} declared ratios and {len(MORE_WINDOWS)} more"
                      " `[[features.windows]]` blocks, listed in `MORE_WINDOWS` and `MORE_RATIOS` of the script")
    lines = [
        "## Handbook protocol on the published data" + (
            ", with more declared features" if args.more else ", with three declared ratio features" if args.ratios
            else ": the handbook's 15 features"),
        "",
        f"{machine()} {len(outcome.dataset.y):,} transactions; train {seconds / 60:.1f} min in all, "
        f"{cpu / 60:.1f} min CPU, load average {load_start[0]:.1f} at the start "
        f"(search: {outcome.search_budget['families']}).",
        f"Reproduce: `python bench/bench_handbook.py{flag}"
        f"{f' --trials {args.trials}' if args.trials else ''}` (spec: `bench/handbook/keel.toml`{ratio_note}, "
        "`keel train --protocol prequential`).",
        "",
        "Keel (mean ± std over the 4 prequential test folds; hyper-parameters chosen on the 4 validation folds):",
        "",
        "| model | role | validation CP@100 | ROC AUC | average precision | Card Precision@100 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for e in outcome.evaluated:
        chosen = " (chosen on validation)" if e is outcome.best else ""
        lines.append(f"| {e.name}{chosen} | {e.role} | {e.validation_score:.4f} | {fmt(e, 'roc_auc')} | "
                     f"{fmt(e, 'average_precision')} | {fmt(e, 'card_precision_at_k')} |")
    lines += ["", "Published (handbook ch. 6, same protocol, prequential test at best validation parameters):", "",
              "| model | ROC AUC | average precision | Card Precision@100 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {auc:.3f} | {ap:.3f} | {cp:.3f} |" for name, (auc, ap, cp) in PUBLISHED.items()]
    best = outcome.best
    ap, cp = best.test["average_precision"], best.test["card_precision_at_k"]
    beaten_ap = [n for n, v in PUBLISHED.items() if ap > v[1]]
    beaten_cp = [n for n, v in PUBLISHED.items() if cp > v[2]]
    verdict = ("beats every published row on both AP and CP@100" if len(beaten_ap) == len(beaten_cp) == len(PUBLISHED)
               else f"beats {len(beaten_ap)}/{len(PUBLISHED)} published rows on AP and "
                    f"{len(beaten_cp)}/{len(PUBLISHED)} on CP@100")
    lines += ["", f"Chosen model **{best.name}** ({best.params}): {verdict} "
              f"(AP {ap:.3f} vs best published {max(v[1] for v in PUBLISHED.values()):.3f}; "
              f"CP@100 {cp:.3f} vs {max(v[2] for v in PUBLISHED.values()):.3f}).",
              "", f"Selection on validation: {outcome.search_budget.get('selection', 'best validation headline')}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(section, text)


if __name__ == "__main__":
    main()
