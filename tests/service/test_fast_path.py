"""The middleware's fast path for the prediction routes answers exactly as the FastAPI routes do."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import make_spec
from keel.serve import PathProvider, create_app
from keel.serve.app import ServiceMiddleware


def _app(root: Path, model_dir: Path, *, fast: bool) -> FastAPI:
    app = create_app(make_spec(root, serving={"max_batch": 50, "max_body_bytes": 20_000}), PathProvider(model_dir))
    if not fast:  # the same app with the requests going through FastAPI's routing to the routes
        app.fast_path = None  # type: ignore[attr-defined]
        assert all("models" not in m.kwargs for m in app.user_middleware if m.cls is ServiceMiddleware)
    return app


def _streamed(event: dict[str, Any]) -> Callable[[], Iterator[bytes]]:
    def stream() -> Iterator[bytes]:
        yield b'{"events": ['
        for _ in range(200):
            yield json.dumps(event).encode() + b","
        yield b"{}]}"
    return stream


def _calls(event: dict[str, Any], events: Any) -> list[tuple[str, dict[str, Any]]]:
    batch = events(100, 5)
    bad_batch = [*batch[:2], {**batch[2], "tx_amount": -1}]
    return [
        ("/v1/predict", {"json": event}),
        ("/v1/predict", {"json": {**event, "transaction_id": 2, "tx_amount": 900.0}}),
        ("/v1/predict/batch", {"json": {"events": batch}}),
        ("/v1/predict", {"json": {**event, "tx_amount": "abc", "surprise": 1}}),
        ("/v1/predict", {"json": {k: v for k, v in event.items() if k != "customer_id"}}),
        ("/v1/predict", {"content": b'{"tx_amount": ', "headers": {"content-type": "application/json"}}),
        ("/v1/predict", {}),
        ("/v1/predict", {"content": json.dumps(event).replace(str(event["tx_amount"]), "NaN")}),
        ("/v1/predict/batch", {"json": {"events": bad_batch}}),
        ("/v1/predict/batch", {"json": {"events": []}}),
        ("/v1/predict/batch", {"json": {"events": events(0, 51)}}),
        ("/v1/predict/batch", {"content": json.dumps({"events": [event] * 200}).encode()}),
        ("/v1/predict/batch", {"content": "stream"}),
    ]


def _normalised(body: Any) -> Any:
    """The answer without what differs between two runs (latency)."""
    if isinstance(body, dict):
        return {k: _normalised(v) for k, v in body.items() if k != "latency_ms"}
    if isinstance(body, list):
        return [_normalised(v) for v in body]
    return body


def _run(app: FastAPI, calls: list[tuple[str, dict[str, Any]]], event: dict[str, Any],
         caplog: pytest.LogCaptureFixture) -> tuple[list[Any], str, list[dict[str, Any]]]:
    seen = []
    caplog.clear()
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="keel.serve.access"):
        for i, (path, kwargs) in enumerate(calls):
            kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), "X-Request-ID": f"req-{i}"}}
            if kwargs.get("content") == "stream":
                kwargs["content"] = _streamed(event)()
            r = client.post(path, **kwargs)
            body = r.json()
            seen.append((r.status_code, r.headers["content-type"], r.headers["x-request-id"],
                         int(r.headers["content-length"]) == len(r.content), _normalised(body)))
        metrics = client.get("/metrics").text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "keel.serve.access"]
    counts = "\n".join(sorted(x for x in metrics.splitlines()
                              if x.startswith(("keel_requests_total", "keel_events_total", "keel_decisions_total",
                                               "keel_fallbacks_total", "keel_request_latency_seconds_count"))))
    return seen, counts, [{k: v for k, v in x.items() if k != "latency_ms"} for x in lines if x["path"] != "/metrics"]


def test_fast_path_answers_as_the_routes_for_valid_and_invalid_bodies(
        tmp_path: Path, model_dirs: dict[str, Path], event: dict[str, Any], events: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    calls = _calls(event, events)
    fast = _run(_app(tmp_path / "fast", model_dirs["a"], fast=True), calls, event, caplog)
    routed = _run(_app(tmp_path / "routed", model_dirs["a"], fast=False), calls, event, caplog)
    assert fast[0] == routed[0]
    statuses = [s[0] for s in fast[0]]
    assert statuses == [200, 200, 200, 422, 422, 422, 422, 422, 422, 422, 422, 413, 413]
    assert fast[1] == routed[1] and 'keel_requests_total{endpoint="predict",outcome="invalid"} 5.0' in fast[1]
    assert fast[2] == routed[2] and [x["request_id"] for x in fast[2]] == [f"req-{i}" for i in range(len(calls))]


def test_prediction_requests_skip_fastapi_routing(tmp_path: Path, model_dirs: dict[str, Path], event: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import keel.serve.app as app_module
    import keel.serve.routes.predict as routes_module

    calls: list[str] = []
    for module, name in ((app_module, "middleware"), (routes_module, "route")):
        def spy(*args: Any, _inner: Any = module.predict_body, _name: str = name) -> Any:
            calls.append(_name)
            return _inner(*args)
        monkeypatch.setattr(module, "predict_body", spy)
    for fast in (True, False):
        with TestClient(_app(tmp_path / str(fast), model_dirs["a"], fast=fast)) as client:
            assert client.post("/v1/predict", json=event).status_code == 200
            assert client.post("/v1/predict/batch", json={"events": [event]}).status_code == 200
            assert client.get("/v1/predict").status_code == 405  # other methods still go to FastAPI's routing
    assert calls == ["middleware", "middleware", "route", "route"]


def test_an_unexpected_error_is_a_500_with_the_apps_body_on_both_paths(
        tmp_path: Path, model_dirs: dict[str, Path], event: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    seen = []
    for fast in (True, False):
        app = _app(tmp_path / str(fast), model_dirs["a"], fast=fast)

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        with TestClient(app, raise_server_exceptions=False) as client:
            app.state.service.answer = broken
            r = client.post("/v1/predict", json=event, headers={"X-Request-ID": "bug-1"})
            seen.append((r.status_code, r.json(), 'outcome="error"} 1.0' in client.get("/metrics").text))
    assert seen[0] == seen[1] == (500, {"detail": "Internal error; see the service log.", "errors": []}, True)
    assert "a bug" in caplog.text and '"request_id": "bug-1"' in caplog.text
