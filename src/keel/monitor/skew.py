"""Training–serving skew: recompute a sample of logged requests' features offline and compare with what served.

The offline pipeline (:func:`keel.features.offline.compute_features`, the code training uses) runs on the source
history before the served period plus every logged event up to the last sampled one, each at its own event time.
The features of the sampled requests are then compared with the ``features`` the service logged: a mismatch is a
difference beyond ``rtol=1e-6``/``atol=1e-9``, or a value on one side and missing on the other. The rate per
feature should be 0; anything else means the model is not seeing in production what it learned from.

Logged events without a known label count as negatives in label-based windows (that is what the online store
knows until a label arrives).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.errors import MonitorError


@dataclass
class SkewReport:
    """Mismatch counts per feature between served and recomputed features of ``compared`` requests."""

    compared: int
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    @property
    def max_rate(self) -> float:
        return max((f["rate"] for f in self.features.values()), default=0.0)

    def rows(self) -> list[dict[str, Any]]:
        return [{"feature": k, **v} for k, v in self.features.items()]

    def summary(self) -> str:
        bad = {k: v for k, v in self.features.items() if v["mismatches"]}
        if not self.compared:
            return f"no request compared ({self.note or 'nothing sampled'})"
        if not bad:
            return f"0 mismatches in {len(self.features)} features over {self.compared} sampled requests"
        worst = sorted(bad.items(), key=lambda kv: -kv[1]["rate"])[:3]
        return (f"{len(bad)} of {len(self.features)} features differ over {self.compared} sampled requests; worst: "
                + ", ".join(f"{k} {v['rate']:.1%}" for k, v in worst))

    def as_dict(self) -> dict[str, Any]:
        return {"compared": self.compared, "max_rate": self.max_rate, "features": self.features, "note": self.note}


def compare_features(served: pd.DataFrame, offline: pd.DataFrame, features: Sequence[str], *, rtol: float = 1e-6,
                     atol: float = 1e-9, examples: int = 3) -> SkewReport:
    """Compare two aligned frames (same rows, same order) feature by feature. Pure."""
    if len(served) != len(offline):
        raise MonitorError(f"Cannot compare {len(served)} served rows with {len(offline)} recomputed rows.")
    out: dict[str, dict[str, Any]] = {}
    for name in features:
        a = pd.to_numeric(served[name], errors="coerce").to_numpy(np.float64) if name in served else np.full(
            len(served), np.nan)
        b = pd.to_numeric(offline[name], errors="coerce").to_numpy(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        close = np.isclose(a, b, rtol=rtol, atol=atol) | both_nan
        bad = ~close
        diff = np.abs(a - b)
        idx = np.flatnonzero(bad)[:examples]
        out[name] = {"compared": len(a), "mismatches": int(bad.sum()), "rate": float(bad.mean()) if len(a) else 0.0,
                     "max_abs_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else None,
                     "examples": [{"row": int(i), "served": _num(a[i]), "offline": _num(b[i])} for i in idx]}
    return SkewReport(compared=len(served), features=out)


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def _sample_log(path: Path, sample: int, end: datetime | None) -> pd.DataFrame:
    """Every ``step``-th logged row (by ``seq``) with features and ``event_time < end``, at most ``sample`` of them,
    ``step`` spreading the sample over the whole log; rows stored as rows or only in segments alike."""
    from keel.logformat import iso as _iso
    from keel.serve.predlog import SAMPLE_COLUMNS, sample_rows

    rows = sample_rows(path, sample, _iso(end) if end is not None else None)
    return pd.DataFrame.from_records(rows, columns=list(SAMPLE_COLUMNS))


def _logged_events(path: Path, start: datetime, end: datetime, fields: Sequence[str]) -> pd.DataFrame:
    """The raw input ``fields`` of the rows with ``start <= event_time <= end`` in ``seq`` order, with their label
    (NaN when none) in ``__label``; rows in the table and rows only in segments alike (read as monitoring reads
    them: the segments' input columns, no row rebuilt)."""
    from keel.monitor.logread import read_log

    frames = list(read_log(path, inputs=list(fields), start=start, end=end + timedelta(microseconds=1),
                           columns=("seq",), labels=True, prefetch=False))
    if not frames:
        return pd.DataFrame({**{f: [] for f in fields}, "__label": []})
    logged = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    # (typed as parsing the rows' JSON and pandas.DataFrame.from_records type them: a column of ints as int64;
    # except bools, which read_log reads as numbers, 0.0/1.0)
    events = pd.DataFrame({f: logged[f"input.{f}"].to_numpy() for f in fields}).infer_objects()
    events["__label"] = logged["label"].to_numpy()
    return events


def check_skew(spec: Any, log_path: str | Path, *, sample: int = 1000, end: datetime | None = None) -> SkewReport:
    """Recompute ``sample`` logged requests' features with the offline pipeline and compare (see module doc)."""
    from keel.data.sources import source_from_spec
    from keel.features.definitions import feature_names, resolve_definitions, window_definitions
    from keel.features.offline import compute_features

    data = spec.data
    if not data.timestamp or not data.id_column:
        return SkewReport(compared=0, note="needs data.timestamp and data.id_column to replay events")
    path = Path(log_path)
    picked = _sample_log(path, sample, end)
    if picked.empty:
        return SkewReport(compared=0, note="no logged request with features")
    defs = resolve_definitions(spec.features, data)
    names = feature_names(defs)
    windows = window_definitions(defs)
    lookback = max((d.window + d.delay for d in windows), default=timedelta(0))
    times = pd.to_datetime(picked["event_time"], format="ISO8601")
    t_lo, t_hi = times.min().to_pydatetime(), times.max().to_pydatetime()
    sampled = [json.loads(text) for text in picked["inputs"]]
    fields = list(dict.fromkeys(k for inputs in sampled for k in inputs))
    logged = _logged_events(path, t_lo - lookback, t_hi, fields)
    ts, ident = data.timestamp, data.id_column
    if ts not in logged or ident not in logged:
        return SkewReport(compared=0, note=f"logged inputs lack {ts!r} or {ident!r}")
    logged[ts] = pd.to_datetime(logged[ts], format="ISO8601")
    if logged[ts].dt.tz is not None:
        logged[ts] = logged[ts].dt.tz_convert("UTC").dt.tz_localize(None)
    logged[data.label] = pd.to_numeric(logged.pop("__label"), errors="coerce").fillna(0.0)
    src = source_from_spec(spec)
    quoted = '"' + ts.replace('"', '""') + '"'
    lo = pd.Timestamp(t_lo - lookback - timedelta(days=1))
    history = src.read(where=f"{quoted} >= TIMESTAMP '{lo:%Y-%m-%d %H:%M:%S}' and "
                             f"{quoted} <= TIMESTAMP '{pd.Timestamp(t_hi):%Y-%m-%d %H:%M:%S.%f}'")
    history[ts] = pd.to_datetime(history[ts])
    served_ids = set(logged[ident].astype(str))
    history = history[~history[ident].astype(str).isin(served_ids)]
    first_logged = logged[ts].min()
    history = history[history[ts] < first_logged]  # the store saw history only up to serving, then the log
    cols = [c for c in history.columns if c in logged.columns or c == data.label]
    union = pd.concat([history[cols], logged[[c for c in cols if c in logged.columns]]], ignore_index=True)
    union[data.label] = pd.to_numeric(union[data.label], errors="coerce").fillna(0.0)
    union = union.sort_values([ts, ident], kind="stable").reset_index(drop=True)
    computed = compute_features(union, defs, timestamp=ts, label=data.label, id_column=ident)
    computed["__id"] = union[ident].astype(str).to_numpy()
    computed = computed.drop_duplicates("__id", keep="last").set_index("__id")
    served = pd.DataFrame.from_records([json.loads(f) for f in picked["features"]])
    ids = [str(inputs.get(ident)) for inputs in sampled]
    keep = [i in computed.index for i in ids]
    served = served[keep].reset_index(drop=True)
    offline = computed.loc[[i for i, k in zip(ids, keep, strict=True) if k], names].reset_index(drop=True)
    report = compare_features(served, offline, names)
    if not all(keep):
        report.note = f"{len(keep) - sum(keep)} sampled requests could not be replayed"
    return report


__all__ = ["SkewReport", "check_skew", "compare_features"]
