"""``keel retrain``: a challenger on the latest labelled data, compared with the champion on the same rows.

The plan, as of ``as_of`` (default: the newest event time in the source):

* labels are known up to ``L = as_of - data.label_delay``; nothing later is used as a label;
* the challenger is trained by :func:`keel.train.train` with a copy of the spec whose split ends at ``L``
  (``split.test_end = L``, ``split.protocol = "single"``) and whose training window is
  ``monitoring.retrain_window`` — the usual train / gap / validation / gap / test layout, so it is calibrated,
  thresholded and tested like any model;
* champion and challenger are scored on the **same rows**, the challenger's test window (the most recent
  labelled window, which neither model was fitted or calibrated on), and compared on ``decision.headline_metric``
  with each model's own threshold;
* the challenger is registered (:func:`keel.train.record`) and promoted only if it beats the champion by more
  than ``monitoring.promote_margin``; otherwise the champion stays and the result says why.

The registry's own promotion rule compares recorded test metrics from *different* windows; here the comparison on
identical rows is the evidence, so the promotion is recorded with that comparison as its reason (forced past the
registry's recorded-metric check only when the same-window comparison says the challenger wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import MonitorError, RegistryError

LOWER = {"expected_cost", "log_loss", "brier", "ece"}


@dataclass
class RetrainResult:
    """What ``keel retrain`` planned and (unless a dry run) did."""

    dry_run: bool
    as_of: datetime
    latest_labelled: datetime
    windows: dict[str, dict[str, Any]]
    metric: str
    margin: float
    champion_version: int | None = None
    challenger_version: int | None = None
    champion_value: float | None = None
    challenger_value: float | None = None
    evaluation_rows: int = 0
    evaluation_window: tuple[str, str] | None = None
    promoted: bool = False
    decision: str = ""
    notes: list[str] = field(default_factory=list)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    challenger_metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"retrain as of {self.as_of:%Y-%m-%d %H:%M}; labels known up to {self.latest_labelled:%Y-%m-%d %H:%M}"]
        for name, w in self.windows.items():
            lines.append(f"  {name:<10} {w['start']} .. {w['end']}  ({w['rows']:,} rows)")
        if self.dry_run:
            lines.append("dry run: nothing trained")
        else:
            lines.append(f"{self.metric} on {self.evaluation_rows:,} identical rows {self.evaluation_window}: "
                         f"champion v{self.champion_version} {_f(self.champion_value)} vs challenger "
                         f"v{self.challenger_version} {_f(self.challenger_value)} (margin {self.margin:g})")
            lines.append(self.decision)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["as_of"], d["latest_labelled"] = self.as_of.isoformat(), self.latest_labelled.isoformat()
        return d


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def plan_windows(spec: Any, latest_labelled: datetime) -> dict[str, tuple[datetime, datetime]]:
    """The challenger's train / validation / test windows ending at ``latest_labelled`` (half-open)."""
    s, gap = spec.split, spec.gap
    test = (latest_labelled - s.test, latest_labelled)
    val = (test[0] - gap - s.validation, test[0] - gap)
    train = (val[0] - gap - spec.monitoring.retrain_window, val[0] - gap)
    return {"train": train, "validation": val, "test": test}


def retrain_spec(spec: Any, latest_labelled: datetime) -> Any:
    """A copy of the spec whose single time split ends at ``latest_labelled`` with ``retrain_window`` of training."""
    split = spec.split.model_copy(update={"test_end": latest_labelled, "test_start": None, "protocol": "single",
                                          "train": spec.monitoring.retrain_window})
    return spec.model_copy(update={"split": split})


