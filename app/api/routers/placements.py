"""Placements: POST (admin) solves and publishes a generation; GETs are public (with an ETag
on the current one)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Response

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.service.schemas import PlacementOut, PlacementRequest

router = APIRouter(tags=["placements"])


@router.post(
    "/v1/placements",
    status_code=201,
    response_model=PlacementOut,
    responses=errors(401, 403, 409),
    dependencies=[AdminOnly],
)
def post_placement(
    coordinator: CoordinatorDep, body: PlacementRequest | None = None
) -> PlacementOut:
    return coordinator.compute_placement(body or PlacementRequest())


@router.get(
    "/v1/placements/current",
    response_model=PlacementOut,
    responses={304: {"description": "Not modified (ETag matches)"}, **errors(404)},
)
def current_placement(
    coordinator: CoordinatorDep,
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


@router.get("/v1/placements/{generation}", response_model=PlacementOut, responses=errors(404))
def get_placement(
    coordinator: CoordinatorDep, generation: Annotated[int, Path(ge=1, le=2**31 - 1)]
) -> PlacementOut:
    return coordinator.get_placement(generation)


def _etags(header: str) -> set[str]:
    return {part.strip().removeprefix("W/") for part in header.split(",")}
