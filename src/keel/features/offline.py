"""Offline features: point-in-time correct window aggregates for training and backfills, and their lineage.

:func:`compute_features` is pure (frame in, frame out). It sorts once by time, then per entity by
(entity, time, input order), finds each window's bounds by binary search on a combined (entity, time-rank)
key — vectorised across all entities — and reads every sum from prefix sums, so the cost is a few sorts and
searches, independent of window length. Prefix sums are split into an exact integer part and a tiny
residual, so a window's sum is accurate to about one rounding of the window's own total (not of the running
total over the whole table).

Semantics (the same as :mod:`keel.features.online`, and as the fraud handbook's pandas ``rolling``):

* A window feature at an event with time ``t`` aggregates same-entity events with time in
  ``(t - delay - window, t - delay]``.
* ``delay == 0``: events at the same timestamp count only if they come earlier in event order (input order
  for ties; the arrival order online); the event itself counts when ``include_current``.
* ``count`` counts events; ``sum``/``mean``/``min``/``max``/``std`` use the non-null values of ``column``
  (``std`` is the sample standard deviation); ``label_count`` sums labels (null labels count 0) and
  ``label_rate = label_count / count``.
* Empty windows: ``count``, ``sum``, ``label_count`` and ``label_rate`` are 0 (the handbook's risk is 0 when a
  terminal had no transactions); ``mean``, ``min``, ``max`` are NaN; ``std`` is NaN below two values.
* Row features: ``is_weekend`` = weekday >= 5, ``is_night`` = hour <= ``night_end_hour``, ``hour``,
  ``weekday`` (Monday = 0), ``log1p``, ``column`` (as float). Ratios: NaN when the denominator is 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from keel.data.sources import Source, open_source, quote_identifier
from keel.errors import DataError, FeatureError
from keel.features.chunked import (
    DEFAULT_CHUNK_ROWS,
    chunked_features,
    empty_schema,
    read_time_ordered,
    rechunk,
    time_ordered_batches,
)
from keel.features.definitions import (
    Definition,
    RatioDefinition,
    RawDefinition,
    RowDefinition,
    WindowDefinition,
    definitions_hash,
    entities,
    feature_names,
    required_columns,
    validate_schema,
    window_definitions,
)
from keel.io import process_start_time

_NS_PER_S = 1_000_000_000
_PARALLEL_ROWS = 200_000


# --- shared numeric code (offline and online) ------------------------------------------------------------
def to_ns(delta: timedelta) -> int:
    """A duration in integer nanoseconds (the unit every window bound is computed in)."""
    return (delta.days * 86_400 + delta.seconds) * _NS_PER_S + delta.microseconds * 1000


def window_edges(t_ns: Any, d: WindowDefinition) -> tuple[Any, Any]:
    """The window of an event at ``t_ns`` as ``(start_exclusive, end_inclusive)`` in ns: ``(t-delay-w, t-delay]``."""
    end = t_ns - to_ns(d.delay)
    return end - to_ns(d.window), end


def finish_aggregate(
    aggregate: str,
    count: Any,
    valid: Any,
    total: Any,
    m2: Any,
    minimum: Any,
    maximum: Any,
    label_total: Any,
) -> Any:
    """Turn window statistics into the feature value; arrays (offline) or Python numbers (online, one event).

    ``valid`` = non-null values, ``m2`` = sum of squared deviations from the window mean. Both branches encode
    the same rules: empty mean/min/max -> NaN, std below two values -> NaN, empty label_rate -> 0. Arrays
    carry window totals as the prefix sums give them: exactly 0 over an empty window.
    """
    if isinstance(count, int | np.integer):
        return _finish_scalar(
            aggregate, int(count), int(valid or 0), total, m2, minimum, maximum, label_total
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        if aggregate == "count":
            return np.asarray(count, dtype=np.float64)
        if aggregate == "sum":
            return np.asarray(total, dtype=np.float64)
        if aggregate == "mean":
            # An empty window's total is exactly 0 (prefix sums on a grid), so 0/0 gives the NaN itself.
            return np.asarray(total, dtype=np.float64) / valid
        if aggregate == "min":
            return np.where(np.asarray(valid) > 0, minimum, np.nan)
        if aggregate == "max":
            return np.where(np.asarray(valid) > 0, maximum, np.nan)
        if aggregate == "std":
            var = np.asarray(m2, dtype=np.float64) / (np.asarray(valid, dtype=np.float64) - 1)
            return np.where(np.asarray(valid) > 1, np.sqrt(np.maximum(var, 0.0)), np.nan)
        if aggregate == "label_count":
            return np.asarray(label_total, dtype=np.float64)
        if aggregate == "label_rate":
            # An empty window has label total exactly 0: 0 / max(count, 1) is the 0 the rule asks for.
            return np.asarray(label_total, dtype=np.float64) / np.maximum(count, 1)
    raise FeatureError(f"Unknown aggregate {aggregate!r}.")


def _finish_scalar(
    aggregate: str, count: int, valid: int, total: Any, m2: Any, minimum: Any, maximum: Any, label_total: Any
) -> float:
    if aggregate == "count":
        return float(count)
    if aggregate == "sum":
        return float(total) if valid else 0.0
    if aggregate == "mean":
        return float(total) / valid if valid > 0 else math.nan
    if aggregate == "min":
        return float(minimum) if valid > 0 else math.nan
    if aggregate == "max":
        return float(maximum) if valid > 0 else math.nan
    if aggregate == "std":
        return math.sqrt(max(float(m2) / (valid - 1), 0.0)) if valid > 1 else math.nan
    if aggregate == "label_count":
        return float(label_total)
    if aggregate == "label_rate":
        return float(label_total) / count if count > 0 else 0.0
    raise FeatureError(f"Unknown aggregate {aggregate!r}.")


def row_feature(d: RowDefinition, values: Any) -> np.ndarray:
    """A row transform on a column (a pandas Series or array of timestamps / numbers)."""
    if d.kind in ("is_weekend", "is_night", "hour", "weekday"):
        dtype = getattr(values, "dtype", None)
        if dtype is not None and np.issubdtype(dtype, np.datetime64) and not pd.isna(values).any():
            # Naive timestamps: calendar fields by integer arithmetic (1970-01-01 was a Thursday, weekday 3).
            ns = np.asarray(values, dtype="datetime64[ns]").view(np.int64)
            days, rest = np.divmod(ns, 86_400 * _NS_PER_S)
            if d.kind in ("is_weekend", "weekday"):
                weekday = (days + 3) % 7
                return (
                    (weekday >= 5).astype(np.float64)
                    if d.kind == "is_weekend"
                    else weekday.astype(np.float64)
                )
            hour = rest // (3600 * _NS_PER_S)
            return (
                (hour <= d.night_end_hour).astype(np.float64)
                if d.kind == "is_night"
                else hour.astype(np.float64)
            )
        ts = pd.DatetimeIndex(pd.to_datetime(values))
        if d.kind == "is_weekend":
            out = ts.weekday >= 5
        elif d.kind == "is_night":
            out = ts.hour <= d.night_end_hour
        elif d.kind == "hour":
            out = ts.hour
        else:
            out = ts.weekday
        return np.asarray(out, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    if d.kind == "log1p":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log1p(x)
    return x.copy()


def row_value(d: RowDefinition, value: Any) -> float:
    """:func:`row_feature` for one value (the online path); the same rules without array overhead."""
    if value is None:
        return math.nan
    if d.kind in ("is_weekend", "is_night", "hour", "weekday"):
        ts = value if isinstance(value, datetime) else pd.Timestamp(value)
        if d.kind == "is_weekend":
            return float(ts.weekday() >= 5)
        if d.kind == "is_night":
            return float(ts.hour <= d.night_end_hour)
        return float(ts.hour if d.kind == "hour" else ts.weekday())
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    if d.kind == "log1p":
        return math.log1p(x) if x > -1 else (-math.inf if x == -1 else math.nan)
    return x


def ratio_feature(numerator: Any, denominator: Any) -> Any:
    """numerator / denominator, NaN where the denominator is 0 (arrays, or floats for one event)."""
    if isinstance(numerator, float | int) and isinstance(denominator, float | int):
        return float(numerator) / denominator if denominator != 0 else math.nan
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / den, np.nan)


# --- exact-ish prefix sums ---------------------------------------------------------------------------------
def _decimal_grid(x: np.ndarray) -> tuple[float, np.ndarray] | None:
    """``(decimals, rint(x * decimals))`` for the first of 1, 100, 10,000 that puts every value of ``x`` exactly
    on an integer grid (counts, labels, cents, basis points), or None."""
    for decimals in (1.0, 100.0, 10_000.0):
        grid = np.rint(x * decimals)
        if np.array_equal(grid / decimals, x):
            return decimals, grid
    return None


@dataclass(frozen=True)
class _Prefix:
    """Prefix sums as an exact int64 part (values on a decimal or 2**-k grid) plus a small float residual."""

    whole: np.ndarray
    residual: np.ndarray | None
    scale: float
    divisor: float

    @classmethod
    def of(cls, values: np.ndarray) -> _Prefix:
        x = np.asarray(values, dtype=np.float64)
        biggest = float(np.max(np.abs(x))) if len(x) else 0.0
        total = float(np.sum(np.abs(x))) if len(x) else 0.0
        if biggest == 0.0 or not math.isfinite(total):
            return cls(np.zeros(len(x) + 1, dtype=np.int64), None, 1.0, 1.0)
        # Decimal data (counts, labels, cents) sums exactly in integers: the window sum is correctly rounded.
        on_grid = _decimal_grid(x)
        if on_grid is not None and total * on_grid[0] < 2.0**62:
            decimals, grid = on_grid
            whole = np.zeros(len(x) + 1, dtype=np.int64)
            np.cumsum(grid.astype(np.int64), out=whole[1:])
            return cls(whole, None, 1.0, decimals)
        k = min(52 - math.frexp(biggest)[1], 62 - math.frexp(total)[1])
        step = math.ldexp(1.0, -k)
        grid = np.rint(x / step)
        whole = np.zeros(len(x) + 1, dtype=np.int64)
        np.cumsum(grid.astype(np.int64), out=whole[1:])
        residual = np.zeros(len(x) + 1, dtype=np.float64)
        np.cumsum(x - grid * step, out=residual[1:])
        return cls(whole, residual, step, 1.0)

    def range_sum(self, lo: np.ndarray, hi: np.ndarray | slice) -> np.ndarray:
        whole = (self.whole[hi] - self.whole[lo]).astype(np.float64)
        if self.residual is None:
            return whole / self.divisor if self.divisor != 1.0 else whole
        return whole * self.scale + (self.residual[hi] - self.residual[lo])


def _range_reduce(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """min/max over [lo, hi) per query with a sparse table, only as deep as the longest window needs."""
    length = hi - lo
    longest = int(length.max()) if len(length) else 0
    if longest == 0:
        return np.full(len(lo), np.nan)
    levels = [values]
    while (1 << len(levels)) <= longest:
        prev = levels[-1]
        half = 1 << (len(levels) - 1)
        nxt = prev.copy()
        nxt[:-half] = ufunc(prev[:-half], prev[half:])
        levels.append(nxt)
    table = np.stack(levels)
    safe = np.maximum(length, 1)
    k = np.floor(np.log2(safe)).astype(np.int64)
    a = table[k, np.minimum(lo, len(values) - 1)]
    b = table[k, np.maximum(hi - (1 << k), 0)]
    return np.where(length > 0, ufunc(a, b), np.nan)


# --- compute ---------------------------------------------------------------------------------------------
def _timestamps_ns(series: pd.Series, column: str) -> np.ndarray:
    try:
        values = pd.to_datetime(series)
    except (TypeError, ValueError) as exc:
        raise FeatureError(
            f"Column {column!r} (the event time) cannot be read as timestamps: {exc}."
        ) from None
    if values.isna().any():
        raise FeatureError(
            f"Column {column!r} (the event time) has {int(values.isna().sum())} null values; window features "
            "need a time for every event.",
            hint="Drop or fix those rows upstream (keel validate reports them).",
        )
    if getattr(values.dt, "tz", None) is not None:
        values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    return values.to_numpy(dtype="datetime64[ns]").view(np.int64)


def _labels(frame: pd.DataFrame, label: str | None, needed: bool) -> np.ndarray | None:
    if not needed:
        return None
    if label is None or label not in frame.columns:
        raise FeatureError(
            f"Label-based features need the label column {label!r}, which is not in the frame."
        )
    y = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=np.float64)
    return np.nan_to_num(y, nan=0.0)


def _sorted_search(key: np.ndarray, needles: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``np.searchsorted(key, needles, "right")`` for sorted needles, in cache-sized chunks (about 2x faster)."""
    n = len(needles)
    if n <= chunk:
        return np.searchsorted(key, needles, side="right")
    out = np.empty(n, dtype=np.int64)
    starts = np.searchsorted(key, needles[::chunk], side="right")
    ends = np.searchsorted(key, needles[chunk - 1 :: chunk], side="right")
    for j, a in enumerate(range(0, n, chunk)):
        b = min(a + chunk, n)
        lo = int(starts[j])
        hi = int(ends[j]) if j < len(ends) else len(key)
        out[a:b] = lo + np.searchsorted(key[lo:hi], needles[a:b], side="right")
    return out


