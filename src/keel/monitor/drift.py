"""Input and prediction drift against a reference :class:`~keel.monitor.profile.Profile`, window by window.

Statistics per column (each feature and the score), from counts only, so the log streams through in batches and
memory is one batch plus a few counters per window:

* **PSI** over the profile's quantile bins: ``sum((r - c) * ln(r / c))`` of bin shares. An empty bin takes a share
  of ``1e-4`` (or a millionth of the smallest non-empty share when that is below ``1e-4``): Evidently's
  convention, so the numbers agree with it on the same bins.
* **Kolmogorov–Smirnov**: ``D = max |F_ref - F_cur|`` over the reference quantile sketch (exact when the
  reference has at most ``SKETCH_POINTS`` distinct values, otherwise within the largest sketch step, about
  0.001) and the asymptotic two-sided p-value scipy's ``ks_2samp`` uses for large samples
  (``kstwo.sf(D, round(n m / (n + m)))``).
* **chi²** goodness of fit of the current bin counts to the reference shares, with its p-value.
* **Jensen–Shannon distance** (natural log, as ``scipy.spatial.distance.jensenshannon``).
* Missing rate, out-of-range rate (below the reference min or above its max), new categories.

Example::

    acc = DriftAccumulator(profile, window=timedelta(days=1))
    for chunk in iter_log(".keel/predictions.sqlite", features=list(profile.features)):
        acc.update(chunk)
    for w in acc.results():            # one WindowDrift per window, oldest first
        w.columns["tx_amount"].psi
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats
from scipy.spatial.distance import jensenshannon

from keel.errors import MonitorError
from keel.monitor.profile import OTHER, SCORE, FeatureProfile, Profile

# --- statistics from counts --------------------------------------------------------------------------------


def _fill_zeros(shares: np.ndarray) -> np.ndarray:
    out = np.asarray(shares, dtype=np.float64).copy()
    nonzero = out[out != 0]
    if len(nonzero) == 0 or len(nonzero) == len(out):
        return out
    smallest = float(nonzero.min())
    out[out == 0] = smallest / 1e6 if smallest <= 1e-4 else 1e-4
    return out


def _shares(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else c


def psi(reference_counts: Any, current_counts: Any) -> float:
    """Population Stability Index of two count (or share) vectors over the same bins; NaN when either is empty."""
    r, c = _shares(reference_counts), _shares(current_counts)
    if r.sum() == 0 or c.sum() == 0:
        return float("nan")
    r, c = _fill_zeros(r), _fill_zeros(c)
    return float(np.sum((r - c) * np.log(r / c)))


def js_distance(reference_counts: Any, current_counts: Any) -> float:
    """Jensen–Shannon distance (natural log) of two count vectors over the same bins."""
    r, c = _shares(reference_counts), _shares(current_counts)
    if r.sum() == 0 or c.sum() == 0:
        return float("nan")
    return float(jensenshannon(r, c))


def chi2_test(reference_counts: Any, current_counts: Any) -> tuple[float, float]:
    """chi² statistic and p-value of current counts against the reference shares (empty reference bins filled)."""
    r = _shares(reference_counts)
    obs = np.asarray(current_counts, dtype=np.float64)
    n = obs.sum()
    if r.sum() == 0 or n == 0 or len(obs) < 2:
        return float("nan"), float("nan")
    r = _fill_zeros(r)
    expected = r / r.sum() * n
    stat = float(np.sum((obs - expected) ** 2 / expected))
    return stat, float(stats.chi2.sf(stat, len(obs) - 1))


KS_TINY = 1e-5


def ks_pvalue(d: float, n_reference: int, n_current: int) -> float:
    """Two-sided asymptotic p-value of a two-sample KS statistic (scipy's ``ks_2samp`` for large samples).

    With over 10 000 effective samples, where the Kolmogorov limit distribution already puts it below
    ``KS_TINY`` (certain drift), the limit value itself: scipy's finite-n ``kstwo.sf`` costs ~1.3 µs per sample
    there (0.1 s per column of a 100 k-row window, seconds per drifted window), and the two differ by less than
    1e-6 (a few percent of a p-value below 1e-5).
    """
    if n_reference == 0 or n_current == 0 or not np.isfinite(d):
        return float("nan")
    m, n = sorted([float(n_reference), float(n_current)], reverse=True)
    en = np.round(m * n / (m + n))
    limit = float(special.kolmogorov(d * np.sqrt(en))) if en > 10_000 else 1.0
    if en > 10_000 and limit < KS_TINY:
        return limit
    return float(np.clip(stats.kstwo.sf(d, en), 0.0, 1.0))


def ks_from_sketch(profile: FeatureProfile, sketch_counts: Any) -> tuple[float, float]:
    """KS statistic and p-value from current counts over the profile's sketch buckets (``len(sketch) + 1``)."""
    counts = np.asarray(sketch_counts, dtype=np.float64)
    n = counts.sum()
    if n == 0 or not profile.sketch:
        return float("nan"), float("nan")
    cur_cdf = np.cumsum(counts[:-1]) / n
    d = float(np.max(np.abs(np.asarray(profile.sketch_cdf) - cur_cdf)))
    return d, ks_pvalue(d, profile.present, int(n))


# --- per-window accumulation --------------------------------------------------------------------------------
def window_groups(widx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(widx, return_inverse=True)`` in linear time: a batch spans few windows, so count, don't sort."""
    if len(widx) == 0:
        return widx[:0], np.zeros(0, dtype=np.intp)
    lo, hi = int(widx.min()), int(widx.max())
    if hi - lo > 4 * len(widx) + 1024:
        return np.unique(widx, return_inverse=True)
    offset = (widx - lo).astype(np.intp)
    present = np.bincount(offset, minlength=hi - lo + 1) > 0
    uniq = np.flatnonzero(present) + lo
    if present.all():
        return uniq.astype(widx.dtype), offset
    return uniq.astype(widx.dtype), (np.cumsum(present) - 1)[offset]




@dataclass
class ColumnDrift:
    """Drift of one column in one window against its reference."""

    name: str
    kind: str
    n: int
    missing_rate: float
    out_of_range_rate: float
    psi: float
    ks: float
    ks_pvalue: float
    chi2: float
    chi2_pvalue: float
    js: float
    mean: float | None = None
    reference_mean: float | None = None
    new_categories: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class WindowDrift:
    """Every column's drift in the window ``[start, end)``."""

    start: datetime
    end: datetime
    rows: int
    columns: dict[str, ColumnDrift]

    def worst(self, metric: str = "psi") -> tuple[str | None, float]:
        """The feature (not the score) with the highest value of ``metric``."""
        best: tuple[str | None, float] = (None, float("nan"))
        for name, col in self.columns.items():
            v = getattr(col, metric)
            if name != SCORE and np.isfinite(v) and (best[0] is None or v > best[1]):
                best = (name, float(v))
        return best


class _ColumnCounts:
    __slots__ = ("above", "below", "bins", "cats", "missing", "n", "sketch", "total")

    def __init__(self, prof: FeatureProfile) -> None:
        self.bins = np.zeros(len(prof.edges) + 1, dtype=np.int64)
        self.sketch = np.zeros(len(prof.sketch) + 1, dtype=np.int64)
        self.missing = self.n = self.below = self.above = 0
        self.total = 0.0
        self.cats: Counter[str] = Counter()



class _Cuts:
    """Every cut point of a numeric column (sketch points, bin edges, the reference's range) and a fast
    ``np.searchsorted(points, x, side="left")``.

    A value's bucket ``i`` (``points[i-1] < x <= points[i]``) gives its sketch bucket, its bin and whether it is
    below the reference min (``x <= nextafter(min, -inf)``) or above its max (``i == len(points)``). The search
    goes through a uniform grid over the points: a value's grid cell gives, from a table, how many points lie
    in the cells before it, and a step or two over the points in its own cell finish the count. Both use the
    same (monotone) float arithmetic, so the result equals ``searchsorted`` exactly; when the points are too
    uneven for a small grid (a heavy tail), it is ``searchsorted`` itself.
    """

    MAX_CELLS = 1 << 16
    MAX_STEPS = 3

    def __init__(self, prof: FeatureProfile) -> None:
        sketch = np.asarray(prof.sketch, dtype=np.float64)
        edges = np.asarray(prof.edges, dtype=np.float64)
        lo = float(prof.min) if prof.min is not None else float(sketch[0])
        hi = float(prof.max) if prof.max is not None else float(sketch[-1])
        below = np.nextafter(lo, -np.inf)
        self.points = p = np.unique(np.concatenate([sketch, edges, [below, hi]]))
        # Bucket i of the points -> bucket of the sketch / of the bins (no sketch point or edge falls inside it).
        ends = np.append(p, np.inf)
        self.to_sketch = np.searchsorted(sketch, ends, side="left")
        self.to_bins = np.searchsorted(edges, ends, side="left")
        self.below = int(np.searchsorted(p, below, side="left")) + 1  # buckets 0..below-1 hold x < min
        self.ns, self.nb = len(sketch) + 1, len(edges) + 1
        self._ext = np.append(p, np.inf)
        self._origin = float(p[0])
        self._table: np.ndarray | None = None
        cells = max(16, 2 * len(p))
        span = float(p[-1]) - self._origin
        while np.isfinite(span) and span > 0:
            self._scale, self._cells = (cells - 1) / span, cells
            if not np.isfinite(self._scale):
                break
            cell_of = self._cell(p)
            self._steps = int(np.bincount(cell_of, minlength=cells).max())
            if self._steps <= self.MAX_STEPS:
                # How many points lie in the cells before cell c.
                self._table = np.searchsorted(cell_of, np.arange(cells), side="left").astype(np.intp)
                break
            if cells >= self.MAX_CELLS:
                break
            cells *= 2

    def _cell(self, x: np.ndarray) -> np.ndarray:
        g = x - self._origin
        g *= self._scale
        np.clip(g, 0, self._cells - 1, out=g)
        return g.astype(np.intp)

    def index(self, x: np.ndarray) -> np.ndarray:
        """``np.searchsorted(self.points, x, side="left")`` of finite values."""
        if self._table is None:
            return np.searchsorted(self.points, x, side="left")
        idx = self._table[self._cell(x)]
        for _ in range(self._steps):
            idx += self._ext[idx] < x
        return idx

    def split(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per window (rows of ``counts`` over the buckets): sketch counts, bin counts, below min, above max."""
        sketch = np.stack([np.bincount(self.to_sketch, weights=r, minlength=self.ns) for r in counts])
        bins = np.stack([np.bincount(self.to_bins, weights=r, minlength=self.nb) for r in counts])
        return (sketch.astype(np.int64), bins.astype(np.int64), counts[:, :self.below].sum(axis=1),
                counts[:, -1])

class DriftAccumulator:
    """Counts per window of every profiled column; feed frames with :meth:`update`, read :meth:`results`.

    ``time_column`` holds each row's event time; windows are ``[origin + i*window, origin + (i+1)*window)`` with
    ``origin`` midnight of the first row's day unless given. A frame may span several windows and arrive in any
    order; memory is a few hundred counters per column and window.
    """

    def __init__(self, profile: Profile, window: timedelta = timedelta(days=1), *, time_column: str = "event_time",
                 origin: datetime | None = None, columns: Sequence[str] | None = None) -> None:
        if window <= timedelta(0):
            raise MonitorError(f"The monitoring window must be longer than 0. Got {window} instead.")
        self.profile = profile
        self.window = window
        self.time_column = time_column
        self.origin = pd.Timestamp(origin) if origin is not None else None
        available = profile.columns()
        self.columns = {c: available[c] for c in (columns or available) if c in available}
        self._windows: dict[int, dict[str, _ColumnCounts]] = {}
        self._rows: dict[int, int] = {}
        self._step = int(pd.Timedelta(window).value)
        # One search per value, over the union of a column's cut points; sketch, bins and range follow from it.
        self._cuts = {name: _Cuts(p) for name, p in self.columns.items() if p.kind == "numeric" and p.sketch}

    def _window_index(self, times: Any) -> np.ndarray:
        t = np.asarray(times)
        if t.dtype != np.dtype("datetime64[ns]"):
            t = pd.to_datetime(pd.Series(t)).to_numpy(dtype="datetime64[ns]")
        t = t.astype(np.int64)
        if self.origin is None:
            day = 86_400_000_000_000
            self.origin = pd.Timestamp(int(t.min() // day * day))
        return (t - int(self.origin.value)) // self._step

    def update(self, frame: pd.DataFrame) -> None:
        """Add a frame's rows (a time column and one column per profiled feature / ``score``)."""
        if len(frame) == 0:
            return
        if self.time_column not in frame.columns:
            raise MonitorError(f"The frame has no time column {self.time_column!r} to window drift by.",
                               hint="Pass time_column=... naming the event time.")
        times = frame[self.time_column]
        valid = ~pd.isna(times).to_numpy()
        if not valid.all():
            frame, times = frame.loc[valid], times[valid]
        uniq, inv = window_groups(self._window_index(times))
        k = len(uniq)
        for w, c in zip(uniq.tolist(), np.bincount(inv, minlength=k).tolist(), strict=True):
            self._rows[w] = self._rows.get(w, 0) + c
            if w not in self._windows:
                self._windows[w] = {name: _ColumnCounts(p) for name, p in self.columns.items()}
        numeric: list[str] = []
        for name, prof in self.columns.items():
            if name not in frame.columns:
                missing = np.bincount(inv, minlength=k)
                for j, w in enumerate(uniq.tolist()):
                    acc = self._windows[w][name]
                    acc.n += int(missing[j])
                    acc.missing += int(missing[j])
                continue
            if prof.kind == "categorical":
                self._update_categorical(name, frame[name], uniq, inv)
            else:
                numeric.append(name)
        # Columns touch disjoint counters and NumPy's searches release the GIL: run them side by side.
        if len(frame) >= 50_000 and len(numeric) > 1 and (os.cpu_count() or 1) > 1:
            with ThreadPoolExecutor(max_workers=min(len(numeric), os.cpu_count() or 1)) as pool:
                list(pool.map(lambda c: self._update_numeric(c, self.columns[c], frame[c], uniq, inv), numeric))
        else:
            for c in numeric:
                self._update_numeric(c, self.columns[c], frame[c], uniq, inv)

    def _update_numeric(self, name: str, prof: FeatureProfile, col: pd.Series, uniq: np.ndarray,
                        inv: np.ndarray) -> None:
        x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        k = len(uniq)
        ok = np.isfinite(x)
        n_all = np.bincount(inv, minlength=k)
        if ok.all():  # the usual case: no copies
            xs, ws, n_ok = x, inv, n_all
        else:
            xs, ws = x[ok], inv[ok]
            n_ok = np.bincount(ws, minlength=k)
        cuts = self._cuts.get(name)
        if cuts is not None:
            m = len(cuts.points) + 1
            idx = cuts.index(xs)
            counts = (np.bincount(idx, minlength=m)[None, :] if k == 1
                      else np.bincount(ws * m + idx, minlength=k * m).reshape(k, m))
            sketch, bins, below, above = cuts.split(counts)
        else:  # no finite reference value: one bin, no sketch, no range
            sketch = np.zeros((k, 1), np.int64)
            bins = n_ok[:, None].astype(np.int64)
            below = above = np.zeros(k, np.int64)
        total = np.array([float(xs.sum())]) if k == 1 else np.bincount(ws, weights=xs, minlength=k)
        for j, w in enumerate(uniq.tolist()):
            acc = self._windows[w][name]
            acc.bins += bins[j]
            acc.sketch += sketch[j]
            acc.n += int(n_all[j])
            acc.missing += int(n_all[j] - n_ok[j])
            acc.below += int(below[j])
            acc.above += int(above[j])
            acc.total += float(total[j])

    def _update_categorical(self, name: str, col: pd.Series, uniq: np.ndarray, inv: np.ndarray) -> None:
        missing = col.isna().to_numpy()
        values = col.astype(object).where(~missing, None)
        for j, w in enumerate(uniq.tolist()):
            sel = inv == j
            acc = self._windows[w][name]
            acc.n += int(sel.sum())
            acc.missing += int((sel & missing).sum())
            acc.cats.update(str(v) for v in values[sel & ~missing])

    def results(self) -> list[WindowDrift]:
        """One :class:`WindowDrift` per window that received rows, oldest first."""
        assert self.origin is not None or not self._windows
        out = []
        for w in sorted(self._windows):
            start = (self.origin + pd.Timedelta(self._step * w, unit="ns")).to_pydatetime()
            cols = {name: _column_drift(prof, self._windows[w][name]) for name, prof in self.columns.items()}
            out.append(WindowDrift(start=start, end=start + self.window, rows=self._rows[w], columns=cols))
        return out


def _column_drift(prof: FeatureProfile, acc: _ColumnCounts) -> ColumnDrift:
    present = acc.n - acc.missing
    missing_rate = acc.missing / acc.n if acc.n else float("nan")
    if prof.kind == "categorical":
        ref = prof.categories
        pooled = OTHER in ref
        cur: Counter[str] = Counter()
        new: list[str] = []
        for value, count in acc.cats.items():
            if value in ref:
                cur[value] += count
            else:
                cur[OTHER if pooled else value] += count
                if not pooled:
                    new.append(value)
        keys = list(ref) + [v for v in cur if v not in ref]
        r = np.array([ref.get(k2, 0) for k2 in keys], dtype=np.float64)
        c = np.array([cur.get(k2, 0) for k2 in keys], dtype=np.float64)
        chi, chi_p = chi2_test(r, c)
        new_rate = sum(acc.cats[v] for v in new) / present if present else float("nan")
        return ColumnDrift(name=prof.name, kind="categorical", n=acc.n, missing_rate=missing_rate,
                           out_of_range_rate=new_rate, psi=psi(r, c), ks=float("nan"), ks_pvalue=float("nan"),
                           chi2=chi, chi2_pvalue=chi_p, js=js_distance(r, c), new_categories=sorted(new)[:50],
                           counts=c.astype(int).tolist())
    d, p = ks_from_sketch(prof, acc.sketch)
    chi, chi_p = chi2_test(prof.counts, acc.bins)
    return ColumnDrift(
        name=prof.name, kind="numeric", n=acc.n, missing_rate=missing_rate,
        out_of_range_rate=(acc.below + acc.above) / present if present else float("nan"),
        psi=psi(prof.counts, acc.bins), ks=d, ks_pvalue=p, chi2=chi, chi2_pvalue=chi_p,
        js=js_distance(prof.counts, acc.bins), mean=acc.total / present if present else None,
        reference_mean=prof.mean, counts=acc.bins.tolist(),
    )


def drift_table(profile: Profile, frame: pd.DataFrame, *, columns: Sequence[str] | None = None) -> dict[str, ColumnDrift]:
    """Drift of every profiled column of one table (one window) against the profile. Pure.

    ``frame`` has one column per feature and, optionally, ``score``. Example::

        drift_table(profile, todays_features)["tx_amount"].psi
    """
    tagged = frame.assign(__t=pd.Timestamp("2000-01-01"))
    acc = DriftAccumulator(profile, timedelta(days=1), time_column="__t", columns=columns)
    acc.update(tagged)
    results = acc.results()
    if not results:
        raise MonitorError("The table to compare with the reference profile is empty.")
    return results[0].columns


# --- streaming the prediction log ---------------------------------------------------------------------------
LOG_COLUMNS = ("seq", "event_time", "time", "event_id", "score", "decision", "model_version", "fallback",
               "fallback_reason", "stale", "latency_ms", "request_id")


def iter_log(path: str | Path, *, features: Sequence[str] = (), inputs: Sequence[str] = (),
             start: datetime | str | None = None, end: datetime | str | None = None,
             batch_rows: int = 200_000) -> Iterator[pd.DataFrame]:
    """Stream the prediction log with only the columns monitoring needs, ``batch_rows`` at a time.

    Base columns (:data:`LOG_COLUMNS`), one column per requested feature (from the logged ``features``) and per
    requested raw input field (from ``inputs``, prefixed ``input.``); ``start <= event_time < end``. The JSON
    texts are decoded a batch at a time, not row by row (:func:`keel.monitor.logread.read_log`).
    """
    from keel.monitor.logread import read_log

    yield from read_log(path, features=features, inputs=inputs, start=start, end=end, batch_rows=batch_rows,
                        columns=LOG_COLUMNS)


def log_time_range(path: str | Path) -> tuple[datetime | None, datetime | None, datetime | None]:
    """(first event time, last event time, last label time) of a prediction log; None where empty."""
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"No prediction log at {p}.",
                           hint="Serve some traffic first (`keel serve`), or check serving.prediction_log.")
    from keel.monitor.logread import event_time_range

    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        lo, hi = event_time_range(db)  # (segment-only rows included)
        try:
            (lab,) = db.execute("select max(at) from labels").fetchone()
        except sqlite3.Error:
            lab = None
    finally:
        db.close()

    def ts(v: str | None) -> datetime | None:
        return None if v is None else pd.Timestamp(v).to_pydatetime()

    return ts(lo), ts(hi), ts(lab)


def window_drift_dict(w: WindowDrift) -> dict[str, Any]:
    return {"start": w.start.isoformat(), "end": w.end.isoformat(), "rows": w.rows,
            "columns": {k: {kk: vv for kk, vv in v.as_dict().items() if kk != "counts"}
                        for k, v in w.columns.items()}}


__all__ = [
    "ColumnDrift",
    "DriftAccumulator",
    "WindowDrift",
    "chi2_test",
    "drift_table",
    "iter_log",
    "js_distance",
    "ks_from_sketch",
    "ks_pvalue",
    "log_time_range",
    "psi",
    "window_drift_dict",
]
