"""Triggers over consecutive windows, and :func:`run_monitor`, the wiring behind ``keel monitor``.

A trigger (``[[monitoring.triggers]]``) fires when its metric is above ``above`` for ``windows`` consecutive
windows that have a value, ending at the latest such window. Metrics per window:

* ``psi``, ``ks`` (the KS statistic D), ``js`` (Jensen–Shannon distance), ``chi2`` (chi² / n, i.e. phi², so the
  threshold does not depend on traffic), ``missing_rate`` — of ``feature`` (a feature, ``score``, or ``*`` for the
  worst feature);
* ``average_precision_drop`` — the reference AP (the model's test AP) minus the window's AP, complete windows only;
* ``fallback_rate``, ``error_rate``, ``latency_p99_ms``, ``alerts_per_day``;
* ``skew_rate`` — the highest training–serving mismatch rate of any feature (one value, on the latest window).

Besides the spec's triggers, any feature or score whose PSI in the latest window reaches ``monitoring.psi_act``
raises a ``warn`` (drift worth a look, not on its own a reason to retrain). The result level is the highest level
that fired: ``ok`` (exit 0), ``warn`` (1), ``act`` (2).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import MonitorError
from keel.io import atomic_write_text
from keel.monitor.drift import DriftAccumulator, WindowDrift, log_time_range, window_drift_dict
from keel.monitor.logread import read_log
from keel.monitor.performance import (
    OperationalAccumulator,
    PerformanceAccumulator,
    WindowOperations,
    WindowPerformance,
    capacity_per_day,
    feature_inputs,
)
from keel.monitor.profile import SCORE, Profile

LEVELS = {"ok": 0, "warn": 1, "act": 2}
DRIFT_METRICS = ("psi", "ks", "js", "chi2", "missing_rate")


@dataclass
class Firing:
    """A trigger's verdict: whether it fired, at what level, and the numbers behind it."""

    name: str
    metric: str
    feature: str | None
    level: str
    above: float
    windows: int
    fired: bool
    streak: int
    values: list[dict[str, Any]]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _drift_value(w: WindowDrift, metric: str, feature: str | None) -> tuple[float | None, str | None]:
    def get(col: Any) -> float:
        if metric == "chi2":
            present = col.n * (1 - col.missing_rate) if np.isfinite(col.missing_rate) else 0
            return col.chi2 / present if present else float("nan")
        return float(getattr(col, metric))

    if feature in (None, "*"):
        best: tuple[float | None, str | None] = (None, None)
        for name, col in w.columns.items():
            if name == SCORE:
                continue
            v = get(col)
            if np.isfinite(v) and (best[0] is None or v > best[0]):
                best = (v, name)
        return best
    found = w.columns.get(feature)
    if found is None:
        return None, feature
    v = get(found)
    return (v if np.isfinite(v) else None), feature


def window_metrics(drift: Sequence[WindowDrift], ops: Sequence[WindowOperations],
                   perf: Sequence[WindowPerformance]) -> list[dict[str, Any]]:
    """One row per window with what the non-drift triggers read (drift values are looked up per trigger)."""
    ops_by = {o.start: o for o in ops}
    perf_by = {p.start: p for p in perf}
    rows = []
    for w in drift:
        o, p = ops_by.get(w.start), perf_by.get(w.start)
        rows.append({
            "start": w.start, "drift": w,
            "fallback_rate": o.fallback_rate if o else None, "error_rate": o.error_rate if o else None,
            "latency_p99_ms": o.latency_ms.get("p99") if o else None,
            "alerts_per_day": o.alerts_per_day if o else None,
            "average_precision_drop": (p.metrics.get("average_precision_drop") if p and p.complete else None),
        })
    return rows


def evaluate_triggers(triggers: Sequence[Any], rows: Sequence[Mapping[str, Any]], *,
                      skew_rate: float | None = None) -> list[Firing]:
    """Evaluate each spec trigger over the windows (oldest first). Pure."""
    out = []
    for t in triggers:
        series: list[tuple[datetime, float, str | None]] = []
        for row in rows:
            if t.metric in DRIFT_METRICS:
                v, where = _drift_value(row["drift"], t.metric, t.feature)
            elif t.metric == "skew_rate":
                v, where = None, None
            else:
                v, where = row.get(t.metric), None
            if v is not None and np.isfinite(v):
                series.append((row["start"], float(v), where))
        if t.metric == "skew_rate" and skew_rate is not None and rows:
            series = [(rows[-1]["start"], float(skew_rate), None)]
        streak = 0
        for _, v, _ in reversed(series):
            if v > t.above:
                streak += 1
            else:
                break
        fired = streak >= t.windows
        recent = [{"window": s.isoformat(), "value": v, **({"feature": f} if f else {})}
                  for s, v, f in series[-max(t.windows, 3):]]
        if not series:
            reason = f"no value yet for {t.metric}" + (f" of {t.feature}" if t.feature else "")
        else:
            last = series[-1]
            what = f"{t.metric}" + (f" of {last[2] or t.feature}" if (last[2] or t.feature) else "")
            reason = (f"{what} = {last[1]:.4g} > {t.above:g} for {streak} consecutive window(s) (needs {t.windows})"
                      if fired else f"{what} = {last[1]:.4g}; above {t.above:g} for {streak} of {t.windows} "
                      "required window(s)")
        out.append(Firing(name=t.name, metric=t.metric, feature=t.feature, level=t.level if fired else "ok",
                          above=t.above, windows=t.windows, fired=fired, streak=streak, values=recent, reason=reason))
    return out


