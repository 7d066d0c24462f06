"""Drift statistics agree with Evidently on the same bins (Evidently is optional: skipped when not installed).

Importing Evidently takes ~15 s, which is why this test has its own file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keel.monitor.drift import drift_table
from keel.monitor.profile import build_profile, numeric_profile


def test_drift_agrees_with_evidently_on_the_same_bins() -> None:
    evidently = pytest.importorskip("evidently")
    from evidently.legacy.calculations.stattests.ks_stattest import _ks_stat_test
    from evidently.legacy.calculations.stattests.psi import _psi
    from evidently.legacy.core import ColumnType

    assert evidently.__version__
    rng = np.random.default_rng(3)
    # Continuous: Evidently bins reference and current together (Sturges); give our profile those edges.
    x, y = rng.gamma(2, 30, 40_000), rng.gamma(2, 36, 30_000)
    edges = np.histogram_bin_edges(np.concatenate([x, y]), bins="sturges")
    prof = build_profile({"x": x}, None)
    prof.features["x"] = numeric_profile("x", x, edges=edges[1:-1])
    col = drift_table(prof, pd.DataFrame({"x": y}))["x"]
    ev_psi, _ = _psi(pd.Series(x), pd.Series(y), ColumnType.Numerical, 0.1)
    assert col.psi == pytest.approx(ev_psi, abs=1e-6)
    # Discrete (<= 20 values): Evidently bins by value, as our sketch/edges do when given every value.
    a, b = rng.poisson(3, 40_000).astype(float), rng.poisson(3.3, 30_000).astype(float)
    b = b[b <= a.max()]
    values = np.unique(a)
    prof.features["d"] = numeric_profile("d", a, edges=values[:-1])
    col = drift_table(prof, pd.DataFrame({"x": y[: len(b)], "d": b}))["d"]
    ev_psi, _ = _psi(pd.Series(a), pd.Series(b), ColumnType.Numerical, 0.1)
    ev_ks_p, _ = _ks_stat_test(pd.Series(a), pd.Series(b), ColumnType.Numerical, 0.05)
    assert col.psi == pytest.approx(ev_psi, abs=1e-6)
    assert col.ks_pvalue == pytest.approx(ev_ks_p, abs=1e-6)