def retrain(spec: Any, *, dry_run: bool = False, as_of: datetime | str | None = None, registry: Any | None = None,
            progress: Any | None = None, actor: str = "keel retrain") -> RetrainResult:
    """Train a challenger on the latest labelled window, compare with the champion on identical rows, promote if
    it wins by ``monitoring.promote_margin`` (see the module docstring). ``dry_run`` returns the plan only.

    Example::

        plan = retrain(spec, dry_run=True); print(plan.summary())
        result = retrain(spec); result.promoted, result.decision
    """
    from keel.data.sources import source_from_spec

    data = spec.data
    if not data.timestamp:
        raise MonitorError("keel retrain needs data.timestamp: the latest labelled window is defined by time.",
                           hint="Name the event time column in [data] timestamp.")
    say = progress or (lambda _m: None)
    src = source_from_spec(spec)
    ts = data.timestamp
    times = pd.to_datetime(src.read(columns=[ts])[ts])
    if times.empty:
        raise MonitorError(f"The source {src.describe()} has no rows to retrain on.")
    when = pd.Timestamp(as_of if as_of is not None else times.max()).to_pydatetime()
    latest = when - data.label_delay
    windows = plan_windows(spec, latest)
    info = {name: {"start": f"{a:%Y-%m-%d %H:%M}", "end": f"{b:%Y-%m-%d %H:%M}",
                   "rows": int(((times >= a) & (times < b)).sum())} for name, (a, b) in windows.items()}
    metric = spec.decision.headline_metric
    result = RetrainResult(dry_run=dry_run, as_of=when, latest_labelled=latest, windows=info, metric=metric,
                           margin=spec.monitoring.promote_margin)
    empty = [n for n, w in info.items() if w["rows"] == 0]
    if empty:
        result.notes.append(f"empty window(s): {', '.join(empty)}; training would fail — widen [split] or wait "
                            "for more data")
    if dry_run:
        return result
    from keel.registry import Registry
    from keel.train import record, train

    reg = registry or Registry.from_spec(spec)
    champion_version = reg.resolve("champion")
    champion = reg.load("champion")[0] if champion_version is not None else None
    child = retrain_spec(spec, latest)
    say(f"training a challenger on {info['train']['start']} .. {info['train']['end']}")
    outcome = train(child, progress=say)
    te = outcome.test_mask
    ds = outcome.dataset
    chal_scores = outcome.test_scores
    chal_metrics = _metrics(spec, ds, te, chal_scores, outcome.model.threshold)
    result.challenger_metrics = chal_metrics
    result.challenger_value = chal_metrics.get(metric)
    result.evaluation_rows = int(te.sum())
    tt = ds.times[te] if ds.times is not None else np.array([])
    result.evaluation_window = (str(pd.Timestamp(tt.min())), str(pd.Timestamp(tt.max()))) if len(tt) else None
    if champion is not None:
        missing = [c for c in champion.feature_names if c not in ds.frame.columns]
        if missing:
            result.notes.append(f"the champion reads features {missing} the current spec does not compute; it "
                                "cannot be scored on the same rows")
        else:
            champ_scores = champion.scores(ds.frame.loc[te, champion.feature_names])
            champ_metrics = _metrics(spec, ds, te, champ_scores, champion.threshold)
            result.champion_metrics = champ_metrics
            result.champion_value = champ_metrics.get(metric)
            trained = (champion.metadata or {}).get("windows", {}).get("train", {})
            if trained.get("end") and pd.Timestamp(trained["end"]) > pd.Timestamp(windows["test"][0]):
                result.notes.append("the champion's training window overlaps the evaluation window; its numbers "
                                    "there are optimistic")
    registered = record(outcome, reg, actor=actor)
    result.challenger_version = registered.version
    result.champion_version = champion_version
    # The challenger's profile is cheapest now, with its training frame in hand.
    from keel.monitor.profile import ensure_profile

    ensure_profile(spec, outcome.model, registered.version, frame=ds.frame)
    if champion_version is None:
        result.promoted = "champion" in registered.aliases
        result.decision = f"no champion before; {registered.note}"
        return result
    from keel.registry import is_better

    wins = is_better(result.challenger_value, result.champion_value, metric, result.margin)
    if not wins:
        direction = "lower" if metric in LOWER else "higher"
        result.decision = (f"kept champion v{champion_version}: challenger v{registered.version} does not beat it by "
                           f"more than {result.margin:g} on {metric} ({direction} is better): "
                           f"{_f(result.challenger_value)} vs {_f(result.champion_value)} on the same rows")
        return result
    reason = (f"keel retrain: {metric} {_f(result.challenger_value)} vs champion {_f(result.champion_value)} on the "
              f"same {result.evaluation_rows} rows {result.evaluation_window} (margin {result.margin:g})")
    try:
        reg.promote(registered.version, actor=actor, reason=reason)
    except RegistryError:
        reg.promote(registered.version, actor=actor, reason=reason + "; recorded test metrics come from different "
                    "windows, so the same-window comparison decides", force=True)
    result.promoted = True
    result.decision = f"promoted challenger v{registered.version} to champion ({reason.removeprefix('keel retrain: ')})"
    return result


def _metrics(spec: Any, ds: Any, mask: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from keel.train import evaluate_window

    k_spec = spec.decision.precision_at_k
    out, _ = evaluate_window(ds.y[mask], scores, threshold=threshold, costs=ds.costs.take(mask),
                             times=ds.times[mask] if ds.times is not None else None,
                             entity=ds.entity[mask] if ds.entity is not None else None,
                             k=k_spec.k if k_spec else 100, per=k_spec.per if k_spec else timedelta(days=1),
                             bootstrap=0, seed=spec.models.seed)
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


__all__ = ["RetrainResult", "plan_windows", "retrain", "retrain_spec"]
