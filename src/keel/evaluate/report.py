"""The training report: what `keel train` decided and measured, in the order a reviewer asks.

:func:`write_report` turns a :class:`keel.train.TrainOutcome` into ``report.md``, a self-contained
``report.html`` (figures embedded as base64 PNG; no network needed to open it), ``metrics.json`` and the
figures as PNG files under ``plots/``. The folder is written atomically: a reader sees the old report or
the whole new one.

The report answers, in order: (1) which decision the prediction supports; (2) where features and labels
come from; (3) which baseline the model beats and by how much, with intervals; (4) which metric matches
the decision and why; (5) which errors matter most; (6) which data to collect next; then the search budget
and timings. Every number in it is computed from the outcome; the sentences around the numbers are
chosen by them (a baseline that wins is said to win).

Example::

    outcome = train(load_spec("keel.toml"))
    paths = write_report(outcome, Path("reports/20240101-120000"))
    paths["html"]   # reports/20240101-120000/report.html
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from keel.docs import markup
from keel.durations import format_duration
from keel.errors import KeelError, TrainingError
from keel.evaluate import metrics as M
from keel.evaluate import plots
from keel.evaluate.threshold import choose_threshold
from keel.io import atomic_dir

if TYPE_CHECKING:
    from keel.train import Evaluated, TrainOutcome

HEADINGS = (
    "1. Which decision the prediction supports",
    "2. Where the features and labels come from",
    "3. Which baselines the model beats, and by how much",
    "4. Which metric matches the decision, and why",
    "5. Which errors matter most",
    "6. Which data to collect next",
    "Search budget and timings",
)

LOWER_IS_BETTER = {"expected_cost", "log_loss", "brier", "ece"}

FIGURES = {
    "roc": "roc.png",
    "pr": "pr.png",
    "calibration": "calibration.png",
    "cost_curve": "cost_curve.png",
    "score_distribution": "score_distribution.png",
}


# ---------------------------------------------------------------------------------------- formatting
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float | np.floating) and not math.isfinite(float(v)))


def _num(v: Any, digits: int = 3) -> str:
    return "-" if _missing(v) else f"{float(v):.{digits}f}"


def _signed(v: float, digits: int = 3) -> str:
    return "-" if _missing(v) else f"{float(v):+.{digits}f}"


def _int(v: Any) -> str:
    return "-" if _missing(v) else f"{round(float(v)):,}"


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if _missing(v) else f"{100 * float(v):.{digits}f} %"


def _money(v: Any) -> str:
    return "-" if _missing(v) else f"{float(v):,.2f}"


def _duration(td: timedelta | None) -> str:
    return "none" if td is None else (format_duration(td) if td else "0 (none)")


def _per(td: timedelta) -> str:
    """'day' for 1d, 'week' for 7d, 'hour' for 1h; otherwise the duration ('3d')."""
    names = {timedelta(days=1): "day", timedelta(days=7): "week", timedelta(hours=1): "hour"}
    return names.get(td, format_duration(td))


def _code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def metric_label(metric: str, k: int | None = None) -> str:
    """Human name of a metric key (``card_precision_at_k`` -> ``Card Precision@100``)."""
    names = {
        "average_precision": "average precision", "roc_auc": "ROC AUC", "brier": "Brier score",
        "log_loss": "log loss", "expected_cost": "expected cost per event", "ece": "calibration error (ECE)",
        "card_precision_at_k": f"Card Precision@{k if k else 'k'}", "precision": "precision", "recall": "recall",
    }
    return names.get(metric, metric.replace("_", " "))


# ------------------------------------------------------------------------------------------ document
class Document(markup.Document):
    """The report's document: the docs' model, minus empty bullet lists (a section with nothing to list says so in
    its text)."""

    def bullets(self, items: list[str]) -> None:
        if items:
            super().bullets(items)

    def figure(self, key: str, draw: Callable[[], bytes], caption: str) -> None:  # type: ignore[override]
        """A figure by its key in :data:`FIGURES` (written to ``plots/<file>``)."""
        super().figure(f"plots/{FIGURES[key]}", draw, caption)


# Numbers read down a column: right-aligned, the label column left.
_CSS = """
table td,table th{text-align:right}td:first-child,th:first-child{text-align:left}
"""


def render_markdown(doc: Document) -> str:
    return markup.render_markdown(doc)


def render_html(doc: Document) -> str:
    return markup.render_html(doc, css=_CSS)


# --------------------------------------------------------------------------------------------- facts
@dataclass
class _Test:
    """The chosen model's decisions on the test window, and what they cost."""

    y: np.ndarray
    scores: np.ndarray
    threshold: float
    costs: M.RowCosts
    confusion: M.Confusion
    cost_by_outcome: dict[str, float]
    count_by_outcome: dict[str, int]
    total_cost: float
    do_nothing_cost: float
    act_on_all_cost: float
    raw_scores: np.ndarray | None
    times: np.ndarray | None

    @property
    def rows(self) -> int:
        return len(self.y)

    @property
    def prevalence(self) -> float:
        return float(self.y.mean())

    @property
    def accuracy(self) -> float:
        cm = self.confusion
        return (cm.tp + cm.tn) / max(self.rows, 1)