def calendar_features(spec: Any) -> set[str]:
    """Row features whose distribution within one monitoring window is set by the calendar, not by the data:
    weekday/weekend in windows shorter than a week, hour/night in windows shorter than a day."""
    window = spec.monitoring.window
    weekly = {"is_weekend", "weekday"} if window < timedelta(days=7) else set()
    daily = {"is_night", "hour"} if window < timedelta(days=1) else set()
    return {r.name for r in spec.features.row if r.kind in weekly | daily}


def implicit_drift_findings(drift: Sequence[WindowDrift], psi_act: float, skip: Iterable[str] = ()) -> list[Firing]:
    """A ``warn`` for each column whose PSI in the latest window reaches ``psi_act`` (``skip``: calendar features,
    whose PSI in a short window measures the calendar — a Saturday is all weekend — not a drift)."""
    if not drift:
        return []
    last = drift[-1]
    out = []
    skipped = set(skip)
    for name, col in last.columns.items():
        if name in skipped:
            continue
        if np.isfinite(col.psi) and col.psi >= psi_act:
            out.append(Firing(name=f"psi {name}", metric="psi", feature=name, level="warn", above=psi_act, windows=1,
                              fired=True, streak=1, values=[{"window": last.start.isoformat(), "value": col.psi}],
                              reason=f"PSI of {name} = {col.psi:.3f} >= monitoring.psi_act {psi_act:g} in the "
                                     f"window starting {last.start:%Y-%m-%d %H:%M}"))
    return out


# --- the monitor run -----------------------------------------------------------------------------------------
@dataclass
class MonitorResult:
    """What ``keel monitor`` found. ``level`` is ok/warn/act, ``exit_code`` 0/1/2."""

    level: str
    as_of: datetime
    model: str
    version: int | None
    drift: list[WindowDrift]
    performance: list[WindowPerformance]
    operations: list[WindowOperations]
    firings: list[Firing]
    skew: Any = None
    profile: Profile | None = None
    paths: dict[str, Path] = field(default_factory=dict)
    rows: int = 0

    @property
    def exit_code(self) -> int:
        return LEVELS[self.level]

    @property
    def fired(self) -> list[Firing]:
        return [f for f in self.firings if f.fired]

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [f"monitor {self.model} v{self.version}: {self.level.upper()} ({self.rows:,} predictions in "
                 f"{len(self.drift)} window(s), as of {self.as_of:%Y-%m-%d %H:%M})"]
        for f in self.firings:
            mark = {"ok": "  ok  ", "warn": " WARN ", "act": " ACT  "}[f.level]
            lines.append(f"[{mark}] {f.name}: {f.reason}")
        if self.skew is not None:
            lines.append(f"training-serving skew: {self.skew.summary()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level, "exit_code": self.exit_code, "as_of": self.as_of.isoformat(), "model": self.model,
            "version": self.version, "rows": self.rows,
            "firings": [f.as_dict() for f in self.firings],
            "drift": [window_drift_dict(w) for w in self.drift],
            "performance": [p.as_dict() for p in self.performance],
            "operations": [o.as_dict() for o in self.operations],
            "skew": self.skew.as_dict() if self.skew is not None else None,
            "reference": {"source": self.profile.source, "metrics": self.profile.reference_metrics}
            if self.profile else None,
        }


def _champion(spec: Any, registry: Any | None) -> tuple[Any, int | None]:
    from keel.registry import Registry

    reg = registry or Registry.from_spec(spec)
    model, info = reg.load(spec.serving.alias)
    return model, info.version


def default_as_of(log_path: str | Path) -> datetime:
    """The log's own clock: its newest event or label time (so a replay of history behaves like live traffic)."""
    _, last_event, last_label = log_time_range(log_path)
    candidates = [t for t in (last_event, last_label) if t is not None]
    if not candidates:
        raise MonitorError(f"The prediction log {log_path} is empty.",
                           hint="Serve some traffic first (`keel serve`), then run `keel monitor`.")
    return max(candidates)


