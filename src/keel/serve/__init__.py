"""Serving: raw event in, decision out (FastAPI), with online features, fallback, hot model swap and a log.

Example::

    from keel.serve import PathProvider, create_app
    app = create_app(spec, PathProvider("runs/model"))   # uvicorn keel-app; or keel.serve.run(spec, ...)
"""

from keel.serve.app import create_app, run
from keel.serve.fallback import FallbackRule
from keel.serve.predlog import PredictionLog, iter_predictions, read_labels, read_predictions
from keel.serve.provider import ModelProvider, PathProvider, RegistryProvider
from keel.serve.schemas import build_request_models, event_fields

__all__ = [
    "FallbackRule",
    "ModelProvider",
    "PathProvider",
    "PredictionLog",
    "RegistryProvider",
    "build_request_models",
    "create_app",
    "event_fields",
    "iter_predictions",
    "read_labels",
    "read_predictions",
    "run",
]
