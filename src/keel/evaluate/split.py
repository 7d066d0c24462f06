"""Splits that respect time: train / validation / test by event time with a label-delay gap.

A training row is usable only once its label would have been known, so consecutive windows are separated
by a gap of at least the label delay. Every window is half-open ``[start, end)``.

Single protocol, anchored at the test window (``test_start``, else ``test_end``, else the last event)::

    [ train ][ gap ][ validation ][ gap ][ test ]
                     [  refit (train length)  ]            refit ends where the test gap begins

``train``/``validation``/``test`` are the calibration-consistent three-way split (fit on train; select,
calibrate and threshold on validation; report on test). ``refit`` is the most recent training window before
the test gap (the handbook's baseline training set, e.g. train 2018-07-25..07-31, test 2018-08-08..08-14).

Prequential protocol (handbook ch. 5): ``folds`` blocks shifted by ``fold_step``. Test block *i* (0 = most
recent) starts at ``first_test_start + (folds-1-i) * fold_step`` and trains on the ``train`` window ending a
gap before it; validation blocks are the same construction shifted so the most recent validation block ends
a gap before the first test block. With train = validation = test = gap = fold_step = 7d, 4 folds and
``test_start = 2018-08-08`` this gives validation training starts 07-11, 07-04, 06-27, 06-20 and test
training starts 08-15, 08-08, 08-01, 07-25 (equivalently ``test_end = 2018-09-05``).

Example::

    s = time_split(df.tx_datetime, train=timedelta(days=7), validation=timedelta(days=7),
                   test=timedelta(days=7), gap=timedelta(days=7), test_start=datetime(2018, 8, 8),
                   y=df.tx_fraud, entity=df.customer_id, exclude_known_positives=True)
    X_train, X_valid, X_test = X[s.train], X[s.validation], X[s.test]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from keel.errors import TrainingError

if TYPE_CHECKING:
    from keel.spec import Split

_DAY_NS = 86_400 * 10**9


@dataclass(frozen=True)
class Window:
    """A half-open time window ``[start, end)`` and how many rows (and positives) fell in it."""

    start: datetime | None
    end: datetime | None
    rows: int
    positives: int | None = None

    def label(self) -> str:
        """``2018-07-25..2018-07-31`` (inclusive last day when day-aligned) for reports."""
        if self.start is None or self.end is None:
            return "(random)"
        last = self.end - timedelta(microseconds=1)
        if self.start.time() == datetime.min.time() and self.end.time() == datetime.min.time():
            return f"{self.start:%Y-%m-%d}..{last:%Y-%m-%d}"
        return f"{self.start:%Y-%m-%d %H:%M}..{self.end:%Y-%m-%d %H:%M} (end excluded)"


@dataclass(frozen=True)
class Fold:
    """One train/assess pair: boolean masks over the input rows plus the windows (for the report)."""

    train: np.ndarray
    assess: np.ndarray
    train_window: Window
    assess_window: Window
    removed_known_positives: int = 0

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(self.train)

    @property
    def assess_index(self) -> np.ndarray:
        return np.flatnonzero(self.assess)


@dataclass(frozen=True)
class TimeSplit:
    """A single split. Masks are boolean arrays of the input length; ``windows`` holds the date ranges.

    ``strategy == 'random'`` means the rows were shuffled (no time column): ``warning`` says why the
    report must flag it.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    refit: np.ndarray
    windows: dict[str, Window]
    gap: timedelta | None
    strategy: Literal["time", "random"] = "time"
    removed_known_positives: dict[str, int] = field(default_factory=dict)
    warning: str | None = None


@dataclass(frozen=True)
class PrequentialSplit:
    """Rolling evaluation: ``validation[i]`` and ``test[i]`` are folds, index 0 the most recent."""

    validation: list[Fold]
    test: list[Fold]
    gap: timedelta


# --- helpers ------------------------------------------------------------------------------------------


def _ns(times: Any) -> np.ndarray:
    """Event times as int64 nanoseconds (naive UTC); raise on nulls."""
    try:
        ts = pd.to_datetime(pd.Series(np.asarray(times) if not isinstance(times, pd.Series) else times))
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"The event times cannot be read as timestamps: {exc}.") from None
    if ts.dt.tz is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    if ts.isna().any():
        raise TrainingError(
            f"The event time column has {int(ts.isna().sum())} missing values; a time split needs every"
            " row's event time. Drop or fill those rows first."
        )
    return ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _to_ns(value: datetime | np.datetime64 | pd.Timestamp) -> int:
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return int(ts.value)


def _td_ns(value: timedelta) -> int:
    return int(pd.Timedelta(value).value)


def _dt(ns: int) -> datetime:
    return pd.Timestamp(ns).to_pydatetime()


