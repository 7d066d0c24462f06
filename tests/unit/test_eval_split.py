"""Time splits with a label-delay gap, prequential folds, random split, known-positive removal."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from keel.errors import TrainingError
from keel.evaluate.split import (
    known_positive_mask,
    prequential_split,
    random_split,
    split_from_spec,
    time_split,
)
from keel.spec import Split

WEEK = timedelta(days=7)
DAY = timedelta(days=1)


def _hourly(days: int = 120, start: str = "2018-04-01") -> pd.Series:
    return pd.Series(pd.date_range(start, periods=days * 24, freq="h"))


def test_windows_are_separated_by_the_gap_and_ordered():
    t = _hourly()
    s = time_split(t, train=WEEK, validation=WEEK, test=WEEK, gap=WEEK, test_start=datetime(2018, 7, 1))
    w = s.windows
    assert w["test"].start == datetime(2018, 7, 1) and w["test"].end == datetime(2018, 7, 8)
    assert w["validation"].end == datetime(2018, 6, 24) and w["validation"].start == datetime(2018, 6, 17)
    assert w["train"].end == datetime(2018, 6, 10) and w["train"].start == datetime(2018, 6, 3)
    assert w["refit"].start == datetime(2018, 6, 17) and w["refit"].end == datetime(2018, 6, 24)
    # No training row is closer than the gap to a validation row, and the masks are disjoint.
    assert t[s.train].max() + WEEK < t[s.validation].min()
    assert t[s.validation].max() + WEEK < t[s.test].min()
    assert not (s.train & s.validation).any() and not (s.validation & s.test).any()
    assert s.train.sum() == s.validation.sum() == s.test.sum() == 7 * 24


def test_train_none_uses_all_history_and_default_end_is_next_midnight():
    t = _hourly(60)
    s = time_split(t, validation=WEEK, test=WEEK, gap=DAY)
    assert s.windows["test"].end == datetime(2018, 5, 31)  # last event 2018-05-30 23:00
    assert s.train[0] and s.windows["train"].start == datetime(2018, 4, 1)
    assert s.test.sum() == 7 * 24


def test_test_end_anchors_the_test_window():
    t = _hourly()
    s = time_split(t, validation=WEEK, test=WEEK, gap=WEEK, test_end=datetime(2018, 7, 8))
    assert s.windows["test"].start == datetime(2018, 7, 1)


def test_gap_shorter_than_label_delay_is_refused():
    with pytest.raises(TrainingError, match="shorter than the label delay"):
        time_split(_hourly(), validation=WEEK, test=WEEK, gap=DAY, label_delay=WEEK)


def test_gap_defaults_to_label_delay():
    s = time_split(_hourly(), validation=WEEK, test=WEEK, label_delay=timedelta(days=3),
                   test_start=datetime(2018, 7, 1))
    assert s.gap == timedelta(days=3)
    assert s.windows["validation"].end == datetime(2018, 6, 28)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_start": datetime(2019, 1, 1)}, "holds no rows"),
        ({"test_start": datetime(2018, 4, 5)}, "holds no rows"),
        ({"validation": timedelta(0)}, "longer than 0"),
    ],
)
def test_impossible_windows_raise(kwargs, match):
    args = {"validation": WEEK, "test": WEEK, "gap": WEEK, **kwargs}
    with pytest.raises(TrainingError, match=match):
        time_split(_hourly(), **args)


def test_missing_times_raise():
    t = _hourly(30).astype(object)
    t[3] = None
    with pytest.raises(TrainingError, match="missing values"):
        time_split(t, validation=WEEK, test=WEEK)


def test_prequential_reproduces_the_handbook_dates():
    t = _hourly(183)
    p = prequential_split(t, train=WEEK, validation=WEEK, test=WEEK, gap=WEEK, folds=4, fold_step=WEEK,
                          test_start=datetime(2018, 8, 8))
    assert [f.train_window.start.strftime("%m-%d") for f in p.validation] == ["07-11", "07-04", "06-27", "06-20"]
    assert [f.train_window.start.strftime("%m-%d") for f in p.test] == ["08-15", "08-08", "08-01", "07-25"]
    assert [f.assess_window.start.strftime("%m-%d") for f in p.test] == ["08-29", "08-22", "08-15", "08-08"]
    # The latest validation block ends a gap before the first test block.
    assert p.validation[0].assess_window.end + WEEK == p.test[-1].assess_window.start
    same = prequential_split(t, train=WEEK, validation=WEEK, test=WEEK, gap=WEEK, folds=4, fold_step=WEEK,
                             test_end=datetime(2018, 9, 5))
    assert [f.train_window.start for f in same.test] == [f.train_window.start for f in p.test]


def test_known_positives_follow_the_delay_rule():
    day = pd.Timestamp("2018-01-01")
    times = pd.Series([
        day,                           # card A fraud on train day 0
        day + timedelta(days=2, hours=5),   # card B fraud, day 2 (+7d: known from day 9 05:00)
        day + timedelta(days=10),      # A on day 10 -> removed (known since train)
        day + timedelta(days=9, hours=1),  # B on day 9 -> kept (period starts at 00:00, B known 05:00)
        day + timedelta(days=10, hours=1),  # B on day 10 -> removed
        day + timedelta(days=10, hours=2),  # C, never fraud -> kept
    ])
    y = np.array([1, 1, 0, 0, 1, 0])
    ent = np.array(["A", "B", "A", "B", "B", "C"])
    assess = np.array([False, False, True, True, True, True])
    m = known_positive_mask(times, y, ent, assess, known_from=day, assess_start=day + timedelta(days=9),
                            label_delay=WEEK)
    assert m.tolist() == [False, False, True, False, True, False]
    later = known_positive_mask(times, y, ent, assess, known_from=day + DAY,
                                assess_start=day + timedelta(days=9), label_delay=WEEK)
    assert not later[2]  # A's fraud predates known_from


def test_exclude_known_positives_needs_labels_and_entity():
    with pytest.raises(TrainingError, match="entity"):
        time_split(_hourly(), validation=WEEK, test=WEEK, exclude_known_positives=True)


def test_random_split_is_stratified_flagged_and_seeded():
    y = np.r_[np.ones(100), np.zeros(900)].astype(int)
    a = random_split(y, test_fraction=0.2, validation_fraction=0.2, seed=1)
    b = random_split(y, test_fraction=0.2, validation_fraction=0.2, seed=1)
    assert a.strategy == "random" and "Random split" in (a.warning or "")
    assert (a.test == b.test).all()
    assert y[a.test].sum() == 20 and a.test.sum() == 200 and y[a.validation].sum() == 20
    assert not (a.train & a.test).any() and (a.train | a.validation | a.test).all()
    with pytest.raises(TrainingError, match="below 1"):
        random_split(y, test_fraction=0.6, validation_fraction=0.5)


def test_split_from_spec_dispatches():
    t = _hourly(183)
    spec = Split(train="7d", validation="7d", test="7d", protocol="prequential", test_start=datetime(2018, 8, 8))
    p = split_from_spec(spec, times=t, label_delay=WEEK)
    assert len(p.test) == 4 and p.gap == WEEK
    r = split_from_spec(Split(strategy="random"), y=np.r_[np.ones(10), np.zeros(40)])
    assert r.strategy == "random"
    with pytest.raises(TrainingError, match="no event times"):
        split_from_spec(Split(), y=np.ones(5))


@pytest.mark.reference
def test_handbook_baseline_split_counts(reference_dir):
    d = pd.read_parquet(reference_dir / "simulated_raw_2018-04-01_2018-09-30.parquet",
                        columns=["TX_DATETIME", "CUSTOMER_ID", "TX_FRAUD"])
    s = time_split(d.TX_DATETIME, train=WEEK, validation=WEEK, test=WEEK, gap=WEEK, label_delay=WEEK,
                   test_start=datetime(2018, 8, 8), y=d.TX_FRAUD, entity=d.CUSTOMER_ID,
                   exclude_known_positives=True)
    assert s.windows["refit"].label() == "2018-07-25..2018-07-31"
    assert (s.windows["refit"].rows, s.windows["refit"].positives) == (67_240, 598)
    assert s.windows["test"].label() == "2018-08-08..2018-08-14"
    assert (s.windows["test"].rows, s.windows["test"].positives) == (58_264, 385)
