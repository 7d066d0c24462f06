"""HTTP routes: ``predict`` (events and labels), ``ops`` (health, readiness, model, metrics), ``admin`` (reload)."""

from keel.serve.routes.admin import admin_router
from keel.serve.routes.ops import ops_router
from keel.serve.routes.predict import predict_router

__all__ = ["admin_router", "ops_router", "predict_router"]
