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

import contextlib
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
        out["card_precision_at_k"] = M.card_precision_at_k(s, yy, entity=ent, period=_periods(tt, per), k=k).mean
    return out


_DAY_NS = 86_400_000_000_000


def _entity_ids(values: np.ndarray) -> np.ndarray:
    """Entity ids as compared by Card Precision@k: integers as int64 (grouped far faster than text), else text."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype == object and len(values) and all(type(v) is int for v in values.tolist()):
        with contextlib.suppress(OverflowError):
            return np.array(values.tolist(), dtype=np.int64)
    return values.astype(str)


def _entities(parts: list[np.ndarray]) -> np.ndarray:
    """One window's entity ids: int64 when every part is, else all as text (``5`` and ``"5"`` are one entity)."""
    if parts and all(p.dtype == np.int64 for p in parts):
        # Codes in the ids' text order: the metric's grouping (and so its tie-breaking) sees the same order.
        uniq, inv = np.unique(np.concatenate(parts), return_inverse=True)
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[np.argsort(uniq.astype(str), kind="stable")] = np.arange(len(uniq))
        return rank[inv]
    return np.concatenate([p.astype(str) for p in parts]) if parts else np.zeros(0, dtype=str)


def _periods(times: np.ndarray, per: timedelta) -> np.ndarray:
    """:func:`keel.evaluate.metrics.period_index` of datetimes without a trip through pandas (its origin: midnight
    of the first event's day); other inputs go to it."""
    if times.dtype.kind == "M" and len(times) and not np.isnat(times).any():
        ns = times.astype("datetime64[ns]").astype(np.int64)
        return (ns - (ns.min() // _DAY_NS) * _DAY_NS) // int(pd.Timedelta(per).value)
    return M.period_index(times, per)


# --- wiring over the log ------------------------------------------------------------------------------------
def needed_inputs(spec: Any, *, entity: bool = True) -> list[str]:
    """Raw event fields the performance metrics read (cost expressions, and with ``entity`` the Card
    Precision@k entity)."""
    cols: set[str] = set()
    for name in ("false_positive", "false_negative", "true_positive", "true_negative"):
        value = getattr(spec.decision.costs, name)
        if isinstance(value, str):
            cols |= set(expressions.columns(value))
    k = spec.decision.precision_at_k
    if entity and k and k.entity:
        cols.add(k.entity)
    return sorted(cols)


def feature_inputs(spec: Any, features: Sequence[str]) -> dict[str, str]:
    """Needed input fields that are also logged as features unchanged (``features.raw``): read from the feature
    column (binary, cheap) instead of the inputs' JSON text. ``{input field: feature column}``."""
    raw = set(getattr(spec.features, "raw", []) or [])
    return {c: c for c in needed_inputs(spec) if c in raw and c in set(features)}


class PerformanceAccumulator:
    """Delayed-label performance per window, fed the same frames as the drift (one scan of the log).

    Frames hold ``event_time``, ``score``, ``decision``, the joined ``label``/``at`` and the needed inputs (as
    ``input.<name>``, or as a feature column, see :func:`feature_inputs`). Per window it keeps sums for the
    score-based estimate and only the rows whose label is known at ``as_of`` (what AP and Card Precision@k need),
    so memory is a few bytes per labelled row.
    """

    def __init__(self, spec: Any, window: timedelta, origin: datetime, *, as_of: datetime,
                 reference_ap: float | None = None, from_features: Mapping[str, str] | None = None) -> None:
        self.spec, self.window, self.origin = spec, window, pd.Timestamp(origin)
        self.as_of = pd.Timestamp(as_of)
        self.reference_ap = reference_ap
        self.inputs = needed_inputs(spec)
        self.from_features = dict(from_features or {})
        self.positive_action = spec.decision.positive_action
        self.positive = float(_positive(spec))
        k_spec = spec.decision.precision_at_k
        self.entity = k_spec.entity if k_spec and k_spec.entity else None
        self._step = int(pd.Timedelta(window).value)
        self._w: dict[int, dict[str, Any]] = {}

    @property
    def labelled_inputs(self) -> list[str]:
        """Input fields needed for labelled rows only (the Card Precision@k entity, unless a cost reads it too)."""
        costs = set(needed_inputs(self.spec, entity=False))
        return [self.entity] if self.entity and self.entity not in costs else []

    def _column(self, frame: pd.DataFrame, name: str) -> Any:
        if name in self.from_features and self.from_features[name] in frame:
            return frame[self.from_features[name]].to_numpy()
        col = f"input.{name}"
        return frame[col].to_numpy() if col in frame else frame[name].to_numpy()

    def update(self, frame: pd.DataFrame) -> None:
        if len(frame) == 0:
            return
        t = frame["event_time"].to_numpy(dtype="datetime64[ns]")
        widx = (t.astype(np.int64) - int(self.origin.value)) // self._step
        uniq, inv = window_groups(widx)
        n = len(frame)
        scores = frame["score"].to_numpy(dtype=np.float64)
        acted = (frame["decision"] == self.positive_action).to_numpy()
        try:
            cols = {c: self._column(frame, c) for c in self.inputs}
            costs: M.RowCosts | None = M.row_costs(self.spec.decision.costs, cols, n=n)
        except Exception:  # a cost column missing from logged inputs: costs are left out, not invented
            costs = None
        label = frame["label"].to_numpy(dtype=np.float64)
        at = frame["at"].to_numpy(dtype="datetime64[ns]")
        known = ~np.isnan(label) & (np.isnat(at) | (at <= self.as_of.to_datetime64()))
        p = np.clip(scores, 0.0, 1.0)
        ok = np.isfinite(p)
        if costs is not None:
            c = costs
            exp_cost = (p * np.where(acted, c.true_positive, c.false_negative)
                        + (1 - p) * np.where(acted, c.false_positive, c.true_negative))
        # The entity is read for labelled rows only (see labelled_inputs): stored for the known ones.
        ent = self._column(frame, self.entity) if self.entity and (
            self.entity in self.from_features or f"input.{self.entity}" in frame) else None
        for j, w in enumerate(uniq.tolist()):
            sel = inv == j if len(uniq) > 1 else np.ones(n, dtype=bool)
            acc = self._w.setdefault(w, {"rows": 0, "known": 0, "sum_p": 0.0, "n_act": 0, "sum_p_act": 0.0,
                                         "n_ok": 0, "sum_cost": 0.0, "costs": True, "parts": []})
            s_ok, s_act = sel & ok, sel & ok & acted
            acc["rows"] += int(sel.sum())
            acc["sum_p"] += float(p[s_ok].sum())
            acc["n_ok"] += int(s_ok.sum())
            acc["n_act"] += int(s_act.sum())
            acc["sum_p_act"] += float(p[s_act].sum())
            if costs is None:
                acc["costs"] = False
            else:
                acc["sum_cost"] += float(exp_cost[s_ok].sum())
            kn = sel & known
            acc["known"] += int(kn.sum())
            if kn.any():
                acc["parts"].append({
                    "y": (label[kn] == self.positive).astype(float), "s": scores[kn], "act": acted[kn],
                    "costs": costs.take(kn) if costs is not None else None,
                    "ent": _entity_ids(ent[kn]) if ent is not None else None, "t": t[kn] if ent is not None else None})

    def results(self, windows: Sequence[tuple[datetime, datetime]]) -> list[WindowPerformance]:
        """One :class:`WindowPerformance` per ``(start, end)`` (the drift's windows), in that order."""
        delay = self.spec.data.label_delay
        k_spec = self.spec.decision.precision_at_k
        as_of = self.as_of.to_pydatetime()
        out = []
        for start, end in windows:
            w = (int(pd.Timestamp(start).value) - int(self.origin.value)) // self._step
            acc = self._w.get(w, {"rows": 0, "known": 0, "n_ok": 0, "costs": False, "parts": []})
            parts = acc["parts"]

            def cat(key: str, parts: list[dict[str, Any]] = parts) -> Any:
                return np.concatenate([q[key] for q in parts]) if parts else np.zeros(0)

            has_costs = acc["costs"] and all(q["costs"] is not None for q in parts)
            costs = M.RowCosts(*(np.concatenate([np.asarray(a) for a in arrays])
                                 for arrays in zip(*(q["costs"]._arrays() for q in parts), strict=True))
                               ) if has_costs and parts else None
            with_ent = bool(parts) and all(q["ent"] is not None for q in parts)
            metrics = window_performance(
                cat("y"), cat("s"), cat("act").astype(bool), costs=costs,
                entity=_entities([q["ent"] for q in parts]) if with_ent else None, times=cat("t") if with_ent else None,
                k=k_spec.k if k_spec else 100, per=k_spec.per if k_spec else timedelta(days=1),
            )
            ap = metrics.get("average_precision")
            metrics["average_precision_drop"] = (self.reference_ap - ap) if (
                self.reference_ap is not None and ap is not None) else None
            rows, n_ok = acc["rows"], acc["n_ok"]
            estimate: dict[str, float | None] = {}
            if rows:
                estimate = {"expected_positives": acc["sum_p"],
                            "expected_precision": acc["sum_p_act"] / acc["n_act"] if acc["n_act"] else None,
                            "expected_cost": acc["sum_cost"] / n_ok if acc["costs"] and n_ok else None}
            out.append(WindowPerformance(
                start=start, end=end, rows=rows, labelled=acc["known"],
                positives=int(np.nansum(cat("y"))), complete=end + delay <= as_of,
                label_coverage=acc["known"] / rows if rows else 0.0, metrics=metrics, estimate=estimate))
        return out


def performance_windows(spec: Any, log_path: str | Path, windows: Sequence[tuple[datetime, datetime]], *,
                        as_of: datetime, reference_ap: float | None = None) -> list[WindowPerformance]:
    """Per window of the log: labels known at ``as_of`` joined by event id, metrics, estimates, completeness.

    One scan of the log over the windows' span (:func:`keel.monitor.triggers.run_monitor` feeds a
    :class:`PerformanceAccumulator` from its drift scan instead)."""
    from keel.monitor.logread import read_log

    if not windows:
        return []
    acc = PerformanceAccumulator(spec, windows[0][1] - windows[0][0], windows[0][0], as_of=as_of,
                                 reference_ap=reference_ap)
    labelled = acc.labelled_inputs
    for frame in read_log(Path(log_path), inputs=[c for c in acc.inputs if c not in labelled],
                          labelled_inputs=labelled, start=min(w[0] for w in windows),
                          end=max(w[1] for w in windows), labels=True, columns=("event_time", "score", "decision")):
        acc.update(frame)
    return acc.results(windows)


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
    "PerformanceAccumulator",
    "WindowOperations",
    "WindowPerformance",
    "capacity_per_day",
    "estimate_performance",
    "feature_inputs",
    "needed_inputs",
    "performance_windows",
    "window_performance",
]
