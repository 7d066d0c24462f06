"""``POST /admin/reload``: follow the alias now. Needs header ``X-API-Key`` equal to env ``KEEL_API_KEY``."""

import asyncio
import hmac
import os
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request

from keel.serve.routes.deps import ServiceDep
from keel.serve.schemas import ErrorResponse, ReloadResponse

API_KEY_ENV = "KEEL_API_KEY"


def require_api_key(key: str | None) -> None:
    """401 without the right key, 503 when the server has none configured. The key itself is never logged."""
    expected = os.environ.get(API_KEY_ENV, "")
    if not expected:
        raise HTTPException(503, detail=f"Admin endpoints are disabled: set {API_KEY_ENV} on the server.")
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, detail="Missing or wrong X-API-Key header.")


def admin_router() -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["admin"])

    @router.post("/reload", response_model=ReloadResponse,
                 responses={401: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                            503: {"model": ErrorResponse}})
    async def reload(request: Request, service: ServiceDep,
                     x_api_key: Annotated[str | None, Header(description=f"Equal to env {API_KEY_ENV}.")] = None,
                     force: bool = False) -> Any:
        """Load the version the alias points at now and swap it in without dropping requests."""
        require_api_key(x_api_key)
        loop = asyncio.get_running_loop()
        try:
            previous, current, changed = await loop.run_in_executor(None, service.reload, force)
        except Exception as exc:
            loaded = service.loaded
            raise HTTPException(
                503, detail=f"Reload failed; still serving {loaded.version if loaded else 'no model'}: {exc}"
            ) from None
        request.state.summary = {"previous": previous, "version": current, "changed": changed}
        return {"previous": previous, "version": current, "changed": changed}

    return router
