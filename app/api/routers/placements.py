"""Placements: POST (admin) solves and publishes a generation; GETs are public (with an ETag
on the current one)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Response

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.api.routing import AuthBeforeBodyRoute
from app.service.schemas import PlacementOut, PlacementRequest

router = APIRouter(tags=["placements"], route_class=AuthBeforeBodyRoute)


@router.post(
    "/v1/placements",
    summary="Solve and publish a placement now",
    description=(
        "Solves the block placement for the servers with a live lease (with the chosen "
        "algorithm, concurrency and time limit; an empty body takes the defaults) and "
        "publishes it as a new generation, whatever the background planner would have "
        "decided. Servers load their new spans after their next heartbeat.\n\n"
        "**Token**: the admin token. 401 without a token, 403 with another one, 409: no "
        "model, no live server, or the live servers cannot hold the model; 422: a "
        "malformed body."
    ),
    response_description="The published placement (its generation, spans and solve figures)",
    status_code=201,
    response_model=PlacementOut,
    responses=errors(401, 403, 409, 422),
    dependencies=[AdminOnly],
)
def post_placement(
    coordinator: CoordinatorDep,
    body: Annotated[
        PlacementRequest | None,
        Body(description="How to solve (optional: the defaults without a body)"),
    ] = None,
) -> PlacementOut:
    return coordinator.compute_placement(body or PlacementRequest())


@router.get(
    "/v1/placements/current",
    summary="Read the published placement",
    description=(
        "The latest published generation: each server's span and the predicted per-token "
        'time. The reply carries an `ETag` (`"gen-<generation>"`): send it back in '
        "`If-None-Match` to get a 304 without a body while the generation is unchanged. "
        "Public: no token. 404: nothing published yet."
    ),
    response_description="The placement (with its ETag)",
    response_model=PlacementOut,
    responses={304: {"description": "Not modified (ETag matches)"}, **errors(404, 422)},
)
def current_placement(
    coordinator: CoordinatorDep,
    response: Response,
    if_none_match: Annotated[
        str | None,
        Header(
            max_length=200,
            description="ETags from an earlier reply: 304 when one is the current generation's",
            examples=['"gen-3"'],
        ),
    ] = None,
) -> Any:
    generation = coordinator.current_generation()
    etag = f'"gen-{generation}"'
    if generation > 0 and if_none_match is not None and etag in _etags(if_none_match):
        return Response(status_code=304, headers={"ETag": etag})
    placement = coordinator.get_placement(None)
    response.headers["ETag"] = f'"gen-{placement.generation}"'
    return placement


@router.get(
    "/v1/placements/{generation}",
    summary="Read a placement by generation",
    description=(
        "A published generation, current or past (what was planned when, and why). "
        "Public: no token. 404: no such generation."
    ),
    response_description="The placement",
    response_model=PlacementOut,
    responses=errors(404, 422),
)
def get_placement(
    coordinator: CoordinatorDep,
    generation: Annotated[
        int,
        Path(
            ge=1, le=2**31 - 1, description="The placement's generation (1, 2, ...)", examples=[1]
        ),
    ],
) -> PlacementOut:
    return coordinator.get_placement(generation)


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}
