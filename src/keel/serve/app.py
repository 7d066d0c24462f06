"""The FastAPI app factory and the uvicorn runner behind ``keel serve``.

Example::

    spec = load_spec("examples/card-fraud/keel.toml")
    app = create_app(spec, PathProvider("runs/model"))     # default: the registry alias serving.alias
    run(spec, model_path="runs/model")                      # what `keel serve --model runs/model` calls

Endpoints: ``POST /v1/predict``, ``POST /v1/predict/batch``, ``POST /v1/labels``, ``GET /health``,
``GET /ready``, ``GET /v1/model``, ``GET /metrics``, ``POST /admin/reload``; OpenAPI at ``/docs``.
Every request gets an id (``X-Request-ID``, accepted from the caller when well-formed) and one JSON log line on
the ``keel.serve.access`` logger; headers (and so the API key) are never logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.errors import ServingError
from keel.serve.metrics import ServiceMetrics
from keel.serve.provider import ModelProvider, PathProvider, RegistryProvider
from keel.serve.routes import admin_router, ops_router, predict_router
from keel.serve.routes.predict import predict_body, request_schemas
from keel.serve.schemas import RequestModels, build_request_models
from keel.serve.service import Service

access_log = logging.getLogger("keel.serve.access")
log = logging.getLogger("keel.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_ENDPOINTS = {
    "/v1/predict": "predict", "/v1/predict/batch": "batch", "/v1/labels": "labels", "/health": "health",
    "/ready": "ready", "/v1/model": "model", "/metrics": "metrics", "/admin/reload": "admin_reload",
}
_FAST = {"/v1/predict": "predict", "/v1/predict/batch": "batch"}
_INTERNAL = {"detail": "Internal error; see the service log.", "errors": []}
_OUTCOMES = {401: "unauthorized", 404: "not_found", 405: "not_found", 413: "too_large", 422: "invalid",
             503: "unavailable"}


class _RequestIds:
    """Request ids unique across processes and restarts: a random per-process prefix and a counter
    (``uuid4()`` per request costs an ``os.urandom`` system call)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"  # 32 hex digits, like uuid4().hex


