"""GET /v1/model (public), PUT /v1/model (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.api.routing import AuthBeforeBodyRoute
from app.service.schemas import ModelIn, ModelOut

router = APIRouter(tags=["model"], route_class=AuthBeforeBodyRoute)


@router.get(
    "/v1/model",
    summary="Read the served model",
    description=(
        "The model the swarm serves: its blocks, their memory and cache cost, the token "
        "limits and the per-request overheads the planner and routes use. Public: no "
        "token. 404: no model is set yet."
    ),
    response_description="The model and when it was last set",
    response_model=ModelOut,
    responses=errors(404),
)
def get_model(coordinator: CoordinatorDep) -> ModelOut:
    return coordinator.get_model()


@router.put(
    "/v1/model",
    summary="Set the served model",
    description=(
        "Replaces the model (there is one per swarm) and asks the planner for a new "
        "placement; servers learn their new spans from their next heartbeat.\n\n"
        "**Token**: the admin token. 401 without a token, 403 with another one (or none "
        "configured: `BPRR_ADMIN_TOKEN`), 422: a malformed body (the field is named)."
    ),
    response_description="The model as stored",
    response_model=ModelOut,
    responses=errors(401, 403, 422),
    dependencies=[AdminOnly],
)
def put_model(coordinator: CoordinatorDep, body: ModelIn) -> ModelOut:
    return coordinator.set_model(body)
