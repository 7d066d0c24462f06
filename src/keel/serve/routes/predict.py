"""``POST /v1/predict``, ``POST /v1/predict/batch`` and ``POST /v1/labels``; request models come from the spec.

The prediction routes validate the raw body with the spec's pydantic models in one call
(``model_validate_json``: parsing and validation in pydantic-core, no intermediate Python dicts) and answer with
pre-serialised JSON (orjson). Same models, same error messages as FastAPI's own body handling (a validation
error is re-raised as FastAPI's ``RequestValidationError`` with the ``body`` location), at a fraction of the
per-request cost; OpenAPI still documents the request models (``openapi_extra``) and the response models.
In a running app the service middleware answers ``POST`` to both prediction paths itself through the same
:func:`predict_body` (no routing or dependency resolution per request); these routes document them and answer
when the app is used without that middleware.

No ``from __future__ import annotations`` here: FastAPI reads the (generated, local) model classes from the
annotations at definition time.
"""

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from keel.serve.routes.deps import ERRORS, ServiceDep
from keel.serve.schemas import (
    BatchPredictResponse,
    ErrorResponse,
    LabelResponse,
    PredictResponse,
    RequestModels,
)


def _started(request: Request) -> float:
    return getattr(request.state, "started", None) or time.perf_counter()


def _json_response(content: bytes) -> Response:
    return Response(content, media_type="application/json")


def validate_body(body: bytes, model: type[BaseModel]) -> Any:
    """Validate a raw request body against ``model`` (pydantic-core parses the JSON); raises FastAPI's
    ``RequestValidationError`` (``body`` location, input not echoed) so the 422 names the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            e = dict(e)
            e["loc"] = ("body", *e.get("loc", ()))
            e.pop("input", None)  # never echo (possibly large) input back into logs
            errors.append(e)
        raise RequestValidationError(errors, body=None) from None


async def predict_body(service: Any, models: RequestModels, endpoint: str, body: bytes, request_id: str,
                       started: float, state: dict[str, Any]) -> bytes:
    """The JSON answer of ``POST /v1/predict`` (``endpoint="predict"``) or ``/v1/predict/batch`` (``"batch"``) to
    a raw body; sets the request's ``outcome`` and log ``summary`` in ``state`` (the ASGI scope's state).

    Shared by the FastAPI routes and the middleware's fast path (:class:`keel.serve.app.ServiceMiddleware`), so
    both answer byte for byte the same. Raises ``RequestValidationError`` for an invalid body.
    """
    # NaN cannot occur in an answer (a non-finite score is a model error and the fallback answers).
    if endpoint == "predict":
        event = validate_body(body, models.event)
        out = await service.answer([event.model_dump()], request_id, endpoint="predict", started=started)
        first = out[0]
        state["outcome"] = "fallback" if first["fallback"] else "ok"
        state["summary"] = {"fallback": first["fallback"], "model_version": first["model_version"]}
        return orjson.dumps(first)
    # Well-formed batches are validated column by column (keel.serve.columns); anything else, errors included,
    # goes through the request models.
    parsed = models.columns.parse(body) if models.columns is not None else None
    if parsed is not None:
        out = await service.answer_columns(*parsed, request_id, started=started)
    else:
        batch = validate_body(body, models.batch)
        events = batch.model_dump()["events"]  # one pydantic-core call for the whole batch
        out = await service.answer(events, request_id, endpoint="batch", started=started)
    fallbacks = sum(o["fallback"] for o in out)
    state["outcome"] = "fallback" if fallbacks else "ok"
    state["summary"] = {"events": len(out), "fallbacks": fallbacks}
    return orjson.dumps({"request_id": request_id, "data": out, "count": len(out),
                         "latency_ms": round((time.perf_counter() - started) * 1000.0, 3)})


def request_body(name: str) -> dict[str, Any]:
    """OpenAPI ``requestBody`` referring to a component schema (added by :func:`add_request_schemas`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def request_schemas(models: RequestModels) -> dict[str, Any]:
    """Component schemas of the request models (with the models they nest), for the OpenAPI document."""
    out: dict[str, Any] = {}
    for model in (models.event, models.batch, models.labels):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def predict_router(models: RequestModels) -> APIRouter:
    """The prediction routes for one spec's request models."""
    router = APIRouter(prefix="/v1", tags=["predict"])
    Event: Any = models.event
    Batch: Any = models.batch
    Labels: Any = models.labels
    errors: Any = {code: {**doc, "model": ErrorResponse} for code, doc in ERRORS.items()}

    @router.post("/predict", response_model=PredictResponse, responses=errors,
                 openapi_extra=request_body(Event.__name__))
    async def predict(request: Request, service: ServiceDep) -> Any:
        """Score one raw event: online features, model, threshold; the fallback rule answers if the model cannot."""
        started = _started(request)
        return _json_response(await predict_body(service, models, "predict", await request.body(),
                                                 request.state.request_id, started, request.scope.setdefault("state", {})))

    @router.post("/predict/batch", response_model=BatchPredictResponse, responses=errors,
                 openapi_extra=request_body(Batch.__name__))
    async def predict_batch(request: Request, service: ServiceDep) -> Any:
        """Score events in order (up to serving.max_batch); earlier events count in later events' features."""
        started = _started(request)
        return _json_response(await predict_body(service, models, "batch", await request.body(),
                                                 request.state.request_id, started, request.scope.setdefault("state", {})))

    @router.post("/labels", response_model=LabelResponse, responses=errors)
    async def labels(request: Request, service: ServiceDep, body: Labels) -> Any:
        """Record labels that became known after their events (feeds label features and monitoring)."""
        count, known = service.add_labels([(item.event_id, item.label, item.at) for item in body.labels])
        request.state.summary = {"labels": count, "known": known}
        return {"count": count, "known": known}

    return router