def _test_facts(o: TrainOutcome) -> _Test:
    if o.test_scores is None or o.test_mask is None:
        raise TrainingError("The training outcome holds no test scores; the report needs the test window.")
    te = np.asarray(o.test_mask)
    y = np.asarray(o.dataset.y)[te].astype(int)
    s = np.asarray(o.test_scores, dtype=float)
    th = float(o.threshold_choice.threshold)
    costs = o.dataset.costs.take(te)
    act = s >= th
    pos = y == 1
    per_row = costs.per_row(y, act)
    masks = {"true_positive": act & pos, "false_positive": act & ~pos, "false_negative": ~act & pos,
             "true_negative": ~act & ~pos}
    raw = None
    try:
        raw = np.asarray(o.model.raw_scores(o.dataset.X.to_numpy(dtype=np.float64)[te]), dtype=float)
    except (KeelError, ValueError, TypeError, AttributeError):  # the "before" curve is optional
        raw = None
    times = np.asarray(o.dataset.times)[te] if o.dataset.times is not None else None
    return _Test(
        y=y, scores=s, threshold=th, costs=costs, confusion=M.confusion(y, s, th),
        cost_by_outcome={k: float(per_row[m].sum()) for k, m in masks.items()},
        count_by_outcome={k: int(m.sum()) for k, m in masks.items()},
        total_cost=float(per_row.sum()),
        do_nothing_cost=float(costs.per_row(y, np.zeros(len(y), dtype=bool)).sum()),
        act_on_all_cost=float(costs.per_row(y, np.ones(len(y), dtype=bool)).sum()),
        raw_scores=raw, times=times,
    )


@dataclass
class Verdict:
    """Chosen model against one baseline on one metric."""

    baseline: str
    metric: str
    mine: float
    theirs: float
    difference: float  # mine - theirs (positive = better when higher is better)
    better: bool       # chosen model's point estimate is better
    separated: bool | None  # intervals (or mean ± std) do not overlap; None when there are none
    spread: str        # "95 % intervals" | "mean ± std across folds" | "no intervals"

    @property
    def beats(self) -> bool:
        return self.better and bool(self.separated)


def _spread(o: TrainOutcome, e: Evaluated, metric: str) -> tuple[float, float] | None:
    if o.prequential is not None:
        mean, std = e.test.get(metric), e.test.get(f"{metric}_std")
        if _missing(mean) or _missing(std):
            return None
        return float(mean) - float(std), float(mean) + float(std)  # type: ignore[arg-type]
    iv = e.intervals.get(metric)
    if iv is None or _missing(iv.low) or _missing(iv.high):
        return None
    return float(iv.low), float(iv.high)


def compared_metrics(o: TrainOutcome) -> list[str]:
    """The metrics the baselines are compared on: the headline first, then average precision, CP@k, cost."""
    head = o.spec.decision.headline_metric
    order = [head, "average_precision", "card_precision_at_k", "expected_cost"]
    return [m for m in dict.fromkeys(order) if not _missing(o.best.test.get(m))]


def verdict_metrics(o: TrainOutcome) -> list[str]:
    """The metrics "beats every baseline" is judged on: the headline, average precision and CP@k (as the
    CLI's summary line); expected cost is compared too, but a threshold effect alone does not decide."""
    head = o.spec.decision.headline_metric
    return [m for m in compared_metrics(o) if m in (head, "average_precision", "card_precision_at_k")]


def beats_every_baseline(o: TrainOutcome, vs: list[Verdict] | None = None) -> bool:
    """True when the chosen model beats every baseline on every verdict metric with separated intervals."""
    vs = verdicts(o) if vs is None else vs
    judged = [v for v in vs if v.metric in verdict_metrics(o)]
    return bool(judged) and all(v.beats for v in judged)


def verdicts(o: TrainOutcome) -> list[Verdict]:
    """For every baseline and compared metric: who is better, and do the intervals separate them?"""
    out = []
    best = o.best
    for b in o.baselines:
        for m in compared_metrics(o):
            mine, theirs = best.test.get(m), b.test.get(m)
            if _missing(theirs):
                continue
            lower = m in LOWER_IS_BETTER
            diff = float(mine) - float(theirs)  # type: ignore[arg-type]
            better = diff < 0 if lower else diff > 0
            a, z = _spread(o, best, m), _spread(o, b, m)
            separated = None
            if a is not None and z is not None:
                separated = (a[1] < z[0] or z[1] < a[0])
            spread = ("mean ± std across folds" if o.prequential is not None
                      else ("95 % intervals" if a is not None and z is not None else "no intervals"))
            out.append(Verdict(b.name, m, float(mine), float(theirs), diff, better,  # type: ignore[arg-type]
                               separated, spread))
    return out


def _value(o: TrainOutcome, e: Evaluated, metric: str, digits: int = 3) -> str:
    v = e.test.get(metric)
    if _missing(v):
        return "-"
    if o.prequential is not None:
        std = e.test.get(f"{metric}_std")
        return f"{_num(v, digits)} ± {_num(std, digits)}" if not _missing(std) else _num(v, digits)
    iv = e.intervals.get(metric)
    if iv is None or _missing(iv.low):
        return _num(v, digits)
    return f"{_num(v, digits)} [{_num(iv.low, digits)}, {_num(iv.high, digits)}]"


def _sentence(o: TrainOutcome, v: Verdict, k: int | None) -> str:
    best = o.best
    b = next(e for e in o.evaluated if e.name == v.baseline)
    name = metric_label(v.metric, k)
    mine, theirs = _value(o, best, v.metric), _value(o, b, v.metric)
    rel = ""
    if v.theirs and not _missing(v.theirs) and abs(v.theirs) > 1e-12:
        rel = f", {v.difference / abs(v.theirs):+.0%} relative"
    pair = f"{mine} against {theirs}"
    what = "higher" if v.metric not in LOWER_IS_BETTER else "lower"
    if v.beats:
        return (f"**{best.name} beats {v.baseline}** on {name}: {pair} (difference {_signed(v.difference)}{rel});"
                f" the {v.spread} do not overlap.")
    if v.better and v.separated is None:
        return (f"{best.name} scores {what} than {v.baseline} on {name}: {pair} (difference "
                f"{_signed(v.difference)}{rel}), but without intervals this is no evidence that it is better.")
    if v.better:
        return (f"**{best.name} does not beat {v.baseline}** on {name} with confidence: {pair} (difference "
                f"{_signed(v.difference)}{rel}); the {v.spread} overlap, so the test window cannot tell them apart.")
    if v.difference == 0:
        return f"**{best.name} does not beat {v.baseline}** on {name}: both score {_num(v.mine)}."
    sep = (f" and the {v.spread} do not overlap" if v.separated else
           (f" (the {v.spread} overlap)" if v.separated is not None else ""))
    return (f"**{v.baseline} wins over {best.name}** on {name}: {theirs} against {mine} for {best.name}{sep}. "
            f"{best.name} does not beat this baseline.")


