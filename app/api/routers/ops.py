"""Liveness and readiness probes (no authentication: they reveal nothing)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import CoordinatorDep
from app.service.schemas import Readiness

router = APIRouter(tags=["ops"])


@router.get("/livez", response_model=dict[str, str])
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(coordinator: CoordinatorDep, response: Response) -> Readiness:
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