def run_monitor(spec: Any, *, log_path: str | Path | None = None, as_of: datetime | str | None = None,
                out_dir: str | Path | None = None, profile: Profile | None = None, registry: Any | None = None,
                skew: bool | None = None, batch_rows: int = 65_536) -> MonitorResult:
    """Monitor the prediction log against the serving model's reference profile; write monitor.json/.html.

    ``log_path`` defaults to ``serving.prediction_log``; ``as_of`` to the log's newest event or label time;
    ``profile`` to the champion's stored profile (computed once). ``skew`` (default: when
    ``monitoring.skew_sample`` > 0 and the spec has window features) recomputes a sample of logged features
    offline. Example::

        result = run_monitor(spec, out_dir="monitor/")
        result.level, result.exit_code          # "act", 2
    """
    from keel.monitor.profile import ensure_profile

    mon = spec.monitoring
    path = Path(log_path) if log_path is not None else spec.store_path(spec.serving.prediction_log)
    first, _, _ = log_time_range(path)  # before loading any model: a missing or empty log is the usual cause
    if first is None:
        raise MonitorError(f"The prediction log {path} is empty.",
                           hint="Serve some traffic first (`keel serve`), then run `keel monitor`.")
    when = pd.Timestamp(as_of).to_pydatetime() if as_of is not None else default_as_of(path)
    if pd.Timestamp(when).tzinfo is not None:
        when = pd.Timestamp(when).tz_convert("UTC").tz_localize(None).to_pydatetime()
    version = profile.version if profile is not None else None
    if profile is None:
        model, version = _champion(spec, registry)
        profile = ensure_profile(spec, model, version)
    origin = pd.Timestamp(first).normalize().to_pydatetime()
    drift_acc = DriftAccumulator(profile, mon.window, origin=origin)
    ops_acc = OperationalAccumulator(mon.window, origin, positive_action=spec.decision.positive_action,
                                     capacity_per_day=capacity_per_day(spec))
    # One scan of the log: drift, operations and performance (labels joined by SQLite) from the same frames. Frames
    # of 64 k rows (16 of the log's segments): a third of the peak memory of 200 k-row frames, no slower.
    features = list(profile.features)
    from_features = feature_inputs(spec, features)
    perf_acc = PerformanceAccumulator(spec, mon.window, origin, as_of=when, from_features=from_features,
                                      reference_ap=profile.reference_metrics.get("average_precision"))
    labelled = [c for c in perf_acc.labelled_inputs if c not in from_features]
    inputs = [c for c in perf_acc.inputs if c not in from_features and c not in labelled]
    rows = 0
    # "As of T" includes the events at T (the default T is the newest event): the log's end bound is exclusive.
    through = when + timedelta(microseconds=1)
    for chunk in read_log(path, features=features, inputs=inputs, labelled_inputs=labelled, end=through,
                          batch_rows=batch_rows, labels=True):
        drift_acc.update(chunk)
        ops_acc.update(chunk)
        perf_acc.update(chunk)
        rows += len(chunk)
    drift = drift_acc.results()
    ops = ops_acc.results()
    perf = perf_acc.results([(w.start, w.end) for w in drift])
    skew_report = None
    run_skew = skew if skew is not None else (mon.skew_sample > 0 and bool(spec.features.windows))
    if run_skew and rows:
        from keel.monitor.skew import check_skew

        skew_report = check_skew(spec, path, sample=mon.skew_sample, end=when)
    firings = evaluate_triggers(mon.triggers, window_metrics(drift, ops, perf),
                                skew_rate=skew_report.max_rate if skew_report is not None else None)
    firings += implicit_drift_findings(drift, mon.psi_act, skip=calendar_features(spec))
    level = max((f.level for f in firings if f.fired), key=lambda lv: LEVELS[lv], default="ok")
    result = MonitorResult(level=level, as_of=when, model=spec.project.name, version=version, drift=drift,
                           performance=perf, operations=ops, firings=firings, skew=skew_report, profile=profile,
                           rows=rows)
    if out_dir is not None:
        write_outputs(result, out_dir, spec=spec)
    return result


def write_outputs(result: MonitorResult, out_dir: str | Path, *, spec: Any = None) -> dict[str, Path]:
    """Write ``monitor.json`` and the self-contained ``monitor.html`` into ``out_dir`` (atomically)."""
    from keel.monitor.report import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "monitor.json", "html": out / "monitor.html"}
    atomic_write_text(paths["json"], json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    atomic_write_text(paths["html"], render_html(result, spec=spec))
    result.paths = paths
    return paths


__all__ = [
    "Firing",
    "MonitorResult",
    "default_as_of",
    "evaluate_triggers",
    "implicit_drift_findings",
    "run_monitor",
    "window_metrics",
    "write_outputs",
]
