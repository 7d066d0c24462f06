"""``/v1/predict/batch`` answers exactly as the same events sent one by one, in order, would be answered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from conftest import make_spec
from keel.features.definitions import feature_names, resolve_definitions
from keel.serve import PathProvider, create_app, read_predictions

FIELDS = ("event_id", "score", "decision", "model_version", "fallback", "fallback_reason", "stale")


def tricky_batch(events: Any) -> list[dict[str, Any]]:
    """Repeated entities, a tie, an event sent twice, unknown entities, a large amount (the rule's side)."""
    batch = events(400, 60)
    batch[7]["tx_datetime"] = batch[6]["tx_datetime"]  # a tie
    for i in range(10, 20):  # one customer and one terminal, many times
        batch[i]["customer_id"], batch[i]["terminal_id"] = batch[10]["customer_id"], batch[10]["terminal_id"]
    batch[25] = dict(batch[24])  # the same transaction twice: counted once
    batch[30] = {**batch[30], "customer_id": 10**7, "terminal_id": 10**7 + 1}  # never seen
    batch[31] = {**batch[31], "tx_amount": 5000.0}
    return batch


def logged(spec: Any) -> Any:
    return read_predictions(spec.store_path(spec.serving.prediction_log))


def test_batch_equals_the_same_events_one_by_one(tmp_path: Path, model_dirs: dict[str, Path], events: Any) -> None:
    warm = events(300, 100)
    batch = tricky_batch(events)
    one, two = make_spec(tmp_path / "one", features={"freshness": "1h"}), make_spec(tmp_path / "two", features={
        "freshness": "1h"})
    with TestClient(create_app(one, PathProvider(model_dirs["a"]))) as c:
        assert c.post("/v1/predict/batch", json={"events": warm}).status_code == 200
        singles = [c.post("/v1/predict", json=e).json() for e in batch]
    with TestClient(create_app(two, PathProvider(model_dirs["a"]))) as c:
        assert c.post("/v1/predict/batch", json={"events": warm}).status_code == 200
        body = c.post("/v1/predict/batch", json={"events": batch}).json()
    batched = body["data"]
    assert body["count"] == len(batch) == len(batched)
    for s, b in zip(singles, batched, strict=True):
        assert {k: s[k] for k in FIELDS} == {k: b[k] for k in FIELDS}  # bit-identical scores
    assert any(d["stale"] for d in batched) and not all(d["stale"] for d in batched)
    assert len({d["decision"] for d in batched}) == 2
    # The features each event was scored with, from the prediction logs: equal, NaN for NaN.
    names = feature_names(resolve_definitions(one.features, one.data))
    a, b = logged(one), logged(two)
    a, b = a[a["endpoint"] == "predict"], b.iloc[len(warm):]
    assert len(a) == len(b) == len(batch)
    fa, fb = a[names].to_numpy(dtype=float), b[names].to_numpy(dtype=float)
    assert np.array_equal(fa, fb, equal_nan=True)
    counts = b["customer_id_nb_tx_1day_window"].to_numpy()
    assert counts[19] > counts[10]  # later events of the batch saw the earlier ones
    assert counts[25] == counts[24]  # and the repeated event counted once


def test_an_invalid_event_rejects_the_whole_batch_and_changes_nothing(tmp_path: Path, model_dirs: dict[str, Path],
                                                                     events: Any) -> None:
    batch = events(500, 5)
    probe = events(505, 1)[0]
    bad = [*batch[:3], {**batch[3], "tx_amount": -1.0}, batch[4]]
    with TestClient(create_app(make_spec(tmp_path / "a"), PathProvider(model_dirs["a"]))) as c:
        r = c.post("/v1/predict/batch", json={"events": bad})
        assert r.status_code == 422 and "tx_amount" in r.text and "events" in r.text
        after_bad = c.post("/v1/predict", json=probe).json()
    with TestClient(create_app(make_spec(tmp_path / "b"), PathProvider(model_dirs["a"]))) as c:
        fresh = c.post("/v1/predict", json=probe).json()
    assert after_bad["score"] == fresh["score"]
    assert len(logged(make_spec(tmp_path / "a"))) == 1  # only the probe
