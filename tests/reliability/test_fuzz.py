"""Fuzzing: the API against its own OpenAPI document (schemathesis), the spec loader and the data contract
(hypothesis). Bounded example counts keep this file in the default suite.

Defects this file found (all fixed in e260c22, kept as regression tests): event/label times outside the
store's clock range degraded /ready; the OpenAPI document of GET /v1/model (abstain_band) and of the admin 422
body did not match the service.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Project, to_event
from keel.data.contracts import ContractReport, check_contract
from keel.data.sources import open_source
from keel.errors import SpecError
from keel.serve import PathProvider, create_app
from keel.spec import Spec, parse_spec

API_KEY = "fuzz-key"
EXAMPLES = 20
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
_SENT = ("method", "url", "headers", "params", "json", "content", "cookies")


@pytest.fixture(scope="module")
def fuzz_project(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return project.copy_to(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def app_client(fuzz_project: Project) -> Iterator[tuple[Any, TestClient]]:
    mp = pytest.MonkeyPatch()
    mp.setenv("KEEL_API_KEY", API_KEY)
    spec = fuzz_project.spec
    app = create_app(spec, PathProvider(fuzz_project.model))
    with TestClient(app) as client:
        yield app, client
    mp.undo()


def _send(client: TestClient, case: Any) -> Any:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    return client.request(**{k: v for k, v in kwargs.items() if k in _SENT})


def _has_message(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("detail"), str) and len(body["detail"]) > 3


_KNOWN_SCHEMA_BUGS: set[tuple[str, str, int]] = set()  # (method, path, status) to skip the schema check for


_OPERATIONS: dict[int, list[Any]] = {}


def _operations(app: Any) -> list[Any]:
    if id(app) not in _OPERATIONS:  # loading and resolving the document takes seconds on a busy machine
        # from_dict, not from_asgi: from_asgi runs the app's lifespan (start + stop) around loading the document,
        # which would stop the service the module's client started.
        schema = schemathesis.openapi.from_dict(app.openapi())
        _OPERATIONS[id(app)] = [result.ok() for result in schema.get_all_operations()]
    return _OPERATIONS[id(app)]


def test_openapi_lists_every_endpoint(app_client: tuple[Any, TestClient]) -> None:
    app, _ = app_client
    found = {(op.method.upper(), op.path) for op in _operations(app)}
    assert found == {("POST", "/v1/predict"), ("POST", "/v1/predict/batch"), ("POST", "/v1/labels"),
                     ("GET", "/health"), ("GET", "/ready"), ("GET", "/v1/model"), ("POST", "/admin/reload")}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_answers_without_5xx_and_every_4xx_has_a_message(
        app_client: tuple[Any, TestClient], mode: GenerationMode) -> None:
    app, client = app_client
    statuses: dict[str, dict[int, int]] = {}
    for op in _operations(app):
        if mode is GenerationMode.NEGATIVE and not (op.body or op.query or op.headers):
            continue  # nothing to make invalid

        @_SETTINGS
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = _send(client, case)
            method, path = case.operation.method.upper(), case.operation.path
            seen = statuses.setdefault(f"{method} {path}", {})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            # /ready answers 503 by contract when degraded; every other 5xx is a failure.
            if not (path == "/ready" and response.status_code == 503):
                checks = [not_a_server_error, content_type_conformance, status_code_conformance]
                if (method, path, response.status_code) not in _KNOWN_SCHEMA_BUGS:
                    checks.append(response_schema_conformance)
                case.validate_response(response, checks=checks)
            if 400 <= response.status_code < 500:
                assert _has_message(response), (response.status_code, response.text)

        check()
    # The fuzzer reached the service: every operation was called, and (positive mode) valid events were scored.
    assert len(statuses) >= (7 if mode is GenerationMode.POSITIVE else 4), statuses
    if mode is GenerationMode.POSITIVE:
        assert statuses["POST /v1/predict"].get(200, 0) > 0, statuses


@pytest.mark.parametrize("route", ["labels", "predict"])
def test_an_out_of_range_time_is_refused_and_does_not_degrade_the_service(
        app_client: tuple[Any, TestClient], fuzz_project: Project, route: str) -> None:
    _, client = app_client
    event = to_event(fuzz_project.transactions.iloc[-1])
    assert client.get("/ready").status_code == 200
    if route == "labels":
        r = client.post("/v1/labels", json={"labels": [{"event_id": event["transaction_id"], "label": 1,
                                                        "at": "0001-01-01T00:00:00"}]})
    else:
        r = client.post("/v1/predict", json={**event, "tx_datetime": "0001-01-01T00:00:00"})
    ready = client.get("/ready")
    # Restore a healthy store for the other tests (a good event clears the error) before asserting.
    client.post("/v1/predict", json=event)
    assert ready.status_code == 200, ready.json()
    assert r.status_code == 422, r.text
    assert ("tx_datetime" if route == "predict" else "labels[0].at") in r.json()["detail"]


def test_model_description_matches_its_documented_schema(app_client: tuple[Any, TestClient]) -> None:
    app, client = app_client
    op = next(o for o in _operations(app) if o.path == "/v1/model")
    case = op.Case()
    case.validate_response(client.get("/v1/model"), checks=[response_schema_conformance])


def test_admin_422_matches_its_documented_schema(app_client: tuple[Any, TestClient]) -> None:
    app, client = app_client
    op = next(o for o in _operations(app) if o.path == "/admin/reload")
    case = op.Case(query={"force": "maybe"}, headers={"X-API-Key": API_KEY})
    response = client.post("/admin/reload", params={"force": "maybe"}, headers={"X-API-Key": API_KEY})
    assert response.status_code == 422
    case.validate_response(response, checks=[response_schema_conformance])


# --- spec loader -----------------------------------------------------------------------------------------
_keys = st.sampled_from(["project", "decision", "data", "features", "split", "models", "serving", "monitoring",
                         "name", "question", "positive_class", "source", "label", "timestamp", "costs",
                         "false_negative", "label_delay", "windows", "entity", "aggregates", "schema", "ranges",
                         "min", "max", "port", "candidates", "abstain_band", "rule", "1", "", "root"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                     st.text(string.printable, max_size=12),
                     st.sampled_from(["7d", "0", "-1d", "1e400d", "tx_amount > 220", "lightgbm", "x +", "int"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


def _valid_base() -> dict[str, Any]:
    return {"project": {"name": "p"}, "decision": {"question": "q?", "positive_class": "fraud"},
            "data": {"source": "t.csv", "label": "y", "timestamp": "t"}}


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(content=st.dictionaries(_keys, _values, max_size=6))
def test_arbitrary_spec_content_is_a_spec_or_a_spec_error(content: dict[str, Any]) -> None:
    try:
        parse_spec(content)
    except SpecError as exc:
        assert str(exc).strip()


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(section=st.sampled_from(["project", "decision", "data", "features", "split", "models", "serving",
                                "monitoring"]),
       patch=st.dictionaries(_keys, _values, max_size=4))
def test_arbitrary_section_patches_on_a_valid_spec_are_a_spec_or_a_spec_error(section: str,
                                                                               patch: dict[str, Any]) -> None:
    content = _valid_base()
    merged = {**content.get(section, {}), **patch}
    content[section] = merged
    try:
        spec = parse_spec(content)
    except SpecError as exc:
        assert "keel.toml" in str(exc)
    else:
        assert isinstance(spec, Spec)


# --- data contracts ----------------------------------------------------------------------------------------
def _column(kind: str, n: int) -> st.SearchStrategy[list[Any]]:
    if kind == "int":
        return st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=n, max_size=n)
    if kind == "float":
        return st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), min_size=n, max_size=n)
    if kind == "time":
        times = st.datetimes(min_value=pd.Timestamp("1990-01-01").to_pydatetime(),
                             max_value=pd.Timestamp("2200-01-01").to_pydatetime())
        return st.lists(st.one_of(st.none(), times), min_size=n, max_size=n)
    return st.lists(st.one_of(st.none(), st.text(string.printable, max_size=8)), min_size=n, max_size=n)


@st.composite
def _frames(draw: Any) -> pd.DataFrame:
    n = draw(st.integers(0, 6))
    names = ["transaction_id", "tx_datetime", "customer_id", "terminal_id", "tx_amount", "tx_fraud", "extra"]
    kinds = {"transaction_id": "int", "tx_datetime": "time", "customer_id": "int", "terminal_id": "int",
             "tx_amount": "float", "tx_fraud": "int", "extra": "text"}
    frame: dict[str, Any] = {}
    for name in names:
        if draw(st.booleans()) and draw(st.booleans()):
            continue  # a quarter of the columns go missing
        kind = draw(st.sampled_from([kinds[name], kinds[name], "text", "float", "int"]))
        frame[name] = draw(_column(kind, n))
    return pd.DataFrame(frame)


@pytest.fixture(scope="module")
def contract_spec(tmp_path_factory: pytest.TempPathFactory) -> Spec:
    from keel.spec import load_spec

    return load_spec(Path(__file__).resolve().parents[2] / "examples" / "card-fraud" / "keel.toml")


@settings(max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(frame=_frames(), fmt=st.sampled_from(["csv", "parquet"]))
def test_arbitrary_small_frames_give_a_contract_report(contract_spec: Spec, tmp_path_factory: Any,
                                                       frame: pd.DataFrame, fmt: str) -> None:
    folder = tmp_path_factory.mktemp("contract")
    path = folder / f"t.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        try:
            frame.to_parquet(path, index=False)
        except Exception:  # pyarrow refuses some mixed-type object columns: not a frame a source can hold
            return
    try:
        source = open_source(path)
        report = check_contract(contract_spec, source)
    except SpecError:
        raise
    except Exception as exc:
        from keel.errors import DataError

        # An unreadable file is a DataError naming it; nothing else may escape.
        assert isinstance(exc, DataError), repr(exc)
        assert str(path) in str(exc)
        return
    assert isinstance(report, ContractReport)
    assert report.rows == len(frame) or math.isnan(report.rows)
    if len(frame) == 0:
        assert not report.ok
    for finding in report.findings:
        assert finding.column and finding.message
