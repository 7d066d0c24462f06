"""Drift statistics against scipy / reference formulas and Evidently; profiles; incremental windows."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from keel.errors import MonitorError
from keel.monitor.drift import DriftAccumulator, chi2_test, drift_table, js_distance, ks_pvalue, psi
from keel.monitor.profile import (
    build_profile,
    categorical_profile,
    load_profile,
    numeric_profile,
    profile_path,
    save_profile,
)


def _psi_reference(r: np.ndarray, c: np.ndarray) -> float:
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((r - c) * np.log(r / c)))


def test_psi_matches_the_formula_and_is_zero_for_identical_shares() -> None:
    r = np.array([10.0, 20, 30, 40])
    c = np.array([15.0, 25, 25, 35])
    assert psi(r, c) == pytest.approx(_psi_reference(r, c), abs=1e-12)
    assert psi(r, r * 3) == pytest.approx(0.0, abs=1e-15)
    assert psi(r, c) == pytest.approx(psi(c, r), abs=1e-12)  # symmetric
    # An empty current bin takes a share of 1e-4 (Evidently's convention), not an infinite PSI.
    assert np.isfinite(psi(r, np.array([0.0, 20, 30, 50])))


def test_js_and_chi2_match_scipy() -> None:
    r = np.array([100.0, 250, 400, 250])
    c = np.array([80.0, 300, 350, 270])
    assert js_distance(r, c) == pytest.approx(float(jensenshannon(r / r.sum(), c / c.sum())), abs=1e-12)
    stat, p = chi2_test(r, c)
    ref = stats.chisquare(c, f_exp=r / r.sum() * c.sum())
    assert stat == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_ks_is_exact_for_discrete_features_and_close_for_continuous() -> None:
    rng = np.random.default_rng(1)
    ref = rng.poisson(4, 40_000).astype(float)
    cur = rng.poisson(4.4, 25_000).astype(float)
    cur = cur[cur <= ref.max()]
    col = drift_table(build_profile({"x": ref}, None), pd.DataFrame({"x": cur}))["x"]
    expect = stats.ks_2samp(ref, cur)  # both samples > 10 000: scipy uses the asymptotic p-value
    assert col.ks == pytest.approx(expect.statistic, abs=1e-12)
    assert col.ks_pvalue == pytest.approx(expect.pvalue, rel=1e-9)

    x, y = rng.normal(0, 1, 30_000), rng.normal(0.05, 1, 20_000)
    col = drift_table(build_profile({"x": x}, None), pd.DataFrame({"x": y}))["x"]
    assert abs(col.ks - stats.ks_2samp(x, y).statistic) <= 2e-3  # within one sketch step


def test_ks_pvalue_matches_scipy_asymptotic() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=3000), rng.normal(0.1, size=2000)
    expect = stats.ks_2samp(a, b, method="asymp")
    assert ks_pvalue(expect.statistic, len(a), len(b)) == pytest.approx(expect.pvalue, rel=1e-9)


@pytest.mark.parametrize(("d", "n"), [(0.008, 66_667), (0.01, 66_667), (0.02, 66_667), (0.05, 66_667),
                                      (0.02, 12_000), (0.03, 12_000), (0.005, 66_667)])
def test_ks_pvalue_of_a_drifted_window_is_within_1e_6_of_scipy(d: float, n: int) -> None:
    m = 200_000
    en = np.round(m * n / (m + n))
    assert ks_pvalue(d, m, n) == pytest.approx(stats.kstwo.sf(d, en), abs=1e-6, rel=1e-9 if d == 0.005 else 0.05)


def test_profile_bins_missing_and_range() -> None:
    x = np.concatenate([np.arange(1000, dtype=float), [np.nan] * 50])
    p = numeric_profile("x", x, bins=10)
    assert p.missing == 50 and p.n == 1050
    assert p.min == 0 and p.max == 999
    assert len(p.edges) == 9 and sum(p.counts) == 1000
    assert max(p.counts) - min(p.counts) <= 2  # quantile bins hold (nearly) equal shares
    # A flag keeps both values apart, and its top bin is not empty.
    flag = numeric_profile("f", np.array([0.0] * 700 + [1.0] * 300), bins=10)
    assert flag.counts == [700, 300]


def test_out_of_range_missing_and_new_categories() -> None:
    ref = pd.DataFrame({"x": np.linspace(0, 10, 1000), "c": ["a", "b"] * 500})
    prof = build_profile(ref, None, categorical=["c"])
    cur = pd.DataFrame({"x": [1.0, 20.0, -1.0, np.nan], "c": ["a", "zz", None, "b"]})
    cols = drift_table(prof, cur)
    assert cols["x"].missing_rate == pytest.approx(0.25)
    assert cols["x"].out_of_range_rate == pytest.approx(2 / 3)
    assert cols["c"].new_categories == ["zz"]
    assert cols["c"].missing_rate == pytest.approx(0.25)
    assert cols["c"].out_of_range_rate == pytest.approx(1 / 3)
    assert categorical_profile("c", ref["c"]).categories == {"a": 500, "b": 500}


def test_incremental_windows_equal_one_pass_per_window() -> None:
    rng = np.random.default_rng(4)
    n = 6000
    t0 = datetime(2018, 9, 1)
    seconds = rng.uniform(0, 3 * 86400, n)
    frame = pd.DataFrame({
        "event_time": pd.Timestamp(t0) + pd.to_timedelta(seconds, unit="s"),
        "x": rng.normal(size=n) + 0.5 * (seconds // 86400), "score": rng.beta(1, 20, n),
    })
    prof = build_profile(pd.DataFrame({"x": rng.normal(size=5000)}), rng.beta(1, 20, 5000))
    acc = DriftAccumulator(prof, timedelta(days=1))
    for part in (frame.sample(frac=1.0, random_state=0).iloc[i::7] for i in range(7)):  # any order, any batch size
        acc.update(part)
    results = acc.results()
    assert [w.start for w in results] == [t0, t0 + timedelta(days=1), t0 + timedelta(days=2)]
    for w in results:
        day = frame[(frame.event_time >= w.start) & (frame.event_time < w.end)]
        one = drift_table(prof, day)
        assert w.rows == len(day)
        for c in ("x", "score"):
            assert w.columns[c].psi == pytest.approx(one[c].psi, abs=1e-12)
            assert w.columns[c].ks == pytest.approx(one[c].ks, abs=1e-12)
    assert results[2].columns["x"].psi > results[0].columns["x"].psi > 0


def test_profile_round_trip_and_errors(tmp_path) -> None:
    prof = build_profile({"x": np.arange(100.0)}, np.linspace(0, 1, 100), model="m", version=3,
                         reference_metrics={"average_precision": 0.5})
    path = save_profile(prof, profile_path(tmp_path, "m", 3))
    assert path.name == "m-v3.json"
    back = load_profile(path)
    assert back.features["x"].edges == prof.features["x"].edges
    assert back.score is not None and back.score.counts == prof.score.counts
    assert back.reference_metrics == {"average_precision": 0.5}
    with pytest.raises(MonitorError, match="No reference profile"):
        load_profile(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MonitorError, match="not valid JSON"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(MonitorError, match="window must be longer than 0"):
        DriftAccumulator(prof, timedelta(0))


@pytest.mark.parametrize("kind", ["gamma", "poisson", "heavy_tail", "constant", "uniform_grid"])
def test_window_counts_equal_searchsorted_at_every_cut_point(kind: str) -> None:
    """The grid search gives the same sketch, bins and range counts as np.searchsorted, exactly: values on,
    just below and just above every cut point, out of range, missing, in two windows of one frame."""
    rng = np.random.default_rng(7)
    ref = {"gamma": rng.gamma(2, 30, 20_000), "poisson": rng.poisson(5, 20_000).astype(float),
           "heavy_tail": rng.lognormal(0, 4, 20_000), "constant": np.full(1000, 3.25),
           "uniform_grid": np.round(rng.uniform(0, 1, 20_000), 2)}[kind]
    prof = build_profile(pd.DataFrame({"x": ref}), None)
    p = prof.features["x"]
    cuts = np.unique(np.concatenate([p.sketch, p.edges, [p.min, p.max]]))
    probes = np.concatenate([cuts, np.nextafter(cuts, -np.inf), np.nextafter(cuts, np.inf),
                             rng.choice(ref, 3000), [p.min - 1, p.max + 1, -1e12, 1e12, np.nan, np.inf]])
    probes = rng.permutation(probes)
    t0 = pd.Timestamp("2020-01-01")
    frame = pd.DataFrame({"event_time": t0 + pd.to_timedelta(np.arange(len(probes)) % 2, unit="D"), "x": probes})
    acc = DriftAccumulator(prof, timedelta(days=1))
    acc.update(frame)
    for day, w in enumerate(acc._windows[i]["x"] for i in sorted(acc._windows)):
        x = probes[np.arange(len(probes)) % 2 == day]
        fin = x[np.isfinite(x)]
        expect_sketch = np.bincount(np.searchsorted(np.asarray(p.sketch), fin, side="left"),
                                    minlength=len(p.sketch) + 1)
        expect_bins = np.bincount(np.searchsorted(np.asarray(p.edges), fin, side="left"), minlength=len(p.edges) + 1)
        assert w.sketch.tolist() == expect_sketch.tolist()
        assert w.bins.tolist() == expect_bins.tolist()
        assert (w.below, w.above) == (int((fin < p.min).sum()), int((fin > p.max).sum()))
        assert (w.n, w.missing) == (len(x), len(x) - len(fin))
        assert w.total == pytest.approx(float(fin.sum()), rel=1e-12, abs=1e-3)
