"""The scenario snapshot: GET (public export), POST (admin: replace the swarm)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.service.schemas import ScenarioLoadOut

router = APIRouter(tags=["scenario"])


@router.get("/v1/scenario", response_model=dict[str, Any], responses=errors(409))
def get_scenario(coordinator: CoordinatorDep, include_expired: bool = False) -> dict[str, Any]:
    return coordinator.export_scenario(include_expired)


@router.post(
    "/v1/scenario",
    status_code=201,
    response_model=ScenarioLoadOut,
    responses=errors(401, 403, 409),
    dependencies=[AdminOnly],
)
def post_scenario(
    coordinator: CoordinatorDep,
    scenario: Annotated[dict[str, Any], Body(description="A scenario (SCENARIO.md)")],
    online: bool = True,
    lease_s: Annotated[float, Query(gt=0, le=31_536_000, allow_inf_nan=False)] = 15.0,
) -> ScenarioLoadOut:
    return coordinator.load_scenario(scenario, online, lease_s)
