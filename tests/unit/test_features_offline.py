"""Offline features: hand-checked window semantics, a brute-force oracle (hypothesis), and no future leakage."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel.errors import FeatureError
from keel.features.definitions import WindowDefinition, feature_names, resolve_definitions
from keel.features.offline import compute_features
from keel.spec import Data, Features

BASE = pd.Timestamp("2024-03-01 00:00:00")
FEATURES = Features.model_validate(
    {
        "raw": ["amount"],
        "row": [
            {"name": "weekend", "kind": "is_weekend", "column": "ts"},
            {"name": "night", "kind": "is_night", "column": "ts", "night_end_hour": 5},
            {"name": "hour", "kind": "hour", "column": "ts"},
            {"name": "weekday", "kind": "weekday", "column": "ts"},
            {"name": "log_amount", "kind": "log1p", "column": "amount"},
        ],
        "windows": [
            {
                "entity": "card",
                "aggregates": ["count", "sum", "mean", "min", "max", "std"],
                "column": "amount",
                "windows": ["1h", "1d"],
            },
            {
                "entity": "card",
                "aggregates": ["count", "mean"],
                "column": "amount",
                "windows": ["1h"],
                "include_current": False,
                "name": "card_prev_{aggregate}_{window}",
            },
            {
                "entity": "shop",
                "aggregates": ["count", "label_count", "label_rate"],
                "windows": ["1h", "6h"],
                "delay": "2h",
            },
        ],
        "ratios": [{"name": "amount_vs_mean", "numerator": "amount", "denominator": "card_mean_1d"}],
    }
)
DATA = Data.model_validate(
    {"source": "x", "timestamp": "ts", "label": "y", "label_delay": "2h", "id_column": "id"}
)
DEFS = resolve_definitions(FEATURES, DATA)


def events(minutes, cards, shops, amounts, labels) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": np.arange(len(minutes)),
            "ts": BASE + pd.to_timedelta(np.asarray(minutes, dtype=np.int64), unit="m"),
            "card": np.asarray(cards, dtype=np.int64),
            "shop": np.asarray(shops, dtype=np.int64),
            "amount": np.asarray(amounts, dtype=np.float64),
            "y": np.asarray(labels, dtype=np.int64),
        }
    )


def random_events(seed: int, n: int = 300, span_minutes: int = 2 * 1440) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    minutes = rng.integers(0, span_minutes, n)
    minutes[rng.random(n) < 0.15] = minutes[0]  # ties at one timestamp, across entities and within
    amounts = np.round(rng.gamma(2.0, 30.0, n), 2)
    amounts[rng.random(n) < 0.05] = np.nan
    return events(minutes, rng.integers(0, 6, n), rng.integers(0, 4, n), amounts, rng.random(n) < 0.2)


def oracle(frame: pd.DataFrame, d: WindowDefinition) -> np.ndarray:
    """The definition, literally: loop over every pair of events."""
    t = frame["ts"].to_numpy().astype("datetime64[ns]").astype(np.int64)
    ent = frame[d.entity].to_numpy()
    w, delay = int(d.window.total_seconds() * 1e9), int(d.delay.total_seconds() * 1e9)
    out = np.empty(len(frame))
    for i in range(len(frame)):
        chosen = []
        for j in range(len(frame)):
            if ent[j] != ent[i]:
                continue
            if delay == 0:
                earlier = t[j] < t[i] or (t[j] == t[i] and j < i)
                inside = t[j] > t[i] - w and (earlier or (j == i and d.include_current))
            else:
                inside = t[i] - delay - w < t[j] <= t[i] - delay
            if inside:
                chosen.append(j)
        vals = frame["amount"].to_numpy()[chosen]
        vals = vals[~np.isnan(vals)]
        labels = frame["y"].to_numpy()[chosen].astype(float)
        out[i] = {
            "count": float(len(chosen)),
            "sum": float(np.sum(vals)),
            "mean": float(np.mean(vals)) if len(vals) else np.nan,
            "min": float(np.min(vals)) if len(vals) else np.nan,
            "max": float(np.max(vals)) if len(vals) else np.nan,
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else np.nan,
            "label_count": float(labels.sum()),
            "label_rate": float(labels.sum() / len(chosen)) if chosen else 0.0,
        }[d.aggregate]
    return out


def assert_same(a: np.ndarray, b: np.ndarray, name: str) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), name
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-9, err_msg=name)


def compute(frame: pd.DataFrame) -> pd.DataFrame:
    return compute_features(frame, DEFS, timestamp="ts", label="y", id_column="id")


def test_output_shape_keys_and_order() -> None:
    frame = random_events(1, n=50).sample(frac=1.0, random_state=3)  # unsorted input, shuffled index
    out = compute(frame)
    assert list(out.columns) == ["id", "card", "shop", "ts", *feature_names(DEFS)]
    assert out.index.equals(frame.index)
    assert (out["id"].to_numpy() == frame["id"].to_numpy()).all()


def test_every_window_feature_matches_the_brute_force_definition() -> None:
    frame = random_events(7)
    out = compute(frame)
    for d in DEFS:
        if isinstance(d, WindowDefinition):
            assert_same(out[d.name], oracle(frame, d), d.name)


def test_window_edges_ties_and_delay_by_hand() -> None:
    # card 1: events at 0, 60 (= exactly 1h later), 60 (tie), 61 minutes.
    frame = events([0, 60, 60, 61], [1, 1, 1, 1], [0, 0, 0, 0], [10.0, 20.0, 30.0, 40.0], [1, 0, 0, 0])
    out = compute(frame)
    # (t-1h, t]: the event at 0 is exactly 1h before 60 and is excluded; the tie counts only once it came first.
    assert out["card_count_1h"].tolist() == [1.0, 1.0, 2.0, 3.0]
    assert out["card_mean_1h"].tolist() == [10.0, 20.0, 25.0, 30.0]
    assert out["card_prev_count_1h"].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert np.isnan(out["card_prev_mean_1h"][0]) and out["card_prev_mean_1h"][2] == 20.0
    assert np.isnan(out["card_std_1h"][0]) and out["card_std_1h"][2] == pytest.approx(
        np.std([20, 30], ddof=1)
    )
    # shop, delay 2h, window 1h: (t-3h, t-2h]. Nothing is 2h old yet: empty windows give 0 count and rate.
    assert out["shop_count_1h"].tolist() == [0.0] * 4
    assert out["shop_label_rate_1h"].tolist() == [0.0] * 4


def test_delayed_window_includes_its_end_and_excludes_its_start() -> None:
    # An event at 0; probes at exactly +2h (window end t-2h = 0: included) and +3h (start t-3h = 0: excluded).
    frame = events([0, 120, 180, 179], [1, 2, 3, 4], [5, 5, 5, 5], [1.0, 1.0, 1.0, 1.0], [1, 0, 0, 0])
    out = compute(frame)
    assert out["shop_count_1h"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out["shop_label_count_1h"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out["shop_label_rate_1h"].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_row_features_and_ratio() -> None:
    # 2024-03-02 is a Saturday; 05:00 is night with night_end_hour = 5, 06:00 is not.
    frame = events([1440 + 300, 1440 + 360, 0], [1, 1, 2], [0, 0, 0], [0.0, 99.0, 5.0], [0, 0, 0])
    out = compute(frame)
    assert out["weekend"].tolist() == [1.0, 1.0, 0.0]
    assert out["night"].tolist() == [1.0, 0.0, 1.0]
    assert out["hour"].tolist() == [5.0, 6.0, 0.0]
    assert out["weekday"].tolist() == [5.0, 5.0, 4.0]
    assert out["log_amount"].tolist() == pytest.approx([0.0, np.log1p(99.0), np.log1p(5.0)])
    assert out["amount_vs_mean"].tolist() == pytest.approx([np.nan, 99.0 / 49.5, 1.0], nan_ok=True)


def test_sums_are_exact_for_decimal_amounts_in_long_histories() -> None:
    # A naive running sum over a large table loses ~1e-8 per window; the mean of one 0.01 must stay 0.01.
    n = 200_000
    frame = events(np.arange(n) * 10, np.arange(n) % 2, np.zeros(n), np.full(n, 999.99), np.zeros(n))
    frame.loc[n - 1, "amount"] = 0.01
    frame.loc[n - 1, "card"] = 7
    out = compute(frame)
    assert out["card_mean_1h"].iloc[-1] == 0.01
    assert out["card_sum_1d"].iloc[-2] == pytest.approx(999.99 * 72, rel=0, abs=1e-9)


def test_no_future_leakage_under_perturbation() -> None:
    frame = random_events(11)
    base = compute(frame)
    rng = np.random.default_rng(0)
    for cut in np.quantile(frame["ts"].astype("int64"), [0.3, 0.6, 0.9]):
        cut = pd.Timestamp(int(cut))
        later = frame["ts"] > cut
        young = frame["ts"] > cut - timedelta(hours=2)  # labels younger than data.label_delay at the cut
        changed = frame.copy()
        changed.loc[later, "amount"] = rng.gamma(2.0, 50.0, int(later.sum()))
        changed.loc[later, "card"] = rng.integers(0, 3, int(later.sum()))
        changed.loc[later, "shop"] = rng.integers(0, 3, int(later.sum()))
        changed.loc[young, "y"] = 1 - changed.loc[young, "y"]
        extra = events(
            [int((cut - BASE).total_seconds() // 60) + 1] * 5,
            [0, 1, 2, 3, 4],
            [0, 1, 2, 3, 0],
            [1e6] * 5,
            [1] * 5,
        )
        extra["id"] += 10_000
        changed = pd.concat([changed, extra], ignore_index=True)
        after = compute(changed).iloc[: len(frame)]
        past = ~later.to_numpy()
        assert young.any() and later.any()
        for name in feature_names(DEFS):
            assert_same(after[name].to_numpy()[past], base[name].to_numpy()[past], f"{name} at cut {cut}")


def test_a_label_younger_than_its_delay_would_change_the_feature_if_read() -> None:
    # Guard for the test above: labels older than the delay do move the label features (the test has teeth).
    frame = random_events(11)
    flipped = frame.assign(y=1 - frame["y"])
    assert not np.allclose(compute(flipped)["shop_label_rate_6h"], compute(frame)["shop_label_rate_6h"])


def test_null_timestamps_and_wrong_frames_are_refused() -> None:
    frame = random_events(2, n=10)
    frame.loc[3, "ts"] = pd.NaT
    with pytest.raises(FeatureError, match=r"Column 'ts' \(the event time\) has 1 null values"):
        compute(frame)
    with pytest.raises(
        FeatureError,
        match=r"Column 'shop' needed by feature 'shop_count_1h' \(its entity\) is missing from the input frame",
    ):
        compute(random_events(2, n=10).drop(columns=["shop"]))


minutes_st = st.lists(st.integers(0, 600), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), minutes=minutes_st)
def test_property_fast_path_equals_the_definition(data, minutes) -> None:
    n = len(minutes)
    cards = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    shops = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    cents = data.draw(st.lists(st.integers(0, 100_000), min_size=n, max_size=n))
    labels = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    frame = events(minutes, cards, shops, np.asarray(cents) / 100, labels)
    out = compute(frame)
    for d in DEFS:
        if isinstance(d, WindowDefinition):
            assert_same(out[d.name], oracle(frame, d), d.name)


def test_fallback_clock_for_nanosecond_times_with_many_entities() -> None:
    # Irregular nanosecond times and many entities overflow the compact (entity, time) key; ranks take over.
    rng = np.random.default_rng(5)
    n = 400
    frame = random_events(5, n=n)
    frame["ts"] = BASE + pd.to_timedelta(rng.integers(0, 2 * 86_400 * 10**9, n), unit="ns")
    frame["card"] = rng.integers(0, 3, n) * 10**12  # sparse ids: hashed codes
    out = compute(frame)
    for d in DEFS:
        if isinstance(d, WindowDefinition):
            assert_same(out[d.name], oracle(frame, d), d.name)


@pytest.mark.parametrize("first_row", [0, 1, 137, 299, 300])
@pytest.mark.parametrize("nanoseconds", [False, True])
def test_history_rows_before_first_row_are_read_but_not_computed(first_row: int, nanoseconds: bool) -> None:
    """Chunked runs pass carried rows as history: same values, bit for bit, as the whole frame gives those rows."""
    frame = random_events(9)
    if nanoseconds:  # irregular ns times over decades overflow the compact key: the rank clock (fallback) path
        rng = np.random.default_rng(2)
        ns = np.sort(rng.integers(0, 80 * 365 * 86_400 * 10**9, len(frame)))
        ns[::7] = ns[::7] // 3_600_000_000_000 * 3_600_000_000_000  # some events on the hour: windows hit ties
        frame["ts"] = pd.Timestamp("1950-01-01") + pd.to_timedelta(np.sort(ns), unit="ns")
    whole = compute(frame)
    tail = compute_features(frame, DEFS, timestamp="ts", label="y", id_column="id", first_row=first_row)
    pd.testing.assert_frame_equal(tail, whole.iloc[first_row:], check_exact=True)
    # The history rows do count: dropping them changes the tail's windows.
    if 0 < first_row < len(frame) and not nanoseconds:  # (decades apart, the ns events share no window)
        alone = compute(frame.iloc[first_row:])
        assert not alone["card_count_1d"].equals(tail["card_count_1d"])


def test_first_row_outside_the_frame_is_refused() -> None:
    with pytest.raises(FeatureError, match=r"first_row must be between 0 and the 10 rows of the frame\. Got 11"):
        compute_features(random_events(1, n=10), DEFS, timestamp="ts", label="y", first_row=11)


@pytest.mark.parametrize("scale", [1.0, 100.0])  # cents, and the same on a 1e-4 grid
def test_std_of_a_tight_window_far_from_the_entitys_first_value_keeps_its_digits(scale: float) -> None:
    """999.99, 1000.00, ... after a first value of 0: a one-pass float sum of squares lost ~1e-8 of a 0.007 std
    (more than the online store's two-pass sum differs by; found by the online/offline property test)."""
    import math

    amounts = [0.0, 0.01, 999.99, 1000.0, 1000.0, 999.98, 1000.0, None, 1000.01]
    minutes = [0, 1, 300, 301, 302, 303, 304, 305, 306]
    values = [None if a is None else round(a / scale, 6) for a in amounts]
    frame = pd.DataFrame({
        "id": range(len(values)),
        "ts": pd.Timestamp("2024-01-01") + pd.to_timedelta(minutes, unit="m"),
        "card": 1,
        "amount": pd.array(values, dtype="Float64").astype(float),
    })
    d = WindowDefinition(name="s", entity="card", aggregate="std", column="amount", window=timedelta(hours=1))
    got = compute_features(frame, [d], timestamp="ts")["s"].to_numpy()
    for i, m in enumerate(minutes):
        window = [x for x, t in zip(values, minutes, strict=True) if m - 60 < t <= m and x is not None]
        if len(window) < 2:
            assert np.isnan(got[i])
            continue
        mean = math.fsum(window) / len(window)
        want = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / (len(window) - 1))
        assert got[i] == pytest.approx(want, rel=1e-9, abs=0), (i, got[i], want)