# ------------------------------------------------------------------------------------------- sections
def _k(o: TrainOutcome) -> int | None:
    p = o.spec.decision.precision_at_k
    return p.k if p else None


def _unit(entity: str | None) -> str:
    return f"{_code(entity)} values" if entity else "rows"


def _cost_text(value: float | str) -> str:
    return _code(value) if isinstance(value, str) else _money(value)


def _section_decision(doc: Document, o: TrainOutcome, t: _Test) -> None:
    spec, d = o.spec, o.spec.decision
    th = o.threshold_choice
    doc.heading(HEADINGS[0])
    doc.text(f"**Question:** {d.question}")
    items = [
        f"**Positive class:** {d.positive_class} (label {_code(spec.data.label)} = {_code(spec.data.positive_label)}).",
        f"**Actor:** {d.actor or 'not named in the spec (decision.actor)'}.",
        f"**Actions:** score >= {_num(t.threshold, 4)} -> {_code(d.positive_action)}; otherwise "
        f"{_code(d.negative_action)}.",
        f"**Deployment:** {spec.project.deployment}"
        + (f" — {spec.project.deployment_reason.rstrip('.')}" if spec.project.deployment_reason else "") + ".",
    ]
    band = spec.models.abstain_band
    if band:
        items.append(f"**Abstain band:** scores in [{_num(band[0])}, {_num(band[1])}) abstain and go to the fallback "
                     f"({_code(spec.fallback_rule) if spec.fallback_rule else 'no fallback rule set'}).")
    cap = d.capacity
    if cap:
        items.append(f"**Capacity:** at most {cap.max_positives:,} {d.positive_action} decisions per "
                     f"{_per(cap.per)}.")
    if d.precision_at_k:
        p = d.precision_at_k
        items.append(f"**Ranking unit:** the top {p.k:,} {_unit(p.entity)} per {_per(p.per)}.")
    doc.bullets(items)

    c = t.costs
    rows = []
    for outcome_name, key in (("false negative (missed positive)", "false_negative"),
                              ("false positive (needless action)", "false_positive"),
                              ("true positive (useful action)", "true_positive"),
                              ("true negative", "true_negative")):
        arr = np.asarray(getattr(c, key), dtype=float)
        rows.append([outcome_name, _cost_text(getattr(d.costs, key)), _money(arr.mean()) if len(arr) else "-"])
    doc.text("Costs of each outcome, from `decision.costs` (an expression is evaluated per row):")
    doc.table(["outcome", "cost in the spec", "mean per test row"], rows)

    window = "the latest test fold's block" if o.prequential is not None else "validation"
    text = (f"The threshold **{_num(th.threshold, 4)}** was chosen on {window}, bound by **{th.bound}**: "
            f"expected cost there {_num(th.expected_cost, 4)} per event.")
    if th.bound == "capacity" and th.capacity_threshold is not None:
        text += (f" The cheapest threshold, {_num(th.cost_optimal_threshold, 4)} at "
                 f"{_num(th.cost_optimal_expected_cost, 4)} per event, would exceed the capacity; the capacity "
                 f"needs at least {_num(th.capacity_threshold, 4)}.")
    elif th.capacity_threshold is not None:
        text += (f" The cheapest threshold already fits the capacity (which needs at least "
                 f"{_num(th.capacity_threshold, 4)}).")
    doc.text(text)


def _feature_rows(o: TrainOutcome) -> list[list[str]]:
    spec = o.spec
    f = spec.features
    if not (f.raw or f.row or f.windows or f.ratios):
        return [[_code(n), "source column", _code(n), "-", "-", "-"] for n in o.dataset.feature_names]
    from keel.features.definitions import (
        RatioDefinition,
        RawDefinition,
        RowDefinition,
        WindowDefinition,
        resolve_definitions,
    )

    rows = []
    for df in resolve_definitions(f, spec.data):
        if isinstance(df, RawDefinition):
            rows.append([_code(df.name), "raw column", _code(df.column), "-", "-", "-"])
        elif isinstance(df, RowDefinition):
            rows.append([_code(df.name), f"row: {df.kind}", _code(df.column), "-", "-", "-"])
        elif isinstance(df, WindowDefinition):
            what = df.aggregate + (f"({df.column})" if df.column else "")
            reads = df.column or (spec.data.label if df.reads_label else df.entity)
            rows.append([_code(df.name), f"window {what} per {df.entity}", _code(reads),
                         format_duration(df.window), _duration(df.delay), "yes" if df.reads_label else "no"])
        elif isinstance(df, RatioDefinition):
            rows.append([_code(df.name), "ratio", f"{_code(df.numerator)} / {_code(df.denominator)}", "-", "-", "-"])
    return rows


