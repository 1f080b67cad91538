"""The operator dashboard: ``GET /`` (one static page, no build step) and the two read-only
public routes it needs beyond the others: ``GET /v1/overview`` and ``GET /v1/routes/recent``.

The page itself (app/api/static/) polls only public GET routes: /v1/overview, /v1/servers,
/v1/model, /v1/placements/current and /v1/routes/recent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from app.service.activity import RecentRouteOut
from app.service.coordinator import Coordinator
from app.service.overview import OverviewOut, overview

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _coordinator(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


CoordinatorDep = Annotated[Coordinator, Depends(_coordinator)]


def dashboard_page() -> HTMLResponse:
    return HTMLResponse(
        (STATIC_DIR / "index.html").read_text(encoding="utf-8"),
        headers={"Cache-Control": "no-cache"},
    )


def dashboard_script() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.js", media_type=ASSETS["dashboard.js"])


def dashboard_style() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.css", media_type=ASSETS["dashboard.css"])


def get_overview(coordinator: CoordinatorDep) -> OverviewOut:
    """The swarm at a glance: sites and their RTTs, per-block live coverage, sessions and
    this process's booking counters."""
    return overview(coordinator)


def recent_routes(
    coordinator: CoordinatorDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    kind: Literal["route", "booked", "rejected"] | None = None,
) -> list[RecentRouteOut]:
    """This process's latest route answers, bookings and refused bookings, newest first
    (an in-memory ring buffer; every replica keeps its own)."""
    return coordinator.activity.recent(limit, None if kind is None else {kind})


def install(app: FastAPI) -> None:
    """Add the dashboard's routes to the app as its own routes (not an included router, so
    that the app's 405 handler sees them when it lists the allowed methods)."""
    app.add_api_route("/", dashboard_page, include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/dashboard/dashboard.js", dashboard_script, include_in_schema=False)
    app.add_api_route("/dashboard/dashboard.css", dashboard_style, include_in_schema=False)
    app.add_api_route("/v1/overview", get_overview, tags=["dashboard"], response_model=OverviewOut)
    app.add_api_route(
        "/v1/routes/recent",
        recent_routes,
        tags=["dashboard"],
        response_model=list[RecentRouteOut],
    )
