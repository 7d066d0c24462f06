"""Shared route dependencies."""

from typing import Annotated

from fastapi import Depends, Request

from keel.serve.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


ServiceDep = Annotated[Service, Depends(get_service)]

# Error bodies the routes document in OpenAPI.
ERRORS = {413: {"description": "Body larger than serving.max_body_bytes"},
          422: {"description": "Invalid event: the detail names the field"}}