def _section_data(doc: Document, o: TrainOutcome) -> None:
    spec, ds = o.spec, o.dataset
    doc.heading(HEADINGS[1])
    items = [
        f"**Source:** {_code(ds.source.describe())}, {len(ds.frame):,} rows read.",
        f"**Data fingerprint:** {_code(ds.fingerprint)}.",
        f"**Label:** {_code(spec.data.label)}; {int(np.asarray(ds.y).sum()):,} positives in all rows "
        f"({_pct(np.asarray(ds.y).mean(), 2)}).",
        f"**Label delay:** {_duration(spec.data.label_delay)} (a label counts only once this has passed); "
        f"**gap** between windows: {_duration(spec.gap)}.",
        f"**Split:** {spec.split.strategy} split, {'prequential' if o.prequential is not None else 'single'} "
        "protocol.",
    ]
    if ds.times is not None and len(ds.times):
        t = pd.to_datetime(pd.Series(np.asarray(ds.times)))
        items.append(f"**Event times:** {t.min():%Y-%m-%d %H:%M} to {t.max():%Y-%m-%d %H:%M} "
                     f"(column {_code(spec.data.timestamp)}).")
    if ds.definitions_hash:
        items.append(f"**Feature definitions hash:** {_code(ds.definitions_hash)}.")
    doc.bullets(items)
    if o.split_warning:
        doc.warning(o.split_warning)

    rows = []
    for name, w in o.windows.items():
        prev = (w.positives / w.rows) if w.positives is not None and w.rows else None
        rows.append([name, w.label(), _int(w.rows), _int(w.positives), _pct(prev, 2)])
    doc.text("Windows (event time; each ends where the label delay allows the next to begin):")
    doc.table(["window", "dates", "rows", "positives", "prevalence"], rows)
    removed = {k: v for k, v in o.removed_known_positives.items() if v}
    if removed:
        doc.text("Rows of entities already known positive were removed before scoring (their cards are blocked "
                 "already): " + "; ".join(f"{k} {_int(v)} rows" for k, v in removed.items()) + ".")

    doc.text(f"{len(ds.feature_names)} model inputs, each computed only from information available at the "
             "event's time (window features end `delay` before the event):")
    doc.table(["feature", "kind", "reads", "window", "delay", "reads labels"], _feature_rows(o))
    if spec.features.request_time_only:
        doc.text("Computable from the request alone (no store needed): "
                 + ", ".join(_code(c) for c in spec.features.request_time_only) + ".")

    if o.leakage:
        severe = sum(1 for f in o.leakage if f.severity == "severe")
        doc.text(f"Leakage checks: {len(o.leakage)} finding(s), {severe} severe"
                 + (" — training continued because `models.allow_leakage` is true." if severe else "."))
        doc.table(["severity", "check", "column", "value", "why"],
                  [[f.severity, f.check, _code(f.column) if f.column else "(split)", _num(f.value),
                    f.reason] for f in o.leakage])
    elif o.prequential is not None:
        doc.text("Leakage checks: none recorded — the prequential protocol does not run them; run the single "
                 "protocol to check the inputs.")
    else:
        doc.text("Leakage checks: no findings (single-feature AUC, functions of the label, feature times, "
                 "train/test overlap, duplicates, unavailable features).")


def _section_baselines(doc: Document, o: TrainOutcome, vs: list[Verdict]) -> None:
    k = _k(o)
    doc.heading(HEADINGS[2])
    if o.split_warning:
        doc.warning(o.split_warning + " Read every comparison below as optimistic.")
    prequential = o.prequential is not None
    spread = "mean ± std over the prequential test folds" if prequential else "test window, 95 % bootstrap intervals"
    metrics = [m for m in ("roc_auc", "average_precision", "card_precision_at_k", "expected_cost")
               if any(not _missing(e.test.get(m)) for e in o.evaluated)]
    cols = ["model", "role", f"validation {metric_label(_selection_metric(o), k)}"]
    cols += [metric_label(m, k) for m in metrics]
    if not prequential:
        cols += ["precision", "recall", "threshold"]
    rows = []
    for e in o.evaluated:
        role = e.role + (" (chosen)" if e is o.best else "")
        row = [e.name, role, _num(e.validation_score)] + [_value(o, e, m) for m in metrics]
        if not prequential:
            row += [_num(e.test.get("precision")), _num(e.test.get("recall")), _num(e.threshold, 4)]
        rows.append(row)
    doc.text(f"All models on the same rows ({spread})."
             + ("" if prequential else " Each baseline gets its own threshold by the same cost/capacity rule on "
                "validation; only the chosen model is calibrated."))
    doc.table(cols, rows)

    if vs:
        doc.bullets([_sentence(o, v, k) for v in vs])
    judged = verdict_metrics(o)
    beaten = [b.name for b in o.baselines
              if all(v.beats for v in vs if v.baseline == b.name and v.metric in judged)]
    not_beaten = [b.name for b in o.baselines if b.name not in beaten]
    names = ", ".join(metric_label(m, k) for m in judged)
    if not_beaten:
        doc.text(f"**Verdict: {o.best.name} does not beat every baseline.** It does not beat "
                 f"{', '.join(not_beaten)} on every one of {names} with non-overlapping "
                 f"{'mean ± std' if prequential else 'intervals'}"
                 + (f"; it does beat {', '.join(beaten)}." if beaten else "."))
    else:
        doc.text(f"**Verdict: {o.best.name} beats every baseline** ({', '.join(beaten)}) on {names} with "
                 f"non-overlapping {'mean ± std' if prequential else 'intervals'}.")
    others = [e for e in o.candidates if e is not o.best]
    if others:
        doc.text(f"{o.best.name} was chosen over {', '.join(e.name for e in others)} on validation "
                 f"{metric_label(_selection_metric(o), k)} ({_num(o.best.validation_score)} against "
                 + ", ".join(_num(e.validation_score) for e in others) + ")"
                 + (f"; rule: {o.search_budget['selection']}." if o.search_budget.get("selection") else "."))

    if prequential and o.prequential is not None and len(o.prequential):
        table = o.prequential
        fold_metrics = [m for m in ("roc_auc", "average_precision", "card_precision_at_k") if m in table.columns]
        doc.text("Per test fold (fold 0 is the most recent; the deployed model is refit on its training window):")
        doc.table(["model", "fold", "train window", "test window"] + [metric_label(m, k) for m in fold_metrics],
                  [[str(r["model"]), str(r["fold"]), str(r["train_window"]), str(r["test_window"])]
                   + [_num(r[m]) for m in fold_metrics] for _, r in table.iterrows()])