def _labels(y: Any, n: int) -> np.ndarray | None:
    if y is None:
        return None
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise TrainingError(f"The label array has shape {arr.shape} but there are {n} event times.")
    return arr.astype(bool)


def _window(t: np.ndarray, start: int, end: int, y: np.ndarray | None) -> tuple[np.ndarray, Window]:
    mask = (t >= start) & (t < end)
    pos = None if y is None else int(y[mask].sum())
    return mask, Window(_dt(start), _dt(end), int(mask.sum()), pos)


def _default_end(t: np.ndarray, durations: list[timedelta]) -> int:
    last = int(t.max())
    if all(_td_ns(d) % _DAY_NS == 0 for d in durations):
        return (last // _DAY_NS + 1) * _DAY_NS  # the next midnight after the last event
    return last + 1


def _check_positive(name: str, value: timedelta | None) -> None:
    if value is not None and value <= timedelta(0):
        raise TrainingError(f"The split '{name}' window must be longer than 0. Got {value} instead.")


def _gap(gap: timedelta | None, label_delay: timedelta | None) -> timedelta:
    if gap is None:
        gap = label_delay if label_delay is not None else timedelta(0)
    if gap < timedelta(0):
        raise TrainingError(f"The split 'gap' must not be negative. Got {gap} instead.")
    if label_delay is not None and gap < label_delay:
        raise TrainingError(
            f"The split 'gap' ({gap}) is shorter than the label delay ({label_delay}): the last training rows"
            " would use labels not yet known when the next window starts. Set split.gap >= data.label_delay."
        )
    return gap


def known_positive_mask(
    times: Any,
    y: Any,
    entity: Any,
    assess: np.ndarray,
    *,
    known_from: datetime | None,
    assess_start: datetime,
    label_delay: timedelta,
    per: timedelta = timedelta(days=1),
) -> np.ndarray:
    """Rows of ``assess`` whose entity was already known positive when their period began.

    Periods are ``per``-long blocks from ``assess_start``. A positive row at time ``t`` (with
    ``t >= known_from``) is known from ``t + label_delay``; a row in the period starting at ``p`` is
    removed when its entity has a positive with ``t + label_delay < p``. With a 7-day delay and daily
    periods this is the handbook's rule: cards with frauds in training, plus, for each test day, the
    cards with frauds up to delay+1 days earlier. Returns a boolean mask of the input length.
    """
    t = _ns(times)
    yb = _labels(y, len(t))
    ent = pd.Series(np.asarray(entity))
    if len(ent) != len(t) or assess.shape != t.shape:
        raise TrainingError("times, y, entity and the assess mask must have the same length.")
    assert yb is not None
    lo = _to_ns(known_from) if known_from is not None else np.iinfo(np.int64).min
    pos = yb & (t >= lo)
    first_pos = pd.Series(t[pos]).groupby(ent[pos].to_numpy()).min()
    known_at = ent.map(first_pos).to_numpy(dtype=float)  # NaN: never positive
    start, step = _to_ns(assess_start), _td_ns(per)
    period_start = start + ((t - start) // step) * step
    delay = _td_ns(label_delay)
    with np.errstate(invalid="ignore"):
        removed = assess & ~np.isnan(known_at) & (known_at + delay < period_start)
    return removed


def _fold(
    t: np.ndarray,
    yb: np.ndarray | None,
    entity: Any,
    *,
    assess_start: int,
    assess_len: int,
    train_len: int | None,
    gap: int,
    label_delay: timedelta,
    exclude_known_positives: bool,
    per: timedelta,
) -> Fold:
    train_end = assess_start - gap
    train_start = train_end - train_len if train_len is not None else int(t.min())
    train, tw = _window(t, train_start, train_end, yb)
    assess, aw = _window(t, assess_start, assess_start + assess_len, yb)
    removed = 0
    if exclude_known_positives:
        if yb is None or entity is None:
            raise TrainingError(
                "exclude_known_positives needs the labels and an entity column (e.g. the card id).",
                hint="Pass y= and entity=, or set split.exclude_known_positives = false.",
            )
        drop = known_positive_mask(
            t.view("datetime64[ns]"), yb, entity, assess, known_from=_dt(train_start),
            assess_start=_dt(assess_start), label_delay=label_delay, per=per,
        )
        removed = int(drop.sum())
        assess = assess & ~drop
        aw = Window(aw.start, aw.end, int(assess.sum()), None if yb is None else int(yb[assess].sum()))
    if tw.rows == 0:
        raise TrainingError(f"The training window {tw.label()} holds no rows; move the split or add history.")
    if aw.rows == 0:
        raise TrainingError(f"The window {aw.label()} holds no rows; check split.test_start/test_end.")
    return Fold(train, assess, tw, aw, removed)


# --- public API ---------------------------------------------------------------------------------------


def time_split(
    times: Any,
    *,
    validation: timedelta,
    test: timedelta,
    train: timedelta | None = None,
    gap: timedelta | None = None,
    label_delay: timedelta | None = None,
    test_start: datetime | None = None,
    test_end: datetime | None = None,
    y: Any = None,
    entity: Any = None,
    exclude_known_positives: bool = False,
    per: timedelta = timedelta(days=1),
) -> TimeSplit:
    """Split rows by event time into train / validation / test with a gap between windows.

    Args:
        times: event times, shape (n,) (datetime64, pandas Series or strings).
        validation, test: window lengths; train: length, or None for all history before.
        gap: between windows; default ``label_delay`` (must be >= it when both are given).
        test_start / test_end: anchor of the test window (start wins); default: the last event, rounded
            up to the next midnight when every duration is whole days.
        y, entity: labels and entity keys, shape (n,); needed for ``exclude_known_positives``, which
            drops validation/test rows whose entity was already known positive (see
            :func:`known_positive_mask`; known from the start of that window's training data).
        per: period for known-positive bookkeeping (a day in the handbook).

    Returns:
        :class:`TimeSplit` with boolean masks of shape (n,) and ``windows`` ('train', 'validation',
        'test', 'refit') for the report. Raises :class:`TrainingError` on an empty window.
    """
    for name, value in (("train", train), ("validation", validation), ("test", test)):
        _check_positive(name, value)
    g = _gap(gap, label_delay)
    delay = label_delay if label_delay is not None else g
    t = _ns(times)
    if len(t) == 0:
        raise TrainingError("A time split needs rows; the table is empty.")
    yb = _labels(y, len(t))
    durations = [d for d in (train, validation, test, g) if d is not None]
    if test_start is not None:
        ts = _to_ns(test_start)
    else:
        end = _to_ns(test_end) if test_end is not None else _default_end(t, durations)
        ts = end - _td_ns(test)
    common: dict[str, Any] = {
        "gap": _td_ns(g), "label_delay": delay, "exclude_known_positives": exclude_known_positives,
        "per": per,
    }
    train_len = _td_ns(train) if train is not None else None
    tfold = _fold(t, yb, entity, assess_start=ts, assess_len=_td_ns(test), train_len=train_len, **common)
    vstart = ts - _td_ns(g) - _td_ns(validation)
    vfold = _fold(t, yb, entity, assess_start=vstart, assess_len=_td_ns(validation), train_len=train_len, **common)
    return TimeSplit(
        train=vfold.train,
        validation=vfold.assess,
        test=tfold.assess,
        refit=tfold.train,
        windows={
            "train": vfold.train_window,
            "validation": vfold.assess_window,
            "test": tfold.assess_window,
            "refit": tfold.train_window,
        },
        gap=g,
        removed_known_positives={
            "validation": vfold.removed_known_positives, "test": tfold.removed_known_positives,
        },
    )


def prequential_split(
    times: Any,
    *,
    validation: timedelta,
    test: timedelta,
    train: timedelta | None = None,
    gap: timedelta | None = None,
    label_delay: timedelta | None = None,
    folds: int = 4,
    fold_step: timedelta = timedelta(days=7),
    test_start: datetime | None = None,
    test_end: datetime | None = None,
    y: Any = None,
    entity: Any = None,
    exclude_known_positives: bool = False,
    per: timedelta = timedelta(days=1),
) -> PrequentialSplit:
    """Rolling (prequential) folds for model selection (validation) and assessment (test).

    ``test_start`` is the start of the earliest test block (``test_end`` the end of the latest); fold 0
    is the most recent. Each fold trains on the ``train`` window (None: all history) ending ``gap``
    before its block. The most recent validation block ends ``gap`` before the earliest test block, so
    no validation block sees test data. Parameters otherwise as :func:`time_split`.

    Example (handbook ch. 5)::

        p = prequential_split(times, train=WEEK, validation=WEEK, test=WEEK, gap=WEEK, folds=4,
                              fold_step=WEEK, test_start=datetime(2018, 8, 8))
        [f.train_window.start for f in p.test]  # 08-15, 08-08, 08-01, 07-25
    """
    if folds < 1:
        raise TrainingError(f"The split 'folds' value must be at least 1. Got {folds} instead.")
    for name, value in (("train", train), ("validation", validation), ("test", test), ("fold_step", fold_step)):
        _check_positive(name, value)
    g = _gap(gap, label_delay)
    delay = label_delay if label_delay is not None else g
    t = _ns(times)
    if len(t) == 0:
        raise TrainingError("A time split needs rows; the table is empty.")
    yb = _labels(y, len(t))
    step = _td_ns(fold_step)
    if test_start is not None:
        first = _to_ns(test_start)
    else:
        durations = [d for d in (train, validation, test, g, fold_step) if d is not None]
        end = _to_ns(test_end) if test_end is not None else _default_end(t, durations)
        first = end - _td_ns(test) - (folds - 1) * step
    train_len = _td_ns(train) if train is not None else None
    common: dict[str, Any] = {
        "gap": _td_ns(g), "label_delay": delay, "exclude_known_positives": exclude_known_positives,
        "per": per, "train_len": train_len,
    }
    test_folds = [
        _fold(t, yb, entity, assess_start=first + (folds - 1 - i) * step, assess_len=_td_ns(test), **common)
        for i in range(folds)
    ]
    vlatest = first - _td_ns(g) - _td_ns(validation)
    valid_folds = [
        _fold(t, yb, entity, assess_start=vlatest - i * step, assess_len=_td_ns(validation), **common)
        for i in range(folds)
    ]
    return PrequentialSplit(validation=valid_folds, test=test_folds, gap=g)


RANDOM_SPLIT_WARNING = (
    "Random split: the table has no event time, so rows were shuffled into train/validation/test."
    " Scores are optimistic whenever rows are related in time or by entity; this is not how the model"
    " will meet new data."
)


def random_split(
    y: Any,
    *,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.2,
    seed: int = 42,
) -> TimeSplit:
    """Stratified random train / validation / test split, only for tables without an event time.

    Fractions are of all rows; each class is shuffled with ``seed`` and cut in the same proportions, so
    positives spread evenly. ``strategy='random'`` and ``warning`` tell the report to say so loudly;
    ``refit`` is train + validation.
    """
    arr = np.asarray(y)
    n = len(arr)
    if not (0 < test_fraction < 1 and 0 < validation_fraction < 1 and test_fraction + validation_fraction < 1):
        raise TrainingError(
            f"test_fraction + validation_fraction must be below 1 and each above 0. Got {test_fraction}"
            f" and {validation_fraction} instead."
        )
    rng = np.random.default_rng(seed)
    part = np.zeros(n, dtype=np.int8)  # 0 train, 1 validation, 2 test
    for value in pd.unique(arr):
        idx = np.flatnonzero(arr == value)
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * validation_fraction)
        part[idx[:n_test]] = 2
        part[idx[n_test : n_test + n_val]] = 1
    masks = [part == k for k in range(3)]
    yb = arr.astype(bool) if arr.dtype != object else None
    for name, m in zip(("train", "validation", "test"), masks, strict=True):
        if not m.any():
            raise TrainingError(f"The random split left the {name} set empty ({n} rows); add rows.")

    def w(m: np.ndarray) -> Window:
        return Window(None, None, int(m.sum()), None if yb is None else int(yb[m].sum()))

    return TimeSplit(
        train=masks[0], validation=masks[1], test=masks[2], refit=masks[0] | masks[1],
        windows={"train": w(masks[0]), "validation": w(masks[1]), "test": w(masks[2]),
                 "refit": w(masks[0] | masks[1])},
        gap=None, strategy="random", warning=RANDOM_SPLIT_WARNING,
    )


def split_from_spec(
    split: Split,
    *,
    times: Any = None,
    y: Any = None,
    entity: Any = None,
    label_delay: timedelta = timedelta(0),
    per: timedelta = timedelta(days=1),
    seed: int = 42,
) -> TimeSplit | PrequentialSplit:
    """Apply a ``keel.spec.Split`` section (``label_delay`` from ``spec.data``; gap defaults to it)."""
    if split.strategy == "random" or times is None:
        if split.strategy == "time":
            raise TrainingError("split.strategy is 'time' but no event times were given.")
        return random_split(
            y, test_fraction=split.test_fraction, validation_fraction=split.validation_fraction,
            seed=seed,
        )
    kwargs: dict[str, Any] = {
        "validation": split.validation, "test": split.test, "train": split.train, "gap": split.gap,
        "label_delay": label_delay, "test_start": split.test_start, "test_end": split.test_end, "y": y,
        "entity": entity, "exclude_known_positives": split.exclude_known_positives, "per": per,
    }
    if split.protocol == "prequential":
        return prequential_split(times, folds=split.folds, fold_step=split.fold_step, **kwargs)
    return time_split(times, **kwargs)


__all__ = [
    "RANDOM_SPLIT_WARNING",
    "Fold",
    "PrequentialSplit",
    "TimeSplit",
    "Window",
    "known_positive_mask",
    "prequential_split",
    "random_split",
    "split_from_spec",
    "time_split",
]
