"""Routes and sessions: GET /v1/routes, POST /v1/sessions, DELETE /v1/sessions/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import CoordinatorDep, IdPath, errors, run_write
from app.service.schemas import RouteOut, SessionIn, SessionOut

router = APIRouter(tags=["routes"])


@router.get("/v1/routes", response_model=RouteOut, responses=errors(409))
async def get_route(
    coordinator: CoordinatorDep,
    client_site: Annotated[str, Query(min_length=1, max_length=200)],
    input_tokens: Annotated[int, Query(ge=0, le=10_000_000)],
    output_tokens: Annotated[int, Query(ge=1, le=10_000_000)],
) -> RouteOut:
    # Runs on the event loop, not the thread pool: a route is ~0.2 ms of CPU on the
    # in-memory view (refreshed in the background), and the thread hop cost more than that.
    return coordinator.route(client_site, input_tokens, output_tokens)


@router.post("/v1/sessions", status_code=201, response_model=SessionOut, responses=errors(409))
async def book(coordinator: CoordinatorDep, body: SessionIn) -> SessionOut:
    return await run_write(coordinator, coordinator.book, body)


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses=errors(404),
)
async def release(coordinator: CoordinatorDep, session_id: IdPath) -> Response:
    await run_write(coordinator, coordinator.release, session_id)
    return Response(status_code=204)
