"""Shared route dependencies."""

from typing import Annotated

from fastapi import Depends, Request

from keel.serve.service import Service


async def get_service(request: Request) -> Service:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop on every request.
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]

# Error bodies the routes document in OpenAPI.
ERRORS = {413: {"description": "Body larger than serving.max_body_bytes"},
          422: {"description": "Invalid event: the detail names the field"}}
