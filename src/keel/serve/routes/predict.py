"""``POST /v1/predict``, ``POST /v1/predict/batch`` and ``POST /v1/labels``; request models come from the spec.

The prediction routes validate the raw body with the spec's pydantic models in one call
(``model_validate_json``: parsing and validation in pydantic-core, no intermediate Python dicts) and answer with
pre-serialised JSON (orjson). Same models, same error messages as FastAPI's own body handling (a validation
error is re-raised as FastAPI's ``RequestValidationError`` with the ``body`` location), at a fraction of the
per-request cost; OpenAPI still documents the request models (``openapi_extra``) and the response models.

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


def _json_response(content: Any) -> Response:
    # NaN cannot occur in an answer (a non-finite score is a model error and the fallback answers).
    return Response(orjson.dumps(content), media_type="application/json")


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Validate the request body against ``model`` (pydantic-core parses the JSON); 422 names the field."""
    body = await request.body()
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
        event = await parse_body(request, Event)
        out = await service.answer([event.model_dump()], request.state.request_id, endpoint="predict",
                                   started=_started(request))
        request.state.outcome = "fallback" if out[0]["fallback"] else "ok"
        request.state.summary = {"fallback": out[0]["fallback"], "model_version": out[0]["model_version"]}
        return _json_response(out[0])

    @router.post("/predict/batch", response_model=BatchPredictResponse, responses=errors,
                 openapi_extra=request_body(Batch.__name__))
    async def predict_batch(request: Request, service: ServiceDep) -> Any:
        """Score events in order (up to serving.max_batch); earlier events count in later events' features."""
        started = _started(request)
        batch = await parse_body(request, Batch)
        events = batch.model_dump()["events"]  # one pydantic-core call for the whole batch
        out = await service.answer(events, request.state.request_id, endpoint="batch", started=started)
        fallbacks = sum(o["fallback"] for o in out)
        request.state.outcome = "fallback" if fallbacks else "ok"
        request.state.summary = {"events": len(out), "fallbacks": fallbacks}
        return _json_response({"request_id": request.state.request_id, "data": out, "count": len(out),
                               "latency_ms": round((time.perf_counter() - started) * 1000.0, 3)})

    @router.post("/labels", response_model=LabelResponse, responses=errors)
    async def labels(request: Request, service: ServiceDep, body: Labels) -> Any:
        """Record labels that became known after their events (feeds label features and monitoring)."""
        count, known = service.add_labels([(item.event_id, item.label, item.at) for item in body.labels])
        request.state.summary = {"labels": count, "known": known}
        return {"count": count, "known": known}

    return router
