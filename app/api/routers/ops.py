"""Liveness and readiness probes (no authentication: they reveal nothing)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import CoordinatorDep
from app.service.schemas import Readiness

router = APIRouter(tags=["ops"])


@router.get(
    "/livez",
    summary="Liveness probe",
    description=(
        'Answers `{"status": "ok"}` while the process serves requests; it reads nothing '
        "(a database outage does not fail it). Public: no token."
    ),
    response_description="The process is alive",
    response_model=dict[str, str],
)
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness probe",
    description=(
        "200 when the database answers and its schema is at the migrations' head, 503 "
        "otherwise (with what is wrong in `detail`): a load balancer sends traffic only to "
        "ready coordinators. Public: no token."
    ),
    response_description="Ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready (database or schema)"}},
)
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
