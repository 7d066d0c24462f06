"""``POST /v1/predict``, ``POST /v1/predict/batch`` and ``POST /v1/labels``; request models come from the spec.

No ``from __future__ import annotations`` here: FastAPI reads the (generated, local) model classes from the
annotations at definition time.
"""

import time
from typing import Any

from fastapi import APIRouter, Request

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


def predict_router(models: RequestModels) -> APIRouter:
    """The prediction routes for one spec's request models."""
    router = APIRouter(prefix="/v1", tags=["predict"])
    Event: Any = models.event
    Batch: Any = models.batch
    Labels: Any = models.labels
    errors: Any = {code: {**doc, "model": ErrorResponse} for code, doc in ERRORS.items()}

    @router.post("/predict", response_model=PredictResponse, responses=errors)
    async def predict(request: Request, service: ServiceDep, event: Event) -> Any:
        """Score one raw event: online features, model, threshold; the fallback rule answers if the model cannot."""
        out = await service.answer([event.model_dump()], request.state.request_id, endpoint="predict",
                                   started=_started(request))
        request.state.outcome = "fallback" if out[0]["fallback"] else "ok"
        request.state.summary = {"fallback": out[0]["fallback"], "model_version": out[0]["model_version"]}
        return out[0]

    @router.post("/predict/batch", response_model=BatchPredictResponse, responses=errors)
    async def predict_batch(request: Request, service: ServiceDep, batch: Batch) -> Any:
        """Score events in order (up to serving.max_batch); earlier events count in later events' features."""
        started = _started(request)
        events = [e.model_dump() for e in batch.events]
        out = await service.answer(events, request.state.request_id, endpoint="batch", started=started)
        fallbacks = sum(o["fallback"] for o in out)
        request.state.outcome = "fallback" if fallbacks else "ok"
        request.state.summary = {"events": len(out), "fallbacks": fallbacks}
        return {"request_id": request.state.request_id, "data": out, "count": len(out),
                "latency_ms": round((time.perf_counter() - started) * 1000.0, 3)}

    @router.post("/labels", response_model=LabelResponse, responses=errors)
    async def labels(request: Request, service: ServiceDep, body: Labels) -> Any:
        """Record labels that became known after their events (feeds label features and monitoring)."""
        count, known = service.add_labels([(item.event_id, item.label, item.at) for item in body.labels])
        request.state.summary = {"labels": count, "known": known}
        return {"count": count, "known": known}

    return router