def _selection_metric(o: TrainOutcome) -> str:
    head = o.spec.decision.headline_metric
    return "average_precision" if head in ("expected_cost", "log_loss", "brier") else head


def _why_metric(o: TrainOutcome, t: _Test) -> str:
    d = o.spec.decision
    head = d.headline_metric
    k = _k(o)
    value = _value(o, o.best, head)
    if head == "card_precision_at_k" and d.precision_at_k:
        p = d.precision_at_k
        cap = d.capacity
        cap_text = (f"{d.actor or 'The actor'} can act on {cap.max_positives:,} per {_per(cap.per)}; "
                    if cap else "")
        found = o.best.test.get("card_precision_at_k")
        return (f"{cap_text}Card Precision@{p.k} is the share of the {p.k:,} {_unit(p.entity)} with the highest "
                f"score each {_per(p.per)} that were truly positive — what one {_per(p.per)} of "
                f"{d.positive_action} finds. On test the chosen model scores {value}, about "
                f"{_num((found or 0) * p.k, 1)} true positives among {p.k:,} per {_per(p.per)}.")
    if head == "average_precision":
        return (f"Average precision summarises precision over every recall level of the ranking, so it rewards "
                f"putting positives first; a random ranking scores the prevalence ({_num(t.prevalence, 4)}). "
                f"The chosen model scores {value}.")
    if head == "roc_auc":
        return (f"ROC AUC is the chance a random positive ranks above a random negative; it ignores prevalence, so "
                f"read it with average precision ({_value(o, o.best, 'average_precision')}). The chosen model "
                f"scores {value}.")
    if head == "expected_cost":
        return (f"Expected cost per event uses the spec's costs at the chosen threshold, the decision's own "
                f"currency. The chosen model costs {value} per event; approving everything would cost "
                f"{_num(t.do_nothing_cost / max(t.rows, 1))}.")
    return (f"{metric_label(head, k)} scores the probabilities themselves, which matters when the score is read "
            f"as a probability. The chosen model scores {value}.")


def _section_metric(doc: Document, o: TrainOutcome, t: _Test) -> None:
    k = _k(o)
    d = o.spec.decision
    doc.heading(HEADINGS[3])
    doc.text(f"**Headline metric: {metric_label(d.headline_metric, k)}** (`decision.headline_metric`). "
             + _why_metric(o, t))
    cm = t.confusion
    doc.text(f"**Why not accuracy:** the test window holds {int(t.y.sum()):,} positives in {t.rows:,} rows, a "
             f"prevalence of {_pct(t.prevalence, 2)}. Approving everything is {_pct(1 - t.prevalence, 2)} accurate "
             f"and finds none of them; the chosen model at its threshold is {_pct(t.accuracy, 2)} accurate and "
             f"finds {_int(cm.tp)} ({_pct(cm.recall)}). Accuracy rewards the majority class, so it is not used.")
    sel = _selection_metric(o)
    if sel != d.headline_metric:
        doc.text(f"Models are ranked on validation by {metric_label(sel, k)}, since {metric_label(d.headline_metric)} "
                 "depends on the threshold chosen afterwards.")
    test = o.best.test
    doc.bullets([f"{metric_label(m, k)}: {_value(o, o.best, m, 4)}" for m in
                 ("roc_auc", "average_precision", "card_precision_at_k", "brier", "log_loss", "ece",
                  "expected_cost", "precision", "recall") if not _missing(test.get(m))])

    curves = {e.name: (t.y, np.asarray(e.test_scores)) for e in [o.best, *[x for x in o.evaluated if x is not o.best]]
              if e.test_scores is not None and len(e.test_scores) == t.rows}
    curves.setdefault(o.best.name, (t.y, t.scores))
    doc.figure("roc", lambda: plots.roc_png(curves), "ROC curves on the test window (chosen model: thicker line).")
    doc.figure("pr", lambda: plots.pr_png(curves, t.prevalence),
               "Precision-recall curves on the test window; the dotted line is the prevalence.")

    cal = o.calibration_table
    chosen = cal[cal["chosen"]]["method"].iloc[0] if "chosen" in cal and cal["chosen"].any() else "none"
    window = "the latest test fold's block" if o.prequential is not None else "validation"
    doc.text(f"**Calibration:** compared on {window} by cross-fitting; **{chosen}** kept (lowest Brier score).")
    doc.table(["method", "Brier", "log loss", "chosen", "note"],
              [[str(r["method"]), _num(r["brier"], 4), _num(r["log_loss"], 4), "yes" if r.get("chosen") else "",
                str(r["error"]) if isinstance(r.get("error"), str) else ""] for _, r in cal.iterrows()])
    tables = {}
    if t.raw_scores is not None and t.raw_scores.min() >= 0 and t.raw_scores.max() <= 1:
        tables["before calibration"] = M.reliability(t.y, t.raw_scores, bins=10, strategy="quantile")
    tables[f"after ({chosen})"] = M.reliability(t.y, np.clip(t.scores, 0, 1), bins=10, strategy="quantile")
    eces = {name: M.expected_calibration_error(t.y, s, bins=10, strategy="quantile")
            for name, s in (("before", t.raw_scores), ("after", np.clip(t.scores, 0, 1)))
            if s is not None and s.min() >= 0 and s.max() <= 1}
    if eces:
        doc.text("Calibration error on test (ECE, 10 equal-count bins): "
                 + "; ".join(f"{name} {_num(v, 4)}" for name, v in eces.items()) + ".")
    doc.figure("calibration", lambda: plots.reliability_png(tables),
               "Reliability diagram on the test window, before and after calibration (equal-count bins).")


