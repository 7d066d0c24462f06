"""Model performance once labels arrive, and the service's operational health, per window.

Labels come late (``data.label_delay``). A window ``[start, end)`` is **complete** when ``end + label_delay <=
as_of``; before that its metrics cover only the labels received so far and say so. A label counts only once it
is known (its ``at`` time is not after ``as_of``). Until labels arrive the window still gets an **estimate**
from the calibrated scores: the expected precision of the alerts is the mean score of the alerted rows and the
expected cost per event is ``p * cost(positive) + (1 - p) * cost(negative)`` for the action taken.

Pure functions (:func:`window_performance`, :func:`estimate_performance`) take arrays; :func:`performance_windows`
and :class:`OperationalAccumulator` do the wiring over a prediction log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import expressions
from keel.evaluate import metrics as M
from keel.monitor.drift import window_groups

ERROR_REASONS = ("model_error", "model_unavailable", "features_unavailable")


@dataclass
class WindowPerformance:
    """Performance of one window: measured on the labels known at ``as_of``, and estimated from scores."""

    start: datetime
    end: datetime
    rows: int
    labelled: int
    positives: int
    complete: bool
    label_coverage: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    estimate: dict[str, float | None] = field(default_factory=dict)

    @property
    def is_estimate(self) -> bool:
        return not self.complete

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "rows": self.rows,
                "labelled": self.labelled, "positives": self.positives, "complete": self.complete,
                "label_coverage": self.label_coverage, "is_estimate": self.is_estimate,
                "metrics": _clean(self.metrics), "estimate": _clean(self.estimate)}


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


# --- pure ---------------------------------------------------------------------------------------------------
def estimate_performance(scores: Any, acted: Any, costs: M.RowCosts | None = None) -> dict[str, float | None]:
    """What calibrated scores imply before labels arrive: expected positives, alert precision and cost per event."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    act = np.asarray(acted, dtype=bool)
    ok = np.isfinite(p)
    p, act = p[ok], act[ok]
    out: dict[str, float | None] = {"expected_positives": float(p.sum()),
                                    "expected_precision": float(p[act].mean()) if act.any() else None,
                                    "expected_cost": None}
    if costs is not None and len(p):
        c = costs.take(ok)
        if_pos = np.where(act, c.true_positive, c.false_negative)
        if_neg = np.where(act, c.false_positive, c.true_negative)
        out["expected_cost"] = float(np.mean(p * if_pos + (1 - p) * if_neg))
    return out


def window_performance(y: Any, scores: Any, acted: Any, *, costs: M.RowCosts | None = None,
                       entity: Any | None = None, times: Any | None = None, k: int = 100,
                       per: timedelta = timedelta(days=1), bins: int = 10) -> dict[str, float | None]:
    """Measured metrics of labelled rows: AP, Card Precision@k, expected cost, ECE, alert precision and recall."""
    yy = np.asarray(y, dtype=np.float64)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    act = np.asarray(acted, dtype=bool)
    ok = np.isfinite(s) & np.isfinite(yy)
    yy, s, act = yy[ok].astype(int), s[ok], act[ok]
    out: dict[str, float | None] = {"average_precision": None, "card_precision_at_k": None, "expected_cost": None,
                                    "ece": None, "precision": None, "recall": None}
    if len(yy) == 0:
        return out
    both = 0 < yy.sum() < len(yy)
    if both:
        out["average_precision"] = M.average_precision(yy, s)
    out["ece"] = M.expected_calibration_error(yy, s, bins=bins)
    out["precision"] = float(yy[act].mean()) if act.any() else None
    out["recall"] = float(act[yy == 1].mean()) if yy.sum() else None
    if costs is not None:
        out["expected_cost"] = float(costs.take(ok).per_row(yy, act).mean())
    if entity is not None and times is not None:
        ent, tt = np.asarray(entity)[ok], np.asarray(times)[ok]
        out["card_precision_at_k"] = M.card_precision_at_k(s, yy, entity=ent, period=M.period_index(tt, per), k=k).mean
    return out


