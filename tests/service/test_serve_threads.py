"""A scikit-learn model scores with the OpenMP thread count its artifact asks for (one by default).

Unpinned, scikit-learn's gradient boosting opens one OpenMP parallel region per tree; on a busy 2-core machine
each region's barrier waits for a descheduled thread, and the demo's served batches ran past their budget.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import ThreadpoolController

from conftest import FixedProvider, make_spec
from keel.artifact import DecisionModel
from keel.serve import create_app


def openmp_threads() -> int:
    """The OpenMP thread count a parallel region started by the calling thread would use."""
    return int(ThreadpoolController().select(user_api="openmp").info()[0]["num_threads"])


def fresh_thread_default() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(openmp_threads()))
    thread.start()
    thread.join()
    return seen[0]


class Recording:
    """A fitted HistGradientBoostingClassifier that notes the OpenMP thread count of every call."""

    def __init__(self, inner: HistGradientBoostingClassifier) -> None:
        self.inner = inner
        self.threads: list[int] = []

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(openmp_threads())
        return np.asarray(self.inner.predict_proba(x))


@pytest.fixture(scope="module")
def hgb(feature_table: pd.DataFrame, transactions: pd.DataFrame) -> tuple[list[str], HistGradientBoostingClassifier]:
    names = [c for c in feature_table.columns if c not in ("transaction_id", "customer_id", "terminal_id",
                                                           "tx_datetime")]
    est = HistGradientBoostingClassifier(max_iter=10, random_state=0)
    return names, est.fit(feature_table[names].to_numpy(), transactions["tx_fraud"].to_numpy())


@pytest.mark.parametrize("threads", [1, 0])
def test_the_model_call_uses_the_artifacts_openmp_threads(tmp_path: Path, hgb: Any, event: dict[str, Any],
                                                          threads: int) -> None:
    default = fresh_thread_default()
    if default < 2:
        pytest.skip("OpenMP uses one thread here anyway (one core or OMP_NUM_THREADS=1): nothing to cap")
    names, est = hgb
    recording = Recording(est)
    model = DecisionModel(kind="hist_gradient_boosting", feature_names=names, estimator=recording, threads=threads)
    with TestClient(create_app(make_spec(tmp_path), FixedProvider(model))) as c:
        recording.threads.clear()  # the load's one-row check runs outside the serving path
        one = c.post("/v1/predict", json=event).json()
        many = c.post("/v1/predict/batch", json={"events": [{**event, "transaction_id": 100 + i}
                                                            for i in range(300)]}).json()
    assert one["fallback"] is False and not any(d["fallback"] for d in many["data"])
    # threads = 1 (what `keel serve` loads with): capped; threads = 0: "all cores", OpenMP's own default.
    assert recording.threads == [threads or default] * 2
    assert fresh_thread_default() == default  # the cap was the call's, not left on the process