def _section_errors(doc: Document, o: TrainOutcome, t: _Test) -> None:
    spec = o.spec
    d = spec.decision
    doc.heading(HEADINGS[4])
    cm = t.confusion
    if o.prequential is not None:
        doc.warning("Under the prequential protocol the calibration and the threshold were fitted on this same "
                    "block (the latest test fold), so the decisions and costs below are in-sample and optimistic; "
                    "the per-fold ranking metrics in section 3 are not affected.")
    doc.text(f"At the threshold {_num(t.threshold, 4)} on the test window ({t.rows:,} rows):")
    doc.table(["", f"decided {d.positive_action}", f"decided {d.negative_action}"],
              [["actually positive", f"{_int(cm.tp)} (true positives)", f"{_int(cm.fn)} (false negatives)"],
               ["actually negative", f"{_int(cm.fp)} (false positives)", f"{_int(cm.tn)} (true negatives)"]])
    c, n = t.cost_by_outcome, t.count_by_outcome
    fn, fp = c["false_negative"], c["false_positive"]
    total = t.total_cost
    bigger = "missed positives (false negatives)" if fn >= fp else "needless actions (false positives)"
    doc.text(f"Precision {_pct(cm.precision)}, recall {_pct(cm.recall)}. Total cost on test {_money(total)} "
             f"({_num(total / max(t.rows, 1), 4)} per event): false negatives {_money(fn)} over {n['false_negative']:,} "
             f"rows ({_pct(fn / total if total else float('nan'))} of the total), false positives {_money(fp)} over "
             f"{n['false_positive']:,} rows ({_pct(fp / total if total else float('nan'))}), true positives "
             f"{_money(c['true_positive'])}. **The errors that cost most are {bigger}.**")
    saved = t.do_nothing_cost - total
    doc.text(f"For comparison, {d.negative_action} for every event would cost {_money(t.do_nothing_cost)} and "
             f"{d.positive_action} for every event {_money(t.act_on_all_cost)}; the model's decisions "
             f"{'save' if saved >= 0 else 'lose'} {_money(abs(saved))} against doing nothing.")
    cap = d.capacity
    if cap and t.times is not None:
        period = M.period_index(t.times, cap.per)
        counts = pd.Series(t.scores >= t.threshold).groupby(np.asarray(period)).sum()
        over = int((counts > cap.max_positives).sum())
        doc.text(f"Capacity on test: {_num(counts.mean(), 1)} {d.positive_action} decisions per "
                 f"{_per(cap.per)} on average, at most {_int(counts.max())}, against a capacity of "
                 f"{cap.max_positives:,}; {over} of {len(counts)} periods exceed it.")

    # Cost curves: where the threshold was chosen, and on test.
    window = "threshold window (latest test fold)" if o.prequential is not None else "validation"
    curves = {window: o.threshold_choice.curve}
    with contextlib.suppress(KeelError):
        curves["test"] = choose_threshold(t.y, t.scores, t.costs).curve
    doc.figure("cost_curve", lambda: plots.cost_curve_png(
        curves, t.threshold, capacity_threshold=o.threshold_choice.capacity_threshold),
               "Expected cost per event by threshold; the vertical line is the chosen threshold.")
    doc.figure("score_distribution", lambda: plots.score_distribution_png(t.y, t.scores, t.threshold),
               "Calibrated test scores by class (each class normalised to its own rows).")

    costliest = o.slices.costliest
    if costliest is not None and len(costliest):
        keep = [c for c in dict.fromkeys((spec.data.id_column, spec.data.timestamp, *spec.data.entity_keys,
                                          *(spec.features.raw or o.dataset.feature_names[:3]))) if c and
                c in costliest.columns]
        head = [*keep, "label", "score", "error", "cost"]
        rows = []
        for _, r in costliest.iterrows():
            rows.append([_cell(r[c]) for c in keep] + [str(int(r["label"])), _num(r["score"], 4),
                                                       str(r["error"]).replace("_", " "), _money(r["cost"])])
        share = float(costliest["cost"].sum()) / total if total else float("nan")
        doc.text(f"The {len(costliest)} costliest wrong decisions on test ({_pct(share)} of the total cost):")
        doc.table(head, rows)

    worst = o.slices.worst
    if worst is not None and len(worst):
        overall = o.best.test.get("average_precision")
        doc.text(f"Worst slices by average precision (overall {_num(overall)}; segments with enough rows and at "
                 "least one positive):")
        doc.table(["dimension", "segment", "rows", "positives", "prevalence", "average precision", "recall",
                   "share of cost"],
                  [[_code(r["dimension"]), str(r["segment"]), _int(r["rows"]), _int(r["positives"]),
                    _pct(r["prevalence"], 2), _num(r["average_precision"]), _pct(r["recall"]),
                    _pct(r["cost_share"])] for _, r in worst.iterrows()])