class ServiceMiddleware:
    """Request id, body-size limit (Content-Length and streamed size), latency, metrics, one JSON log line.

    A pure ASGI middleware (no per-request task or body copy, unlike ``BaseHTTPMiddleware``). Given the
    ``service`` and its request ``models``, it answers ``POST /v1/predict`` and ``/v1/predict/batch`` itself, with
    the routes' own code (:func:`~keel.serve.routes.predict.predict_body`) and the app's error bodies: FastAPI's
    routing and dependency resolution cost more CPU per request than scoring the event.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: ServiceMetrics, service: Service | None = None,
                 models: RequestModels | None = None) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.metrics = metrics
        self.service = service
        self.models = models
        self.new_id = _RequestIds()
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if given and _REQUEST_ID.match(given) else self.new_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        endpoint = _ENDPOINTS.get(scope["path"], "other")

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await self._too_large(send_wrapper, request_id)
            else:
                received = 0

                async def limited_receive() -> Message:
                    nonlocal received
                    message = await receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > self.max_body:
                            # FastAPI re-raises HTTPException from body reading; the handler answers 413.
                            raise HTTPException(413, detail=self._too_large_text())
                    return message

                fast = _FAST.get(scope["path"]) if self.models is not None else None
                if fast is not None and scope.get("method") == "POST" and not scope.get("root_path"):
                    await self._predict(fast, limited_receive, send_wrapper, request_id, started, state)
                else:
                    await self.app(scope, limited_receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            outcome = state.get("outcome") or (
                "ok" if status < 400 else _OUTCOMES.get(status, "error" if status >= 500 else "invalid"))
            counter = self._counters.get((endpoint, outcome))
            if counter is None:  # labelled children cached: .labels() takes a lock and builds a key each time
                counter = self._counters[(endpoint, outcome)] = self.metrics.requests.labels(endpoint, outcome)
            counter.inc()
            histogram = self._histograms.get(endpoint)
            if histogram is None:
                histogram = self._histograms[endpoint] = self.metrics.latency.labels(endpoint)
            histogram.observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                line = {"event": "request", "request_id": request_id, "method": scope.get("method"),
                        "path": scope["path"], "status": status, "outcome": outcome,
                        "latency_ms": round(elapsed * 1000.0, 3), **state.get("summary", {})}
                access_log.info(orjson.dumps(line, default=str).decode())

    async def _predict(self, endpoint: str, receive: Receive, send: Send, request_id: str, started: float,
                       state: dict[str, Any]) -> None:
        """The prediction routes without FastAPI: same answers, status codes and error bodies as the app's
        exception handlers give (422 for an invalid body, 413 for a streamed body over the limit)."""
        status = 200
        try:
            body = await _read_body(receive)
            content = await predict_body(self.service, self.models, endpoint,  # type: ignore[arg-type]
                                         body, request_id, started, state)
        except RequestValidationError as exc:
            status, content = 422, JSONResponse(_invalid(state, exc)).body
        except StarletteHTTPException as exc:  # the streamed body went over the limit
            status, content = exc.status_code, JSONResponse({"detail": str(exc.detail), "errors": []}).body
        except ClientDisconnect:
            return
        except Exception:  # a bug: answered as the app's handler for unexpected errors does
            log.exception(json.dumps({"event": "unhandled", "request_id": request_id}))
            status, content = 500, JSONResponse(_INTERNAL).body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    def _too_large_text(self) -> str:
        return f"Request body is larger than serving.max_body_bytes ({self.max_body} bytes)."

    async def _too_large(self, send: Send, request_id: str) -> None:
        body = json.dumps({"detail": self._too_large_text(), "errors": [{"field": "body", "message":
                           self._too_large_text()}]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class KeelAPI(FastAPI):
    """FastAPI with a front door: ``POST /v1/predict`` and ``/v1/predict/batch`` go straight to ``fast_path`` (the
    service middleware), past Starlette's and FastAPI's outer middlewares (error, telemetry and body-limit layers,
    about a tenth of a prediction's CPU in the event loop). Everything else, lifespan included, is FastAPI's."""

    fast_path: ServiceMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_path
        if (fast is not None and scope["type"] == "http" and scope["path"] in _FAST
                and scope.get("method") == "POST" and not self.root_path and not scope.get("root_path")):
            await fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    """The whole request body, as ``Request.body()`` reads it (raising ``ClientDisconnect`` if the client left)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _invalid(state: dict[str, Any], exc: RequestValidationError) -> dict[str, Any]:
    """The 422 body of an invalid request; its detail goes to the access log line."""
    body = _validation_body(exc)
    state["summary"] = {"detail": body["detail"][:300]}
    return body


def _field(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc:
        if isinstance(item, int):
            if loc[0] == "body" and not parts and len(loc) == 2:
                continue  # a JSON decode position, not a list index
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif str(item).startswith(("function-", "constrained-", "lax-", "strict-")) or item in ("int", "str"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or (str(loc[0]) if loc else "body")


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    errors = []
    for e in exc.errors():
        loc = tuple(e.get("loc", ()))
        message = str(e.get("msg", "is invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            message = f"Body is not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})."
        errors.append({"field": _field(loc), "message": message})
    # One line naming each field once (a union type reports one error per member).
    unique = list(dict.fromkeys(f"{e['field']}: {e['message']}" for e in errors))
    return {"detail": "; ".join(unique[:5]) + (f" (and {len(unique) - 5} more)" if len(unique) > 5 else ""),
            "errors": errors[:50]}


def create_app(spec: Any, provider: ModelProvider | None = None, *, store: Any = None,
               prediction_log: str | None = None, freeze_gc: bool = False) -> FastAPI:
    """Build the service for a spec.

    ``provider`` defaults to :class:`RegistryProvider` on ``serving.alias``. ``store`` is an open
    :class:`~keel.features.online.OnlineStore` (default: opened from the spec at startup and closed at shutdown).
    ``prediction_log`` overrides ``serving.prediction_log``. Nothing is loaded or opened until the app starts
    (lifespan); a model or store that cannot load leaves the service up and degraded, answering with the fallback.
    ``freeze_gc`` freezes the objects alive after startup out of the garbage collector's walks (what :func:`run`
    does: the serving process's tail latency; see :class:`~keel.serve.service.Service`).

    Raises :class:`~keel.errors.ServingError` for a configuration that cannot serve (e.g. a fallback rule reading
    a field that is neither in the request nor a feature).
    """
    if provider is None:
        provider = RegistryProvider(spec, spec.serving.alias)
    metrics = ServiceMetrics()
    service = Service(spec, provider, store=store, prediction_log=prediction_log, metrics=metrics,
                      freeze_gc=freeze_gc)
    models = build_request_models(spec)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        log.info(json.dumps({"event": "started", "model_version": service.loaded.version if service.loaded else None,
                             "degraded": service.readiness()}, default=str))
        try:
            yield
        finally:
            await service.stop()
            log.info(json.dumps({"event": "stopped", "logged": service.predlog.written if service.predlog else 0}))

    app = KeelAPI(
        title=f"Keel: {spec.project.name}",
        description=(f"{spec.decision.question}\n\nPOST a raw event to /v1/predict; the answer is "
                     f"'{spec.decision.positive_action}' or '{spec.decision.negative_action}' with a calibrated score."),
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.request_models = models
    app.include_router(predict_router(models))
    app.include_router(ops_router())
    app.include_router(admin_router())
    _document_request_models(app, models)
    # Every other request: its id, size limit, metrics and log line, then FastAPI's routing.
    app.add_middleware(ServiceMiddleware, max_body_bytes=spec.serving.max_body_bytes, metrics=metrics)
    # The prediction requests' own instance, which KeelAPI hands them to: it answers them all itself.
    app.fast_path = ServiceMiddleware(app.router, max_body_bytes=spec.serving.max_body_bytes, metrics=metrics,
                                      service=service, models=models)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_invalid(request.scope.setdefault("state", {}), exc), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "errors": []}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception(json.dumps({"event": "unhandled", "request_id": getattr(request.state, "request_id", None)}))
        return JSONResponse(_INTERNAL, status_code=500)

    return app


def _document_request_models(app: FastAPI, models: Any) -> None:
    """Add the request models to the OpenAPI components (the prediction routes validate their body themselves,
    so FastAPI does not see the models; their ``requestBody`` refers to these schemas)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model_schema in request_schemas(models).items():
                components.setdefault(name, model_schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- running ------------------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """Messages that are already JSON pass through; others are wrapped as ``{"level", "logger", "message"}``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        payload: Any = None
        if message.startswith("{") and message.endswith("}"):
            try:
                payload = orjson.loads(message)
            except orjson.JSONDecodeError:
                payload = None
        if not isinstance(payload, dict):
            payload = {"message": message}
        payload = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                   "logger": record.name, **payload}
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


def configure_logging(level: str = "info") -> None:
    """One JSON line per record on stderr for Keel's and uvicorn's loggers (called by :func:`run`, not on import)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("keel", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


_SPEC_ENV = "KEEL_SERVE_SPEC"
_MODEL_ENV = "KEEL_SERVE_MODEL"


def _app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (workers > 1 need an import string, not an app object)."""
    from keel.spec import parse_spec

    payload = json.loads(os.environ[_SPEC_ENV])
    spec = parse_spec(payload["content"], root=payload["root"])
    model = os.environ.get(_MODEL_ENV)
    configure_logging(payload.get("log_level", "info"))
    return create_app(spec, PathProvider(model) if model else None, freeze_gc=True)


def run(spec: Any, host: str | None = None, port: int | None = None, workers: int | None = None, *,
        model_path: str | Path | None = None, log_level: str = "info") -> None:
    """Serve with uvicorn until interrupted (what ``keel serve`` calls). Flags override ``[serving]``.

    ``model_path`` serves an artifact folder instead of the registry alias. More than one worker is refused
    when the spec has window features: each worker process would keep its own online-store cache, so an
    entity's windows would miss the events other workers saw.
    """
    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    host = host or spec.serving.host
    port = port or spec.serving.port
    workers = workers or spec.serving.workers
    if workers > 1 and spec.features.windows:
        raise ServingError(
            f"serving.workers = {workers} with window features: every worker keeps its own online-store state, so"
            " windows would miss events other workers handled.",
            hint="Use one worker per process (scale out with a router keyed by entity), or --workers 1.",
        )
    if model_path is not None:
        # An explicit path is a promise: refuse to start on a typo or a tampered folder, rather than serving the
        # fallback rule alone (a registry alias may legitimately have no model yet; a path may not).
        from keel.artifact import verify_manifest

        verify_manifest(Path(model_path))
    configure_logging(log_level)
    # uvicorn's default (5 s) is shorter than the idle timeouts of the proxies put in front of it (60-75 s), so
    # the server would close connections a client is about to reuse; a soak at 400 req/s saw 4 resets in 120,000.
    keep_alive = spec.serving.keep_alive_seconds
    if workers > 1:
        os.environ[_SPEC_ENV] = json.dumps({"content": spec.content(), "root": str(spec.root), "log_level": log_level})
        if model_path is not None:
            os.environ[_MODEL_ENV] = str(Path(model_path).resolve())
        uvicorn.run("keel.serve.app:_app_from_env", factory=True, host=host, port=port, workers=workers,
                    access_log=False, log_config=None, timeout_graceful_shutdown=10, timeout_keep_alive=keep_alive)
        return
    app = create_app(spec, PathProvider(model_path) if model_path is not None else None, freeze_gc=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                                           timeout_graceful_shutdown=10, timeout_keep_alive=keep_alive))
    # the requests uvicorn has taken in and not answered: the service's backlog (see Service._start_commit)
    app.state.service.backlog = server.server_state.tasks.__len__
    with suppress(KeyboardInterrupt):
        server.run()
    if not server.started:  # as uvicorn.run: the port taken, or the app's startup failed
        sys.exit(STARTUP_FAILURE)


__all__ = ["JsonFormatter", "KeelAPI", "ServiceMiddleware", "configure_logging", "create_app", "run"]
