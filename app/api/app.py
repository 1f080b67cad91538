"""The coordinator's FastAPI application: ``create_app()`` (uvicorn factory) and its routes.

Routes are thin: parse (pydantic), authenticate (bearer tokens), call one Coordinator method,
which owns one transaction. Every route declares its response model and its error responses.
"""

from __future__ import annotations

import gc
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import dashboard
from app.api.metrics import SwarmCollector
from app.logging import configure_logging, get_logger
from app.service.coordinator import Coordinator
from app.service.errors import ServiceError
from app.service.schemas import (
    ErrorOut,
    Heartbeat,
    HeartbeatOut,
    ModelIn,
    ModelOut,
    PlacementOut,
    PlacementRequest,
    Readiness,
    RegistrationOut,
    RouteOut,
    RttsIn,
    RttsOut,
    ScenarioLoadOut,
    ServerOut,
    ServerRegistration,
    SessionIn,
    SessionOut,
    ValidationErrorOut,
)
from app.settings import Settings

log = get_logger("bprr.api")
_T = TypeVar("_T")
bearer = HTTPBearer(auto_error=False, description="Admin, join or per-server token")
IdPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a /v1 route: ``codes``, 422 for a malformed request, and 503
    (every route needs the database; an unreachable one is a 503 with Retry-After)."""
    declared: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in codes}
    declared[422] = {"model": ValidationErrorOut}
    declared[503] = {"model": ErrorOut}
    return declared


class RequestIdMiddleware:
    """Give every request an id (X-Request-ID, echoed back) bound into structlog's context."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
        request_id = request_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Paths only: query strings and headers (tokens) are never logged.
            log.debug(
                "request",
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id")


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return None if credentials is None else credentials.credentials


Token = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


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

    async def _write(call: Callable[..., _T], *args: Any) -> _T:
        # Bookings and releases on the embedded SQLite are short library calls serialised by
        # the coordinator's writer lock: run them on the event loop, where handing them to the
        # thread pool cost more than the write. A networked database gets the thread pool.
        if coordinator.embedded_database:
            return call(*args)
        return await run_in_threadpool(call, *args)

    app = FastAPI(
        title="bprr coordinator",
        version="0.1.0",
        description="Block placement and request routing for a PETALS-style swarm.",
        lifespan=lifespan,
    )
    app.state.coordinator = coordinator
    app.add_middleware(RequestIdMiddleware)

    registry = CollectorRegistry()
    registry.register(SwarmCollector(coordinator))
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, endpoint="/metrics", include_in_schema=False
    )

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
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

    # --- operations --------------------------------------------------------------------------

    @app.get("/livez", tags=["ops"], response_model=dict[str, str])
    def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz", tags=["ops"], response_model=Readiness, responses={503: {"model": Readiness}}
    )
    def readyz(response: Response) -> Readiness:
        database, at_head, detail = coordinator.readiness()
        ready = database and at_head
        if not ready:
            response.status_code = 503
        return Readiness(
            status="ready" if ready else "not ready",
            database=database,
            schema_at_head=at_head,
            detail=detail,
        )

    # --- model -------------------------------------------------------------------------------

    @app.get("/v1/model", tags=["model"], response_model=ModelOut, responses=_errors(404))
    def get_model() -> ModelOut:
        return coordinator.get_model()

    @app.put("/v1/model", tags=["model"], response_model=ModelOut, responses=_errors(401, 403))
    def put_model(body: ModelIn, credentials: Token) -> ModelOut:
        coordinator.check_admin(_token(credentials))
        return coordinator.set_model(body)

    # --- servers -----------------------------------------------------------------------------

    @app.post(
        "/v1/servers",
        tags=["servers"],
        status_code=201,
        response_model=RegistrationOut,
        responses=_errors(401, 403, 409),
    )
    def register_server(body: ServerRegistration, credentials: Token) -> RegistrationOut:
        return coordinator.register_server(body, _token(credentials))

    @app.get("/v1/servers", tags=["servers"], response_model=list[ServerOut])
    def list_servers() -> list[ServerOut]:
        return coordinator.list_servers()

    @app.get(
        "/v1/servers/{server_id}",
        tags=["servers"],
        response_model=ServerOut,
        responses=_errors(404),
    )
    def get_server(server_id: IdPath) -> ServerOut:
        return coordinator.get_server(server_id)

    @app.delete(
        "/v1/servers/{server_id}",
        tags=["servers"],
        status_code=204,
        response_class=Response,
        responses=_errors(401, 403, 404),
    )
    def leave(server_id: IdPath, credentials: Token) -> Response:
        coordinator.leave(server_id, _token(credentials))
        return Response(status_code=204)

    @app.post(
        "/v1/servers/{server_id}/heartbeat",
        tags=["servers"],
        response_model=HeartbeatOut,
        responses=_errors(401, 403, 404, 409),
    )
    async def heartbeat(server_id: IdPath, body: Heartbeat, credentials: Token) -> HeartbeatOut:
        token = _token(credentials)
        # Most heartbeats only renew the lease: answered from memory on the event loop and
        # written behind in batches; the rest (state or span changes, RTTs, speeds, a token
        # the view does not know) go to the thread pool and the database.
        quick = coordinator.quiet_heartbeat(server_id, token, body)
        if quick is not None:
            return quick
        return await run_in_threadpool(coordinator.heartbeat, server_id, token, body)

    # --- measurements ---------------------------------------------------------------------------

    @app.put("/v1/rtts", tags=["measurements"], response_model=RttsOut, responses=_errors(401, 403))
    def put_rtts(body: RttsIn, credentials: Token) -> RttsOut:
        coordinator.check_measurer(_token(credentials))
        return RttsOut(updated=coordinator.put_rtts(body.entries))

    # --- placements ----------------------------------------------------------------------------

    @app.post(
        "/v1/placements",
        tags=["placements"],
        status_code=201,
        response_model=PlacementOut,
        responses=_errors(401, 403, 409),
    )
    def post_placement(credentials: Token, body: PlacementRequest | None = None) -> PlacementOut:
        coordinator.check_admin(_token(credentials))
        return coordinator.compute_placement(body or PlacementRequest())

    @app.get(
        "/v1/placements/current",
        tags=["placements"],
        response_model=PlacementOut,
        responses={304: {"description": "Not modified (ETag matches)"}, **_errors(404)},
    )
    def current_placement(
        response: Response,
        if_none_match: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Any:
        generation = coordinator.current_generation()
        etag = f'"gen-{generation}"'
        if generation > 0 and if_none_match is not None and etag in _etags(if_none_match):
            return Response(status_code=304, headers={"ETag": etag})
        placement = coordinator.get_placement(None)
        response.headers["ETag"] = f'"gen-{placement.generation}"'
        return placement

    @app.get(
        "/v1/placements/{generation}",
        tags=["placements"],
        response_model=PlacementOut,
        responses=_errors(404),
    )
    def get_placement(generation: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> PlacementOut:
        return coordinator.get_placement(generation)

    # --- routes and sessions -------------------------------------------------------------------

    @app.get("/v1/routes", tags=["routes"], response_model=RouteOut, responses=_errors(409))
    async def get_route(
        client_site: Annotated[str, Query(min_length=1, max_length=200)],
        input_tokens: Annotated[int, Query(ge=0, le=10_000_000)],
        output_tokens: Annotated[int, Query(ge=1, le=10_000_000)],
    ) -> RouteOut:
        # Runs on the event loop, not the thread pool: a route is ~0.2 ms of CPU on the
        # in-memory view (refreshed in the background), and the thread hop cost more than that.
        return coordinator.route(client_site, input_tokens, output_tokens)

    @app.post(
        "/v1/sessions",
        tags=["routes"],
        status_code=201,
        response_model=SessionOut,
        responses=_errors(409),
    )
    async def book(body: SessionIn) -> SessionOut:
        return await _write(coordinator.book, body)

    @app.delete(
        "/v1/sessions/{session_id}",
        tags=["routes"],
        status_code=204,
        response_class=Response,
        responses=_errors(404),
    )
    async def release(session_id: IdPath) -> Response:
        await _write(coordinator.release, session_id)
        return Response(status_code=204)

    # --- scenario snapshot -----------------------------------------------------------------------

    @app.get(
        "/v1/scenario", tags=["scenario"], response_model=dict[str, Any], responses=_errors(409)
    )
    def get_scenario(include_expired: bool = False) -> dict[str, Any]:
        return coordinator.export_scenario(include_expired)

    @app.post(
        "/v1/scenario",
        tags=["scenario"],
        status_code=201,
        response_model=ScenarioLoadOut,
        responses=_errors(401, 403, 409),
    )
    def post_scenario(
        credentials: Token,
        scenario: Annotated[dict[str, Any], Body(description="A scenario (SCENARIO.md)")],
        online: bool = True,
        lease_s: Annotated[float, Query(gt=0, le=31_536_000, allow_inf_nan=False)] = 15.0,
    ) -> ScenarioLoadOut:
        coordinator.check_admin(_token(credentials))
        return coordinator.load_scenario(scenario, online, lease_s)

    dashboard.install(app)  # GET /, /v1/overview, /v1/routes/recent
    return app


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}


def _jsonable(value: Any) -> Any:
    """Validation errors echo the input, which may hold NaN or exceptions: make it JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