def _cell(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return _num(v, 2)
    if isinstance(v, pd.Timestamp):
        return f"{v:%Y-%m-%d %H:%M}"
    return str(v)


def collect_next(o: TrainOutcome, t: _Test) -> list[str]:
    """Sentences on which data to collect next, each derived from a number in the outcome."""
    spec = o.spec
    out: list[str] = []
    overall_ap = o.best.test.get("average_precision")
    total_pos = max(int(t.y.sum()), 1)
    worst = o.slices.worst
    if worst is not None and len(worst):
        for _, r in worst[worst["dimension"] != "period"].head(3).iterrows():
            pos = int(r["positives"])
            why = (f"only {pos} positives there, too few to learn from: label more events of this segment "
                   "(e.g. review a sample of them)" if pos < 50 else
                   f"{pos} positives there, so more of the same rows will not help as much as a new signal "
                   "that separates them (a feature describing this segment)")
            out.append(f"{_code(r['dimension'])} in {_code(r['segment'])}: average precision "
                       f"{_num(r['average_precision'])} against {_num(overall_ap)} overall, on {_int(r['rows'])} "
                       f"rows holding {_pct(pos / total_pos)} of the test positives; {why}.")
    table = o.slices.table
    if table is not None and len(table) and "cost_share" in table:
        seg = table[(table["dimension"] != "period") & table["cost_share"].notna() & (table["rows"] > 0)].copy()
        if len(seg):
            seg["row_share"] = seg["rows"] / max(t.rows, 1)
            seg["ratio"] = seg["cost_share"] / seg["row_share"]
            r = seg.sort_values("ratio", ascending=False).iloc[0]
            if r["ratio"] > 1.5:
                out.append(f"Cost concentrates in {_code(r['dimension'])} {_code(r['segment'])}: "
                           f"{_pct(r['row_share'])} of the rows carry {_pct(r['cost_share'])} of the cost at the "
                           f"threshold (recall there {_pct(r['recall'])}); errors there are the most expensive to "
                           "leave, so labels and signals for that segment pay most.")
        per = table[(table["dimension"] == "period") & table["average_precision"].notna()]
        if len(per) >= 2:
            lo, hi = per.sort_values("average_precision").iloc[0], per.sort_values("average_precision").iloc[-1]
            out.append(f"Across test days average precision ranges from {_num(lo['average_precision'])} "
                       f"({lo['segment']}, {_int(lo['positives'])} positives) to {_num(hi['average_precision'])} "
                       f"({hi['segment']}); a longer test window (now {_duration(spec.split.test)}) would "
                       "narrow the intervals above.")
    train_w = o.windows.get("train")
    if train_w is not None and train_w.positives is not None:
        rate = train_w.positives / max(train_w.rows, 1)
        text = (f"Class balance: the training window holds {train_w.positives:,} positives in {train_w.rows:,} "
                f"rows ({_pct(rate, 2)}).")
        if train_w.start is not None and train_w.end is not None:
            days = max((train_w.end - train_w.start).total_seconds() / 86400, 1e-9)
            text += (f" That is {_num(train_w.positives / days, 1)} positives a day; each extra week of training "
                     f"history (split.train is {_duration(spec.split.train) if spec.split.train else 'all history'})"
                     f" adds about {_int(7 * train_w.positives / days)}.")
        if train_w.positives < 1000:
            text += " Fewer than 1,000 positives: more labelled positives will help more than more negatives."
        out.append(text)
    delay = spec.data.label_delay
    test_w = o.windows.get("test")
    if delay and delay > timedelta(0) and train_w is not None and test_w is not None and train_w.end and test_w.start:
        lag = (test_w.start - train_w.end).total_seconds() / 86400
        out.append(f"Label delay: labels arrive {format_duration(delay)} after the event; with the gap of "
                   f"{_duration(spec.gap)} before each later window, the model's training data ends {_num(lag, 1)} "
                   f"days before the first test event. Faster labels (quicker confirmation of positives) would "
                   f"shorten every gap and let the model learn from fresher events.")
    for f in o.leakage:
        what = ("keep it out of the inputs, and record when it becomes known" if f.severity == "warning" else
                "find out when its value becomes known relative to the event; until then train without it")
        out.append(f"Leakage finding on {_code(f.column) if f.column else 'the split'} ({f.check}, {f.severity}): "
                   f"{what}.")
    X = o.dataset.X[np.asarray(o.test_mask)]
    if len(X):
        missing = X.isna().mean().sort_values(ascending=False)
        missing = missing[missing > 0.05]
        if len(missing):
            out.append("Missing values on test: " + ", ".join(f"{_code(c)} {_pct(v)}" for c, v in missing.head(3).items())
                       + "; filling these at the source would give the model more to read.")
    if o.split_warning:
        out.append("Record an event time for every row: without it the split is random and every number in this "
                   "report is optimistic.")
    return out


def _section_next(doc: Document, o: TrainOutcome, t: _Test) -> None:
    doc.heading(HEADINGS[5])
    items = collect_next(o, t)
    if items:
        doc.bullets(items)
    else:
        doc.text("Nothing in the slices, leakage checks or class balance points to a data gap.")


def _section_budget(doc: Document, o: TrainOutcome) -> None:
    b = o.search_budget
    doc.heading(HEADINGS[6])
    fams = b.get("families", {})
    doc.text(f"Random search: up to {b.get('trials_per_family', '-')} trials per model family within "
             f"{_num(b.get('seconds_per_family'), 1)} s each (`models.search_trials`, "
             f"`models.search_budget_seconds`); hyper-parameters chosen on validation only. Bootstrap: "
             f"{o.spec.models.bootstrap} resamples.")
    if fams:
        doc.table(["family", "trials", "seconds"], [[name, str(v.get("trials", "-")), _num(v.get("seconds"), 1)]
                                                     for name, v in fams.items()])
    if o.best.kind == "ensemble":
        doc.text(f"{o.best.name} is the mean of the uncalibrated probabilities of "
                 + "; ".join(f"{name} ({', '.join(f'{_code(k)} = {v}' for k, v in p.items()) or 'defaults'})"
                             for name, p in o.best.params.get("members", {}).items())
                 + ", each with its class weight undone (p / (p + w (1 - p)) for a positive row's weight w), then"
                 " calibrated.")
    else:
        doc.text(f"Chosen hyper-parameters of {o.best.name}: "
                 + (", ".join(f"{_code(k)} = {v}" for k, v in o.best.params.items()) or "defaults") + ".")
    if o.seconds:
        doc.table(["stage", "seconds"], [[k.replace("_", " "), _num(v, 1)] for k, v in o.seconds.items()])


# ---------------------------------------------------------------------------------------------- JSON
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | str | bool) or value is None:
        return value
    if isinstance(value, pd.Timestamp | timedelta):
        return str(value)
    if isinstance(value, pd.DataFrame):
        return _jsonable(value.to_dict(orient="records"))
    return str(value)


