"""Number and phrase formatting shared by the documents (one format per kind, so tests can cross-check)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from keel.durations import format_duration
from keel.spec import Spec

DIGITS = 4  # every rate/score in the docs is the recorded value rounded to 4 decimals


def missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return True


def num(v: Any, digits: int = DIGITS) -> str:
    return "not recorded" if missing(v) else f"{float(v):.{digits}f}"


def count(v: Any) -> str:
    return "not recorded" if missing(v) else f"{round(float(v)):,}"


def money(v: Any) -> str:
    return "not recorded" if missing(v) else f"{float(v):,.2f}"


def pct(v: Any) -> str:
    return "not recorded" if missing(v) else f"{100 * float(v):.1f} %"


def interval(low: Any, high: Any) -> str:
    return "-" if missing(low) or missing(high) else f"[{num(low)}, {num(high)}]"


def duration(td: timedelta | None) -> str:
    return "none" if td is None else (format_duration(td) if td else "0")


def code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def run_ref(run_id: str) -> str:
    return f"run {code(run_id)}"


def metric_label(metric: str, spec: Spec) -> str:
    k = spec.decision.precision_at_k
    names = {
        "average_precision": "average precision", "roc_auc": "ROC AUC", "brier": "Brier score",
        "log_loss": "log loss", "expected_cost": "expected cost per event", "ece": "calibration error (ECE)",
        "card_precision_at_k": f"Card Precision@{k.k if k else 'k'}", "precision": "precision", "recall": "recall",
        "f1": "F1", "positive_rate": "share of events acted on", "prevalence": "prevalence",
    }
    return names.get(metric, metric.replace("_", " "))


def cost_text(value: float | str) -> str:
    return f"the value of {code(value)} (per row)" if isinstance(value, str) else f"{float(value):g}"


def unit(spec: Spec) -> str:
    k = spec.decision.precision_at_k
    return k.entity if k and k.entity else "event"


def period(td: timedelta) -> str:
    names = {timedelta(days=1): "day", timedelta(days=7): "week", timedelta(hours=1): "hour"}
    return names.get(td, format_duration(td))


__all__ = ["DIGITS", "code", "cost_text", "count", "duration", "interval", "metric_label", "missing", "money", "num",
           "pct", "period", "run_ref", "unit"]
