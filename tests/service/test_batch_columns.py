"""A batch validated column-wise is answered exactly as the same batch validated as rows: same answers, same
prediction-log rows, same online-store state, also when the fallback answers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from conftest import make_spec
from keel.features.online import OnlineStore
from keel.serve import PathProvider
from keel.serve import fallback as fb
from keel.serve.predlog import PREDICTION_COLUMNS, iter_rows
from keel.serve.schemas import build_request_models
from keel.serve.service import Service

_VOLATILE = {"latency_ms", "time"}


def _log_rows(path: Path) -> list[dict[str, Any]]:
    """The prediction log's rows as its readers give them (a batch answered column-wise is stored only as a
    columnar segment, rows answered one by one as rows: what they read back must be the same)."""
    columns = ["seq", *PREDICTION_COLUMNS]
    return [{k: v for k, v in zip(columns, r, strict=True) if k not in _VOLATILE} for r in iter_rows(path)]


def _table(path: Path, table: str, order: str) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [{k: r[k] for k in r.keys() if k not in _VOLATILE}  # noqa: SIM118 - sqlite3.Row
                for r in db.execute(f"select * from {table} order by {order}")]


def _answer_both_ways(tmp_path: Path, model_dir: Path, history: list[dict[str, Any]], batch: list[dict[str, Any]],
                      *, broken_model: bool = False) -> dict[str, Any]:
    spec = make_spec(tmp_path)
    models = build_request_models(spec)
    parsed = models.columns.parse(orjson.dumps({"events": batch}))
    assert parsed is not None, "a well-formed batch must take the column path"
    rows = models.batch.model_validate_json(orjson.dumps({"events": batch})).model_dump()["events"]
    past = [models.event.model_validate(e).model_dump() for e in history]
    out: dict[str, Any] = {}
    for way in ("columns", "rows"):
        store = OnlineStore.from_spec(spec, tmp_path / f"{way}.sqlite")
        store.update_many(past)
        service = Service(spec, PathProvider(model_dir), store=store, prediction_log=str(tmp_path / f"{way}.log"))

        async def go(service: Service = service, way: str = way) -> list[dict[str, Any]]:
            await service.start()
            if broken_model:
                async def timed_out(*_: Any) -> tuple[None, str]:
                    return None, fb.MODEL_TIMEOUT
                service._score = timed_out  # type: ignore[method-assign]
            if way == "columns":
                answers = await service.answer_columns(*parsed, "req", started=0.0)
            else:
                answers = await service.answer(rows, "req", endpoint="batch", started=0.0)
            await service.stop()
            return answers

        answers = asyncio.run(go())
        store.close()
        out[way] = {
            "answers": [{k: v for k, v in a.items() if k != "latency_ms"} for a in answers],
            "log": _log_rows(tmp_path / f"{way}.log"),
            "store": _table(tmp_path / f"{way}.sqlite", "events", "entity, key, t, event_id"),
            "metrics": [line for line in generate_latest(service.metrics.registry).decode().splitlines()
                        if "_created" not in line],
        }
    return out


@pytest.mark.parametrize("broken_model", [False, True])
def test_columns_and_rows_answer_alike(tmp_path: Path, model_dirs: dict[str, Path], events: Any,
                                       broken_model: bool) -> None:
    history, batch = events(0, 400), events(400, 120)
    batch[7] = dict(batch[7], tx_amount=0)  # an int in a float field
    out = _answer_both_ways(tmp_path, model_dirs["a"], history, batch, broken_model=broken_model)
    columns, rows = out["columns"], out["rows"]
    assert len(columns["answers"]) == 120
    assert columns["answers"] == rows["answers"]
    assert columns["log"] == rows["log"] and len(columns["log"]) == 120
    assert columns["store"] == rows["store"]
    assert columns["metrics"] == rows["metrics"] and "keel_events_total 120.0" in columns["metrics"]
    fallbacks = sum(a["fallback"] for a in columns["answers"])
    assert fallbacks == (120 if broken_model else 0)
    if broken_model:
        assert {a["fallback_reason"] for a in columns["answers"]} == {fb.MODEL_TIMEOUT}
    else:
        assert all(isinstance(a["score"], float) for a in columns["answers"])


def test_out_of_order_and_repeated_events_answer_alike(tmp_path: Path, model_dirs: dict[str, Path],
                                                       events: Any) -> None:
    history, batch = events(0, 300), events(300, 60)
    batch[10], batch[11] = batch[11], batch[10]  # out of time order
    batch.append(dict(batch[3]))                 # the same event twice
    batch.append(dict(history[-1]))              # an event the store already holds
    out = _answer_both_ways(tmp_path, model_dirs["a"], history, batch)
    assert out["columns"]["answers"] == out["rows"]["answers"]
    assert out["columns"]["log"] == out["rows"]["log"]
    assert out["columns"]["store"] == out["rows"]["store"]


def test_the_batch_route_takes_the_column_path_and_answers_alike(tmp_path: Path, model_dirs: dict[str, Path],
                                                                  events: Any, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    from fastapi.testclient import TestClient

    from keel.serve import create_app

    batch = events(0, 40)
    bodies: dict[str, Any] = {}
    calls: list[int] = []
    original = Service.answer_columns

    async def spy(self: Service, n: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(n)
        return await original(self, n, *args, **kwargs)

    monkeypatch.setattr(Service, "answer_columns", spy)
    for way in ("columns", "rows"):
        if way == "rows":  # the request models alone, as for a body the column check declines
            monkeypatch.setattr("keel.serve.columns.BatchColumns.parse", lambda self, body: None)
        with TestClient(create_app(make_spec(tmp_path / way), PathProvider(model_dirs["a"]))) as client:
            response = client.post("/v1/predict/batch", json={"events": batch}, headers={"X-Request-ID": "b1"})
            assert response.status_code == 200
            bodies[way] = response.json()
            refused = client.post("/v1/predict/batch", json={"events": [dict(batch[0], tx_amount=-1)]})
            assert refused.status_code == 422 and "tx_amount" in refused.text
    assert calls == [40]
    for body in bodies.values():
        body.pop("latency_ms")
        for item in body["data"]:
            item.pop("latency_ms")
    assert bodies["columns"] == bodies["rows"]