def report_metrics(o: TrainOutcome) -> dict[str, Any]:
    """Everything the report states, as plain data (``metrics.json``)."""
    t = _test_facts(o)
    vs = verdicts(o)
    th = o.threshold_choice
    return _jsonable({
        "project": o.spec.project.name,
        "spec_hash": o.spec.spec_hash(),
        "data_source": o.dataset.source.describe(),
        "data_fingerprint": o.dataset.fingerprint,
        "definitions_hash": o.dataset.definitions_hash,
        "protocol": "prequential" if o.prequential is not None else "single",
        "split_warning": o.split_warning,
        "chosen": o.best.name,
        "headline_metric": o.spec.decision.headline_metric,
        "metrics": o.metrics(),
        "comparison": o.comparison(),
        "verdicts": [{"baseline": v.baseline, "metric": v.metric, "chosen": v.mine, "baseline_value": v.theirs,
                      "difference": v.difference, "better": v.better, "separated": v.separated,
                      "beats": v.beats} for v in vs],
        "beats_every_baseline": beats_every_baseline(o, vs),
        "threshold": {"threshold": th.threshold, "bound": th.bound, "expected_cost": th.expected_cost,
                      "cost_optimal_threshold": th.cost_optimal_threshold,
                      "cost_optimal_expected_cost": th.cost_optimal_expected_cost,
                      "capacity_threshold": th.capacity_threshold},
        "test_decisions": {"rows": t.rows, "prevalence": t.prevalence, "accuracy": t.accuracy,
                           "accuracy_if_all_negative": 1 - t.prevalence, **t.confusion.as_dict(),
                           "cost_by_outcome": t.cost_by_outcome, "total_cost": t.total_cost,
                           "do_nothing_cost": t.do_nothing_cost, "act_on_all_cost": t.act_on_all_cost},
        "windows": {k: {"dates": w.label(), "start": w.start, "end": w.end, "rows": w.rows, "positives": w.positives}
                    for k, w in o.windows.items()},
        "removed_known_positives": o.removed_known_positives,
        "leakage": [f.as_dict() for f in o.leakage],
        "calibration": o.calibration_table,
        "worst_slices": o.slices.worst,
        "prequential": o.prequential,
        "search_budget": o.search_budget,
        "seconds": o.seconds,
        "collect_next": collect_next(o, t),
    })


# ------------------------------------------------------------------------------------------- writing
def build_report(o: TrainOutcome, *, figures: bool = True) -> Document:
    """The report as a :class:`Document` (blocks and PNG figures), ready to render.

    ``figures=False`` skips drawing (the text and tables are the same), for a quick text-only report.
    """
    t = _test_facts(o)
    vs = verdicts(o)
    doc = Document(f"Training report: {o.spec.project.name}", draw=figures)
    beaten = beats_every_baseline(o, vs)
    doc.text(f"Chosen model **{o.best.name}** ({o.best.kind}), threshold {_num(t.threshold, 4)}; "
             f"{'beats every baseline' if beaten else 'does not beat every baseline'} on "
             f"{', '.join(metric_label(m, _k(o)) for m in verdict_metrics(o))}. Spec hash "
             f"{_code(o.spec.spec_hash()[:12])}, data fingerprint {_code(o.dataset.fingerprint[:12])}, "
             f"{'prequential' if o.prequential is not None else 'single'} protocol.")
    if o.split_warning:
        doc.warning(o.split_warning)
    _section_decision(doc, o, t)
    _section_data(doc, o)
    _section_baselines(doc, o, vs)
    _section_metric(doc, o, t)
    _section_errors(doc, o, t)
    _section_next(doc, o, t)
    _section_budget(doc, o)
    return doc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_report(outcome: TrainOutcome, out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``metrics.json`` and ``plots/*.png`` into ``out_dir``.

    The folder is replaced as a whole (written beside it, then renamed). Returns the paths by name:
    ``markdown``, ``html``, ``metrics`` and one per figure (``roc``, ``pr``, ``calibration``,
    ``cost_curve``, ``score_distribution``).
    """
    out_dir = Path(out_dir)
    doc = build_report(outcome)
    markdown, page = render_markdown(doc), render_html(doc)
    metrics_text = json.dumps(report_metrics(outcome), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_dir(out_dir) as tmp:
        # mkdtemp makes the folder private (0700); a report is meant to be read like any other file.
        tmp.chmod(0o777 & ~_umask())
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "metrics.json").write_text(metrics_text, encoding="utf-8")
        (tmp / "plots").mkdir()
        for path, (png, _caption) in doc.figures.items():
            (tmp / path).write_bytes(png)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "metrics": out_dir / "metrics.json"}
    paths.update({key: out_dir / "plots" / name for key, name in FIGURES.items() if f"plots/{name}" in doc.figures})
    return paths


__all__ = [
    "HEADINGS",
    "Document",
    "Verdict",
    "beats_every_baseline",
    "build_report",
    "collect_next",
    "compared_metrics",
    "metric_label",
    "render_html",
    "render_markdown",
    "report_metrics",
    "verdict_metrics",
    "verdicts",
    "write_report",
]