# --- wiring over the log ------------------------------------------------------------------------------------
def needed_inputs(spec: Any) -> list[str]:
    """Raw event fields the performance metrics read (cost expressions, the Card Precision@k entity)."""
    cols: set[str] = set()
    for name in ("false_positive", "false_negative", "true_positive", "true_negative"):
        value = getattr(spec.decision.costs, name)
        if isinstance(value, str):
            cols |= set(expressions.columns(value))
    k = spec.decision.precision_at_k
    if k and k.entity:
        cols.add(k.entity)
    return sorted(cols)


def _read_window(path: Path, start: datetime, end: datetime, inputs: Sequence[str]) -> pd.DataFrame:
    """The window's rows with their labels (``label``/``at``, NaN/NaT when none yet) and the raw input fields."""
    from keel.monitor.logread import read_log

    frames = list(read_log(path, inputs=inputs, start=start, end=end, labels=True,
                           columns=("event_time", "score", "decision")))
    if not frames:
        frame = pd.DataFrame({"event_time": pd.Series(dtype="datetime64[ns]"), "score": pd.Series(dtype=float),
                              "decision": pd.Series(dtype=object), "label": pd.Series(dtype=float),
                              "at": pd.Series(dtype="datetime64[ns]"), **{c: pd.Series(dtype=object) for c in inputs}})
        return frame
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return frame.rename(columns={f"input.{c}": c for c in inputs})


def performance_windows(spec: Any, log_path: str | Path, windows: Sequence[tuple[datetime, datetime]], *,
                        as_of: datetime, reference_ap: float | None = None) -> list[WindowPerformance]:
    """Per window of the log: labels known at ``as_of`` joined by event id, metrics, estimates, completeness."""
    path = Path(log_path)
    inputs = needed_inputs(spec)
    delay = spec.data.label_delay
    k_spec = spec.decision.precision_at_k
    positive = spec.decision.positive_action
    out = []
    for start, end in windows:
        frame = _read_window(path, start, end, inputs)
        acted = (frame["decision"] == positive).to_numpy()
        try:
            costs = M.row_costs(spec.decision.costs, frame, n=len(frame)) if len(frame) else None
        except Exception:  # a cost column missing from logged inputs: costs are left out, not invented
            costs = None
        known = frame["label"].notna() & (frame["at"].isna() | (frame["at"] <= pd.Timestamp(as_of)))
        known_np = known.to_numpy()
        y = (frame["label"].to_numpy() == float(_positive(spec))).astype(float)
        y[~known_np] = np.nan
        ent = None
        if k_spec and k_spec.entity and k_spec.entity in frame.columns:
            ent = frame[k_spec.entity].astype(str).to_numpy()
        metrics = window_performance(
            y[known_np], frame["score"].to_numpy()[known_np], acted[known_np],
            costs=costs.take(known_np) if costs is not None else None,
            entity=ent[known_np] if ent is not None else None,
            times=frame["event_time"].to_numpy()[known_np] if ent is not None else None,
            k=k_spec.k if k_spec else 100, per=k_spec.per if k_spec else timedelta(days=1),
        )
        ap = metrics.get("average_precision")
        metrics["average_precision_drop"] = (reference_ap - ap) if (reference_ap is not None and ap is not None) else None
        complete = end + delay <= as_of
        out.append(WindowPerformance(
            start=start, end=end, rows=len(frame), labelled=int(known_np.sum()),
            positives=int(np.nansum(y[known_np])), complete=complete,
            label_coverage=float(known_np.mean()) if len(frame) else 0.0, metrics=metrics,
            estimate=estimate_performance(frame["score"].to_numpy(), acted, costs) if len(frame) else {},
        ))
    return out


def _positive(spec: Any) -> float:
    try:
        return float(spec.data.positive_label)
    except (TypeError, ValueError):
        return 1.0


# --- operational --------------------------------------------------------------------------------------------
_LAT_EDGES = np.concatenate([[0.0], np.geomspace(1e-3, 1e6, 1801)])  # ~1.2 % relative resolution