def _stable_order(codes: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer codes; radix passes on 16-bit digits (linear time)."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(codes.max())
    order = np.argsort((codes & 0xFFFF).astype(np.uint16), kind="stable")
    if top > 0xFFFF:
        order = order[np.argsort((codes[order] >> 16).astype(np.uint32), kind="stable")]
    return order


@dataclass
class _Clock:
    """Event times as small integers plus how to turn a window offset into the same unit."""

    ticks: np.ndarray  # int64, per row
    order_t: np.ndarray  # stable time order of the rows
    unit: int  # ns per tick; 0 means ticks are ranks of distinct times (fallback)
    span: int  # distance between two entities' key ranges
    unique_t: np.ndarray | None = None

    @classmethod
    def of(cls, t: np.ndarray, offsets: list[int], n_groups: int) -> _Clock:
        n = len(t)
        order_t = np.argsort(t, kind="stable")
        if n == 0:
            return cls(np.zeros(0, dtype=np.int64), order_t, 1, 1)
        t0 = int(t[order_t[0]])
        rel = t - t0
        unit = int(np.gcd.reduce(np.append(rel, offsets)))
        unit = max(unit, 1)
        span = int(rel.max()) // unit + max(offsets, default=0) // unit + 1
        if span * (max(n_groups, 1) + 1) < 2**62:
            return cls(rel // unit, order_t, unit, span)
        ts = t[order_t]
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(ts[1:], ts[:-1], out=new[1:])
        rank = np.empty(n, dtype=np.int64)
        rank[order_t] = np.cumsum(new) - 1
        return cls(rank, order_t, 0, int(new.sum()) + 1, ts[new])


def _entity_codes(series: pd.Series) -> np.ndarray:
    """Dense non-negative int codes per entity value (integer ids in a compact range skip hashing)."""
    if pd.api.types.is_integer_dtype(series.dtype) and len(series):
        v = series.to_numpy(dtype=np.int64)
        low, high = int(v.min()), int(v.max())
        if high - low <= 4 * len(v) + 1024:
            return v - low
    codes, _ = pd.factorize(series, use_na_sentinel=False)
    return codes.astype(np.int64)


def _first_value_per_group(sorted_codes: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row, the entity's earliest non-null value: a past-only shift that keeps variance sums well conditioned."""
    n = len(v)
    if n == 0:
        return v
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    first = np.minimum.reduceat(np.where(np.isnan(v), n, np.arange(n)), starts)
    shift = np.where(first < n, v[np.minimum(first, n - 1)], 0.0)
    return np.repeat(shift, np.diff(np.r_[starts, n]))


def _window_m2(v: np.ndarray, sorted_codes: np.ndarray, lo: np.ndarray, hi: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per window, the sum of squared deviations of its non-null values from their mean (``std``'s numerator).

    Values on a decimal grid (money, counts) use exact integer sums of the values and their squares, each centred
    on its entity's first value: S2 - S1**2/n is then taken as an exact integer minus a remainder below n, so
    a window whose spread is tiny against its level (999.99, 1000.00) keeps every digit, as the online store's
    two-pass sum does. Other values use float prefix sums of the centred values, good to about one rounding of
    the window's squared level.
    """
    present = ~np.isnan(v)
    shift = _first_value_per_group(sorted_codes, v)
    on_grid = _decimal_grid(np.where(present, v, 0.0)) if np.isfinite(v[present]).all() else None
    if on_grid is not None:
        decimals, grid = on_grid
        dev = np.where(present, grid - np.rint(shift * decimals), 0.0)
        biggest = float(np.max(np.abs(dev))) if len(dev) else 0.0
        if biggest * biggest * len(dev) < 2.0**60:  # else squares would overflow int64: the float path below
            d = dev.astype(np.int64)
            p1 = np.zeros(len(d) + 1, dtype=np.int64)
            p2 = np.zeros(len(d) + 1, dtype=np.int64)
            np.cumsum(d, out=p1[1:])
            np.cumsum(d * d, out=p2[1:])
            s1, s2 = p1[hi] - p1[lo], p2[hi] - p2[lo]
            n = np.maximum(np.asarray(valid, dtype=np.int64), 1)
            q = np.floor_divide(s1, n)
            r = s1 - q * n  # s1 = q*n + r with 0 <= r < n, so s1**2/n = q*q*n + 2*q*r + r*r/n
            whole = s2 - q * q * n - 2 * q * r
            return (whole.astype(np.float64) - r.astype(np.float64) ** 2 / n) / (decimals * decimals)
    centred = np.where(present, v - shift, 0.0)
    s1 = _Prefix.of(centred).range_sum(lo, hi)
    s2 = _Prefix.of(centred * centred).range_sum(lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        return s2 - np.where(valid > 0, s1 * s1 / np.maximum(valid, 1), 0.0)


def _window_block(
    frame: pd.DataFrame,
    defs: list[WindowDefinition],
    codes: np.ndarray,
    t: np.ndarray,
    clock: _Clock,
    labels: np.ndarray | None,
    first_row: int = 0,
) -> dict[str, np.ndarray]:
    n = len(t)
    order = clock.order_t[_stable_order(codes[clock.order_t])]
    group = codes[order] * clock.span
    key = group + clock.ticks[order]
    # The windows are evaluated only at the rows that get features (from first_row on); rows before are history
    # every window reads through the prefix sums and bounds, at no per-feature cost.
    if first_row:
        query = np.flatnonzero(order >= first_row)
        target = order[query] - first_row
    else:
        query = np.arange(n, dtype=np.int64)
        target = order
    q_key = key[query] if first_row else key
    t_sorted = t[order] if not clock.unit else t
    bound_cache: dict[int, np.ndarray] = {}

    def first_after(offset_ns: int) -> np.ndarray:
        """Per queried sorted row: index of the first same-entity event with time > t - offset."""
        if offset_ns not in bound_cache:
            if clock.unit:
                needles = q_key - offset_ns // clock.unit
            else:
                assert clock.unique_t is not None
                t_query = t_sorted[query] if first_row else t_sorted
                g = group[query] if first_row else group
                needles = g + np.searchsorted(clock.unique_t, t_query - offset_ns, side="right") - 1
            bound_cache[offset_ns] = _sorted_search(key, needles)
        return bound_cache[offset_ns]

    columns = {d.column for d in defs if d.column}
    values = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64)[order] for c in columns}
    prefix: dict[str, tuple[_Prefix, _Prefix | None]] = {}
    for c, v in values.items():
        valid = ~np.isnan(v)
        has_nulls = not bool(valid.all())
        prefix[c] = (
            _Prefix.of(np.where(valid, v, 0.0) if has_nulls else v),
            _Prefix.of(valid.astype(np.float64)) if has_nulls else None,
        )
    label_prefix = None
    if labels is not None and any(d.reads_label for d in defs):
        label_prefix = _Prefix.of(labels[order])

    out: dict[str, np.ndarray] = {}
    position = query
    after_self = position + 1
    counts: dict[tuple[int, int, bool], np.ndarray] = {}
    for d in defs:
        delay_ns, window_ns = to_ns(d.delay), to_ns(d.window)
        hi = (after_self if d.include_current else position) if delay_ns == 0 else first_after(delay_ns)
        # lo <= hi always: the start bound is earlier than the end bound (and than the event itself).
        lo = first_after(delay_ns + window_ns)
        shape = (delay_ns, window_ns, d.include_current)
        if shape not in counts:
            counts[shape] = hi - lo
        count = counts[shape]
        valid = total = m2 = mn = mx = lab = None
        if d.column:
            v = values[d.column]
            sums, valid_prefix = prefix[d.column]
            valid = (
                count if valid_prefix is None else np.rint(valid_prefix.range_sum(lo, hi)).astype(np.int64)
            )
            if d.aggregate in ("sum", "mean"):
                total = sums.range_sum(lo, hi)
            elif d.aggregate == "std":
                m2 = _window_m2(v, codes[order], lo, hi, valid)
            elif d.aggregate == "min":
                mn = _range_reduce(np.where(np.isnan(v), np.inf, v), lo, hi, np.minimum)
                mn = np.where(np.isinf(mn), np.nan, mn)
            elif d.aggregate == "max":
                mx = _range_reduce(np.where(np.isnan(v), -np.inf, v), lo, hi, np.maximum)
                mx = np.where(np.isinf(mx), np.nan, mx)
        if d.reads_label:
            assert label_prefix is not None
            lab = label_prefix.range_sum(lo, hi)
        result = finish_aggregate(d.aggregate, count, valid, total, m2, mn, mx, lab)
        back = np.empty(n - first_row, dtype=np.float64)
        back[target] = result
        out[d.name] = back
    return out


def compute_features(
    frame: pd.DataFrame,
    definitions: Sequence[Definition],
    *,
    timestamp: str | None,
    label: str | None = None,
    id_column: str | None = None,
    first_row: int = 0,
) -> pd.DataFrame:
    """Compute every feature for every row of ``frame``, point-in-time correct (see the module docstring).

    Returns a new frame with ``id_column`` (when given), the entity columns and ``timestamp``, then one float64
    column per feature in :func:`feature_names` order; same row order and index as ``frame``. Pure: nothing is
    read or written. Raises :class:`FeatureError` when a column a definition needs is missing or mistyped.

    ``first_row``: the rows before it are history only — every window reads them, but they get no features
    and are not returned (the result is ``frame.iloc[first_row:]``'s rows, with the same values as the whole
    computation gives them). Chunked runs pass the carried rows this way instead of recomputing them.

    Example::

        table = compute_features(events, defs, timestamp="tx_datetime", label="tx_fraud", id_column="transaction_id")
    """
    defs = list(definitions)
    schema = {c: str(dtype) for c, dtype in frame.dtypes.items()}
    validate_schema(defs, schema, timestamp=timestamp, label=label, source="the input frame")
    if not 0 <= first_row <= len(frame):
        raise FeatureError(f"first_row must be between 0 and the {len(frame)} rows of the frame. Got {first_row} instead.")
    rows = frame.iloc[first_row:] if first_row else frame
    computed: dict[str, np.ndarray] = {}
    for d in defs:
        if isinstance(d, RawDefinition):
            computed[d.name] = pd.to_numeric(rows[d.column], errors="coerce").to_numpy(dtype=np.float64)
        elif isinstance(d, RowDefinition):
            computed[d.name] = row_feature(d, rows[d.column])
    windows = window_definitions(defs)
    if windows and timestamp:
        t = _timestamps_ns(frame[timestamp], timestamp)
        offsets = sorted({to_ns(d.delay) for d in windows} | {to_ns(d.delay + d.window) for d in windows})
        codes = {e: _entity_codes(frame[e]) for e in entities(defs)}
        clock = _Clock.of(t, offsets, max(int(c.max(initial=0)) + 1 for c in codes.values()))
        labels = _labels(frame, label, any(d.reads_label for d in windows))
        blocks = [
            (frame, [d for d in windows if d.entity == e], codes[e], t, clock, labels, first_row)
            for e in entities(defs)
        ]
        if len(blocks) > 1 and len(frame) >= _PARALLEL_ROWS:
            # NumPy releases the GIL in sorts, searches and gathers: entities run side by side on 2+ cores.
            with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1)) as pool:
                for result in pool.map(lambda args: _window_block(*args), blocks):
                    computed.update(result)
        else:
            for args in blocks:
                computed.update(_window_block(*args))
    for d in defs:
        if isinstance(d, RatioDefinition):
            num = computed[d.numerator] if d.numerator in computed else rows[d.numerator]
            den = computed[d.denominator] if d.denominator in computed else rows[d.denominator]
            computed[d.name] = ratio_feature(num, den)
    keys = [c for c in [id_column, *entities(defs), timestamp] if c]
    out = rows[list(dict.fromkeys(keys))].copy() if keys else pd.DataFrame(index=rows.index)
    for name in feature_names(defs):
        out[name] = computed[name]
    return out


# --- materialisation with lineage ---------------------------------------------------------------------------
LINEAGE_FILE = "_lineage.json"


@dataclass(frozen=True)
class BuildResult:
    """Outcome of :func:`build_feature_table`: rows added, total rows, whether it was a full rebuild."""

    path: Path
    rows_added: int
    rows_total: int
    full_rebuild: bool
    max_event_time: str | None
    reason: str
    chunks: int = 0


@dataclass(frozen=True)
class FeatureStatus:
    """What :func:`feature_status` found: ``stale`` when any of ``reasons`` applies (empty when up to date)."""

    path: Path
    exists: bool
    stale: bool
    reasons: tuple[str, ...]
    rows: int
    max_event_time: str | None
    computed_at: str | None
    new_rows: int


def _as_source(source: str | Path | Source | Any) -> Source:
    """A :class:`Source` for a path (or the spec's ``[data]`` when given a spec), failures named as the build's."""
    if isinstance(source, Source):
        return source
    try:
        if isinstance(source, str | Path):
            return open_source(source)
        from keel.data.sources import source_from_spec

        return source_from_spec(source)
    except DataError as exc:
        raise DataError(f"Cannot read the source: {exc.message}", hint=exc.hint) from exc


def _time_literal(value: Any) -> str:
    return f"CAST('{pd.Timestamp(value).isoformat()}' AS TIMESTAMP_NS)"


def source_fingerprint(
    source: str | Path | Source,
    columns: Sequence[str],
    *,
    timestamp: str | None = None,
    until: Any = None,
) -> dict[str, Any]:
    """Row count, max event time and an order-insensitive content hash of ``columns`` (rows up to ``until``)."""
    src = _as_source(source)
    cols = ", ".join(quote_identifier(c) for c in columns)
    ts = quote_identifier(timestamp) if timestamp else "null"
    sql = f"select count(*), cast(max({ts}) as varchar), cast(sum(hash({cols})::hugeint) as varchar) from source"
    if until is not None and timestamp:
        sql += f" where {ts} <= {_time_literal(until)}"
    with src.connect() as con:
        try:
            rows, max_time, digest = con.execute(sql).fetchone() or (0, None, None)
        except Exception as exc:  # duckdb raises several exception types for unreadable sources
            raise DataError(f"Cannot fingerprint {src.describe()}: {str(exc).splitlines()[0]}.") from None
    return {"rows": int(rows), "max_event_time": max_time, "hash": digest or "0"}


def _write_atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_lineage(table: str | Path) -> dict[str, Any] | None:
    """The lineage sidecar of a feature table folder, or None when there is none yet."""
    file = Path(table) / LINEAGE_FILE
    if not file.exists():
        return None
    try:
        return dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureError(
            f"The lineage file {file} is unreadable ({exc}).",
            hint="Rebuild with `keel features build --full`.",
        ) from None


def read_feature_table(table: str | Path) -> pd.DataFrame:
    """All rows of a materialised feature table (the parts its lineage lists, in order)."""
    lineage = read_lineage(table)
    if lineage is None:
        raise FeatureError(f"No feature table at {table}.", hint="Run `keel features build` first.")
    frames = [pd.read_parquet(Path(table) / part) for part in lineage["parts"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _iter_parts(lineage: Mapping[str, Any]) -> Iterator[str]:
    yield from lineage.get("parts", [])


def _sweep_litter(table: Path) -> None:
    """Temporaries (parts, DuckDB spill folders) of builds killed mid-write; never those of a live build."""
    for leftover in table.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime >= process_start_time():
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@dataclass
class _Progress:
    """What the streaming write has done so far (read after it completes)."""

    rows: int = 0
    chunks: int = 0
    max_time: Any = None


def _output_table(chunk: pa.Table, features: pd.DataFrame, keys: list[str], names: list[str]) -> pa.Table:
    """Key columns exactly as the source typed them, then one float64 column per feature."""
    out = chunk.select(keys)
    for name in names:
        out = out.append_column(name, pa.array(features[name].to_numpy(dtype=np.float64), type=pa.float64()))
    return out


def build_feature_table(
    source: str | Path | Source,
    table: str | Path,
    definitions: Sequence[Definition],
    *,
    timestamp: str,
    label: str | None = None,
    id_column: str | None = None,
    expected_schema: Mapping[str, str] | None = None,
    full: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> BuildResult:
    """Materialise features of ``source`` into the folder ``table`` (Parquet parts + ``_lineage.json``).

    ``source`` is a path (CSV, Parquet file or glob, see :func:`keel.data.sources.open_source`) or a
    :class:`~keel.data.sources.Source`.

    Out-of-core: the source is streamed in event-time order (ties in file order; DuckDB sorts and spills to a
    temporary folder in ``table`` when it is larger than memory) in chunks of ``chunk_rows``, each computed
    with the trailing rows of the previous one its windows reach (:func:`keel.features.chunked.chunked_features`),
    and written to the part's temporary file as it comes. Memory is about ``chunk_rows`` plus the rows of one
    horizon (longest window + delay); the result equals the one-chunk build. Each chunk recomputes its carry,
    so a ``chunk_rows`` well above one horizon's rows keeps that overhead small (the flagship's 37 days are
    ~355,000 rows: 250,000-row chunks cost 1.6x the CPU of one chunk).

    Incremental and idempotent: when the definitions and the already-covered source rows are unchanged, only
    rows newer than the covered max event time are computed, with the history the longest window + delay
    needs as warm-up, and appended as a new part; with nothing new it writes nothing. A changed definition or
    changed covered rows (or ``full``) rebuild everything. The schema is checked before any write; the part is
    renamed into place only when complete and the lineage is written last, so an interrupted build leaves the
    previous table (or no table) intact and no visible file behind.

    Example::

        build_feature_table("events.parquet", ".keel/features", defs, timestamp="ts", label="y",
                            id_column="id", chunk_rows=500_000)
    """
    if chunk_rows < 1:
        raise FeatureError(f"chunk_rows must be a positive number of rows. Got {chunk_rows} instead.")
    defs = list(definitions)
    table = Path(table)
    src = _as_source(source)
    schema = src.schema()
    validate_schema(
        defs, schema, timestamp=timestamp, label=label, expected=expected_schema, source=src.describe()
    )
    needed = required_columns(defs, timestamp=timestamp, label=label)
    columns = list(dict.fromkeys([c for c in [id_column, *needed, timestamp] if c]))
    if (
        label
        and label in schema
        and label not in columns
        and any(isinstance(d, WindowDefinition) and d.reads_label for d in defs)
    ):
        columns.append(label)
    missing = [c for c in columns if c not in schema]
    if missing:
        raise DataError(
            f"Column {missing[0]!r} (the id column) is missing from {src.describe()}, which has: {', '.join(schema)}.",
            hint="Fix data.id_column in keel.toml, or add the column to the data.",
        )
    digest = definitions_hash(defs)
    lineage = None if full else read_lineage(table)
    reason = "full rebuild requested" if full else "no table yet"
    if lineage is not None:
        if lineage.get("definitions_hash") != digest:
            reason, lineage = "feature definitions changed", None
        elif lineage.get("columns") != columns:
            reason, lineage = "source columns changed", None
        else:
            covered = source_fingerprint(src, columns, timestamp=timestamp, until=lineage["max_event_time"])
            if covered != lineage.get("source"):
                reason, lineage = "source rows already covered have changed", None

    horizon = max((to_ns(d.horizon) for d in window_definitions(defs)), default=0)
    ts = quote_identifier(timestamp)
    history: pd.DataFrame | None = None
    where: str | None = None
    parts: list[str] = []
    full_rebuild = lineage is None
    if lineage is not None:
        max_time = pd.Timestamp(lineage["max_event_time"])
        where = f"{ts} > {_time_literal(max_time)}"
        with src.connect() as con:
            fresh = int((con.execute(f"select count(*) from source where {where}").fetchone() or (0,))[0])
        if not fresh:
            return BuildResult(table, 0, int(lineage["rows"]), False, lineage["max_event_time"], "up to date")
        reason = "new events past the covered max event time"
        parts = list(_iter_parts(lineage))
        if horizon > 0:
            low = max_time - pd.Timedelta(horizon, unit="ns")
            history = read_time_ordered(
                src, columns, timestamp=timestamp, where=f"{ts} > {_time_literal(low)} and not ({where})"
            )

    keys = list(dict.fromkeys(c for c in [id_column, *entities(defs), timestamp] if c))
    names = feature_names(defs)
    created = not table.exists()
    table.mkdir(parents=True, exist_ok=True)
    _sweep_litter(table)
    written = _Progress()

    def compute(frame: pd.DataFrame, first_row: int) -> pd.DataFrame:
        return compute_features(
            frame, defs, timestamp=timestamp, label=label, id_column=id_column, first_row=first_row
        )

    def write(tmp: str) -> None:
        spill = tempfile.mkdtemp(prefix=".spill.", suffix=".tmp", dir=table)
        writer: pq.ParquetWriter | None = None
        try:
            batches = time_ordered_batches(
                src, columns, timestamp=timestamp, batch_rows=chunk_rows, where=where, spill=spill
            )
            stream = chunked_features(
                rechunk(batches, chunk_rows), compute, timestamp=timestamp, horizon_ns=horizon, history=history,
                skips_history=True,
            )
            for chunk, features in stream:
                out = _output_table(chunk, features, keys, names)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, out.schema, compression="snappy")
                writer.write_table(out.cast(writer.schema))
                latest = pd.to_datetime(features[timestamp]).max()
                written.rows += len(out)
                written.chunks += 1
                written.max_time = latest if written.max_time is None else max(written.max_time, latest)
            if writer is None:  # an empty source: an empty part with the right columns
                empty = pa.Table.from_batches([], empty_schema(src, keys))
                for name in names:
                    empty = empty.append_column(name, pa.array([], type=pa.float64()))
                writer = pq.ParquetWriter(tmp, empty.schema, compression="snappy")
                writer.write_table(empty)
        finally:
            if writer is not None:
                writer.close()
            shutil.rmtree(spill, ignore_errors=True)

    # A name no lineage lists yet: a rebuild killed before its lineage is written leaves the old table whole.
    part = f"part-{len(parts):05d}-{uuid.uuid4().hex[:8]}.parquet"
    try:
        _write_atomic(table / part, write)
    except BaseException:
        if created:  # a first build that failed leaves no folder behind either
            with contextlib.suppress(OSError):
                table.rmdir()
        raise
    parts.append(part)
    rows_added = written.rows
    if written.max_time is not None:
        max_event: str | None = str(written.max_time)
    else:
        max_event = None if full_rebuild else lineage["max_event_time"]  # type: ignore[index]
    total = (0 if full_rebuild else int(lineage["rows"])) + rows_added  # type: ignore[index]
    record = {
        "definitions_hash": digest,
        "feature_names": names,
        "columns": columns,
        "source_path": src.path,
        "source": source_fingerprint(src, columns, timestamp=timestamp, until=max_event),
        "max_event_time": max_event,
        "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": total,
        "parts": parts,
    }
    _write_atomic(table / LINEAGE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    for stale in table.glob("part-*.parquet"):
        if stale.name not in parts:
            stale.unlink()
    return BuildResult(table, rows_added, total, full_rebuild, max_event, reason, written.chunks)


def feature_status(
    source: str | Path | Source,
    table: str | Path,
    definitions: Sequence[Definition],
    *,
    timestamp: str,
    label: str | None = None,
    id_column: str | None = None,
) -> FeatureStatus:
    """Say whether the feature table is stale: definitions changed, covered source rows changed, or new data."""
    defs = list(definitions)
    table = Path(table)
    src = _as_source(source)
    lineage = read_lineage(table)
    if lineage is None:
        return FeatureStatus(table, False, True, ("no feature table yet",), 0, None, None, 0)
    reasons: list[str] = []
    if lineage.get("definitions_hash") != definitions_hash(defs):
        reasons.append("feature definitions changed since the table was built")
    columns = lineage.get("columns", [])
    covered = source_fingerprint(src, columns, timestamp=timestamp, until=lineage["max_event_time"])
    if covered != lineage.get("source"):
        reasons.append("source rows the table covers have changed (or the source moved)")
    everything = source_fingerprint(src, columns[:1] or [timestamp], timestamp=timestamp)
    new_rows = everything["rows"] - covered["rows"]
    if new_rows > 0:
        reasons.append(f"{new_rows} new events past {lineage['max_event_time']}")
    return FeatureStatus(
        table,
        True,
        bool(reasons),
        tuple(reasons),
        int(lineage.get("rows", 0)),
        lineage.get("max_event_time"),
        lineage.get("computed_at"),
        max(new_rows, 0),
    )


def _spec_args(spec: Any) -> tuple[list[Definition], dict[str, Any]]:
    from keel.features.definitions import resolve_definitions

    if not spec.data.timestamp:
        raise FeatureError("keel features build needs data.timestamp (window features are point-in-time).")
    defs = resolve_definitions(spec.features, spec.data)
    kwargs = {"timestamp": spec.data.timestamp, "label": spec.data.label, "id_column": spec.data.id_column}
    return defs, kwargs


def default_table_path(spec: Any) -> Path:
    """Where a spec's feature table lives: ``<state_dir>/features``."""
    return Path(spec.store_path("features"))


def build_features(
    spec: Any, *, table: str | Path | None = None, full: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> BuildResult:
    """``keel features build``: materialise the spec's features from ``data.source`` (incremental, out-of-core).

    ``chunk_rows`` bounds memory (rows per chunk, plus one horizon of history); any value gives the same table.
    """
    defs, kwargs = _spec_args(spec)
    return build_feature_table(
        _as_source(spec),
        table if table is not None else default_table_path(spec),
        defs,
        expected_schema=spec.data.schema_,
        full=full,
        chunk_rows=chunk_rows,
        **kwargs,
    )


def features_status(spec: Any, *, table: str | Path | None = None) -> FeatureStatus:
    """``keel features status``: what is stale in the spec's feature table."""
    defs, kwargs = _spec_args(spec)
    return feature_status(
        _as_source(spec),
        table if table is not None else default_table_path(spec),
        defs,
        **kwargs,
    )


__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "BuildResult",
    "FeatureStatus",
    "build_feature_table",
    "build_features",
    "compute_features",
    "compute_features_spark",
    "default_table_path",
    "feature_status",
    "features_status",
    "finish_aggregate",
    "read_feature_table",
    "read_lineage",
    "row_feature",
    "row_value",
    "source_fingerprint",
    "to_ns",
    "window_edges",
]


# --- Spark backfill ---------------------------------------------------------------------------------------
def compute_features_spark(
    spark_df: Any,
    definitions: Sequence[Definition],
    *,
    timestamp: str,
    id_column: str,
    label: str | None = None,
) -> Any:
    """The same features on a Spark DataFrame: one grouped-map per entity running :func:`compute_features`.

    Every group (one entity value, all its events) is computed by the very code the local path uses, so the
    numbers are the same; the per-entity results are joined back on ``id_column``. Spark does not keep input
    order inside a group, so same-timestamp ties are ordered by ``id_column`` (the local path's input order when
    ids ascend with arrival, as in the flagship data). Returns a Spark DataFrame: ``id_column`` + features.
    """
    from pyspark.sql import types as T

    defs = list(definitions)
    validate_schema(
        defs,
        {f.name: f.dataType.simpleString() for f in spark_df.schema.fields},
        timestamp=timestamp,
        label=label,
    )
    windows = window_definitions(defs)
    row_defs: list[Definition] = [d for d in defs if isinstance(d, RawDefinition | RowDefinition)]
    needed = list(dict.fromkeys([id_column, *required_columns(defs, timestamp=timestamp, label=label)]))
    base = spark_df.select(*needed)

    def schema_for(names: list[str]) -> Any:
        id_type = spark_df.schema[id_column].dataType
        return T.StructType(
            [T.StructField(id_column, id_type, False)]
            + [T.StructField(n, T.DoubleType(), True) for n in names]
        )

    def runner(block: list[Definition]) -> Any:
        names = [d.name for d in block]

        def run(pdf: pd.DataFrame) -> pd.DataFrame:
            pdf = pdf.sort_values([timestamp, id_column], kind="stable") if timestamp in pdf else pdf
            out = compute_features(pdf, block, timestamp=timestamp, label=label, id_column=id_column)
            return out[[id_column, *names]]

        return run, schema_for(names)

    result = None
    if row_defs:
        run, schema = runner(row_defs)
        result = base.mapInPandas(lambda it, run=run: (run(pdf) for pdf in it), schema)
    for entity in entities(defs):
        block: list[Definition] = [d for d in windows if d.entity == entity]
        run, schema = runner(block)
        part = base.groupBy(entity).applyInPandas(run, schema)
        result = part if result is None else result.join(part, on=id_column, how="inner")
    ratios = [d for d in defs if isinstance(d, RatioDefinition)]
    if result is None:
        result = base.select(id_column)
    if ratios:
        from pyspark.sql import functions as F

        for d in ratios:
            den = F.col(d.denominator)
            result = result.withColumn(d.name, F.when(den != 0, F.col(d.numerator) / den))
    return result.select(id_column, *feature_names(defs))
