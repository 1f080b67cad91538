"""GET /v1/model (public), PUT /v1/model (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.service.schemas import ModelIn, ModelOut

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelOut, responses=errors(404))
def get_model(coordinator: CoordinatorDep) -> ModelOut:
    return coordinator.get_model()


@router.put(
    "/v1/model", response_model=ModelOut, responses=errors(401, 403), dependencies=[AdminOnly]
)
def put_model(coordinator: CoordinatorDep, body: ModelIn) -> ModelOut:
    return coordinator.set_model(body)