@dataclass
class WindowOperations:
    start: datetime
    end: datetime
    requests: int
    latency_ms: dict[str, float | None]
    error_rate: float
    fallback_rate: float
    stale_rate: float
    alerts: int
    alerts_per_day: float
    capacity_per_day: float | None
    fallback_reasons: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["start"], d["end"] = self.start.isoformat(), self.end.isoformat()
        return d


class OperationalAccumulator:
    """Request volume, latency percentiles (from a fine log-spaced histogram), error/fallback/stale rates and
    alerts per day, per window; memory is fixed per window."""

    def __init__(self, window: timedelta, origin: datetime, *, positive_action: str,
                 capacity_per_day: float | None = None) -> None:
        self.window, self.origin = window, pd.Timestamp(origin)
        self.positive_action = positive_action
        self.capacity_per_day = capacity_per_day
        self._step = int(pd.Timedelta(window).value)
        self._w: dict[int, dict[str, Any]] = {}

    def update(self, frame: pd.DataFrame) -> None:
        if len(frame) == 0:
            return
        t = frame["event_time"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        widx = (t - int(self.origin.value)) // self._step
        uniq, inv = window_groups(widx)
        k = len(uniq)
        nl = len(_LAT_EDGES)
        lat = np.clip(np.searchsorted(_LAT_EDGES, frame["latency_ms"].to_numpy(dtype=np.float64), side="right") - 1,
                      0, nl - 1)
        lat_counts = np.bincount(inv * nl + lat, minlength=k * nl).reshape(k, nl)
        reasons = frame["fallback_reason"].fillna("").to_numpy(dtype=object)
        flags = {
            "requests": np.ones(len(frame), dtype=bool),
            "fallback": frame["fallback"].to_numpy(dtype=bool),
            "stale": frame["stale"].to_numpy(dtype=bool),
            "error": np.isin(reasons, ERROR_REASONS),
            "alerts": (frame["decision"] == self.positive_action).to_numpy(),
        }
        sums = {name: np.bincount(inv[v], minlength=k) for name, v in flags.items()}
        for j, w in enumerate(uniq.tolist()):
            acc = self._w.setdefault(w, {"lat": np.zeros(nl, np.int64), "reasons": {},
                                         **{n: 0 for n in flags}})
            acc["lat"] += lat_counts[j]
            for name in flags:
                acc[name] += int(sums[name][j])
            sel = reasons[inv == j]
            for r in sel[sel != ""]:
                acc["reasons"][r] = acc["reasons"].get(r, 0) + 1

    def results(self) -> list[WindowOperations]:
        days = self.window / timedelta(days=1)
        out = []
        for w in sorted(self._w):
            acc = self._w[w]
            start = (self.origin + pd.Timedelta(self._step * w, unit="ns")).to_pydatetime()
            n = acc["requests"]
            out.append(WindowOperations(
                start=start, end=start + self.window, requests=n,
                latency_ms={f"p{q}": _hist_quantile(acc["lat"], q / 100) for q in (50, 95, 99)},
                error_rate=acc["error"] / n, fallback_rate=acc["fallback"] / n, stale_rate=acc["stale"] / n,
                alerts=acc["alerts"], alerts_per_day=acc["alerts"] / days, capacity_per_day=self.capacity_per_day,
                fallback_reasons=dict(acc["reasons"]),
            ))
        return out


def _hist_quantile(counts: np.ndarray, q: float) -> float | None:
    total = counts.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    lo = _LAT_EDGES[i]
    hi = _LAT_EDGES[min(i + 1, len(_LAT_EDGES) - 1)]
    return float(np.sqrt(lo * hi)) if lo > 0 else float(hi / 2)


def capacity_per_day(spec: Any) -> float | None:
    cap = spec.decision.capacity
    return None if cap is None else cap.max_positives / (cap.per / timedelta(days=1))


__all__ = [
    "OperationalAccumulator",
    "WindowOperations",
    "WindowPerformance",
    "capacity_per_day",
    "estimate_performance",
    "needed_inputs",
    "performance_windows",
    "window_performance",
]
