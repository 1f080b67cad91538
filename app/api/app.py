"""The coordinator's FastAPI application: ``create_app()`` (uvicorn factory), its
middleware and error handlers.

The routes live in app.api.routers, one router per domain; they are thin: authenticate (the
dependencies of app.api.deps), parse (pydantic), call one Coordinator method, which owns its
transactions. Every route declares its response model and its error responses.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api import dashboard
from app.api.docs import install_offline_docs
from app.api.metrics import SwarmCollector
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.api.routers import model, ops, placements, scenario, servers, sessions
from app.logging import configure_logging, get_logger
from app.service.audit import audit
from app.service.coordinator import Coordinator
from app.service.errors import ServiceError
from app.settings import Settings

log = get_logger("bprr.api")


def create_app(
    settings: Settings | None = None,
    clock: Callable[[], float] | None = None,
    background: bool = True,
) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_json)
    coordinator = Coordinator(settings, clock=clock or time.time)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Synchronous routes (database work) share this many threads; the rest wait.
        to_thread.current_default_thread_limiter().total_tokens = settings.thread_pool_size
        coordinator.start(background=background)
        # Everything built at start (modules, the app, OR-Tools/numpy internals) lives for the
        # whole process: keep it out of the collector's full scans, whose pauses showed up
        # as route latency outliers.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            coordinator.close()

    app = FastAPI(
        title="bprr coordinator",
        version="0.1.0",
        description="Block placement and request routing for a PETALS-style swarm.",
        lifespan=lifespan,
        docs_url=None,  # served from package data by install_offline_docs (air-gapped sites)
        redoc_url=None,
    )
    install_offline_docs(app)
    app.state.coordinator = coordinator
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)

    registry = CollectorRegistry()
    registry.register(SwarmCollector(coordinator))
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=False
    )

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        if error.status_code in (401, 403):
            audit(
                "auth_failed",
                method=request.method,
                route=request.url.path,
                status=error.status_code,
                reason=error.message,
            )
        return JSONResponse(
            {"detail": error.message}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        headers = dict(error.headers or {})
        if error.status_code == 400:  # an unparsable body: a validation error like any other
            return JSONResponse({"detail": f"body: {error.detail}"}, status_code=422)
        if error.status_code == 405:
            # Starlette lists only the first matching route's methods; list them all.
            methods: set[str] = set()
            for route in app.router.routes:
                if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
                    methods.update(route.methods or ())
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(
            {"detail": error.detail}, status_code=error.status_code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's shape (a list naming each field by its location), kept as is.
        return JSONResponse({"detail": _jsonable(error.errors())}, status_code=422)

    for router in (
        ops.router,
        model.router,
        servers.router,
        placements.router,
        sessions.router,
        scenario.router,
    ):
        app.include_router(router)
    dashboard.install(app)  # GET /, /v1/overview, /v1/routes/recent
    return app


def _jsonable(value: Any) -> Any:
    """Validation errors echo the input, which may hold NaN or exceptions: make it JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):  # lone surrogates cannot be encoded as UTF-8: escape them
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
