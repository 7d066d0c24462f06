"""``GET /health``, ``GET /ready``, ``GET /v1/model``, ``GET /metrics``."""

from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keel.serve.routes.deps import ServiceDep
from keel.serve.schemas import HealthResponse, ModelResponse, ReadyResponse


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health", response_model=HealthResponse)
    async def health() -> Any:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready(service: ServiceDep) -> Any:
        """Readiness: a model is loaded and answering, and the online store works; 503 with reasons if not."""
        reasons = service.readiness()
        loaded = service.loaded
        body = {"status": "degraded" if reasons else "ready", "reasons": reasons,
                "model_version": loaded.version if loaded else None}
        return JSONResponse(body, status_code=503) if reasons else body

    @router.get("/v1/model", response_model=ModelResponse)
    async def model(service: ServiceDep) -> Any:
        """The model being served: version, alias, threshold, training data reference and test metrics."""
        return service.model_description()

    @router.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
    async def dashboard(service: ServiceDep) -> Any:
        """The monitoring report over this service's prediction log (self-contained HTML; computed on request)."""
        from keel.monitor.report import dashboard_html

        return HTMLResponse(await run_in_threadpool(dashboard_html, service.spec))

    @router.get("/metrics", include_in_schema=False)
    async def metrics(service: ServiceDep) -> Response:
        if service.predlog is not None:
            # Set when scraped, not per request (two gauge locks per answer).
            service.metrics.log_pending.set(service.predlog.pending)
            service.metrics.log_dropped.set(service.predlog.dropped)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
