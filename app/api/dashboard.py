"""The operator dashboard: ``GET /`` (one static page, no build step) and the three
read-only public routes it needs beyond the others: ``GET /v1/overview``,
``GET /v1/routes/recent`` and ``GET /v1/history``.

The page itself (app/api/static/) polls only public GET routes: /v1/overview, /v1/servers,
/v1/model, /v1/placements/current, /v1/routes/recent and /v1/history; it draws its charts
with uPlot, served from package data like the page (no CDN).

The history is a ring buffer per process, sampled every ``HISTORY_INTERVAL_S`` by a thread
that runs inside the app's lifespan (started and stopped with the app).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from app.api.routers.params import UNAVAILABLE
from app.logging import get_logger
from app.service.activity import History, HistoryOut, RecentRouteOut
from app.service.coordinator import Coordinator
from app.service.overview import OverviewOut, generation_times, overview, record_history
from app.service.schemas import ValidationErrorOut

log = get_logger("bprr.dashboard")
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only files served under /dashboard/ (name -> media type).
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
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


def dashboard_asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no dashboard asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name])


def _history(request: Request) -> History:
    history: History = request.app.state.history
    return history


def get_overview(coordinator: CoordinatorDep) -> OverviewOut:
    """The swarm at a glance: sites and their RTTs, per-block live coverage, sessions and
    this process's booking counters. Public: no token; 503: the database is unreachable."""
    return overview(coordinator)


def recent_routes(
    coordinator: CoordinatorDep,
    limit: Annotated[
        int, Query(ge=1, le=200, description="At most this many, newest first", examples=[50])
    ] = 50,
    kind: Annotated[
        Literal["route", "booked", "rejected"] | None,
        Query(description="Only this kind (default: all three)", examples=["rejected"]),
    ] = None,
) -> list[RecentRouteOut]:
    """This process's latest route answers, bookings and refused bookings, newest first
    (an in-memory ring buffer; every replica keeps its own). Public: no token; 422: a bad
    ``limit`` or ``kind``."""
    return coordinator.activity.recent(limit, None if kind is None else {kind})


def get_history(
    history: Annotated[History, Depends(_history)],
    limit: Annotated[
        int,
        Query(ge=1, le=10_000, description="At most this many latest samples", examples=[900]),
    ] = 900,
) -> HistoryOut:
    """The swarm over time, sampled by this process (a ring buffer; every replica keeps its
    own): routable servers, coverage, active sessions, queue depth, bookings and refusals
    per interval, mean queue wait; re-plans (a new generation, with its reason when the
    placement code recorded one); per generation the predicted per-token time and the
    measured one when clients reported it. Public: no token; 422: a bad ``limit``."""
    return history.out(limit, generation_times())


def _sample_until(stop: threading.Event, coordinator: Coordinator, history: History) -> None:
    while True:
        try:
            record_history(coordinator, history)
        except Exception as error:  # an outage: skip this sample, keep sampling
            log.warning("history sample skipped", error=str(error) or type(error).__name__)
        if stop.wait(history.interval_s):
            return


def _with_sampler(app: FastAPI, history: History) -> None:
    """Run the history sampler inside the app's lifespan (after the coordinator starts,
    stopped before it closes), on a thread of its own: a sample may read the database, and
    the event loop and the request thread pool are left to requests."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with inner(target) as state:
            stop = threading.Event()
            thread = threading.Thread(
                target=_sample_until,
                args=(stop, app.state.coordinator, history),
                name="bprr-history",
                daemon=True,
            )
            thread.start()
            try:
                yield state
            finally:
                stop.set()
                await run_in_threadpool(thread.join, 30)

    app.router.lifespan_context = lifespan


def install(app: FastAPI, history: History | None = None) -> None:
    """Add the dashboard's routes to the app as its own routes (not an included router, so
    that the app's 405 handler sees them when it lists the allowed methods), and the history
    sampler to its lifespan."""
    app.state.history = history or History()
    _with_sampler(app, app.state.history)
    app.add_api_route("/", dashboard_page, include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/dashboard/{name}", dashboard_asset, include_in_schema=False)
    app.add_api_route(
        "/v1/overview",
        get_overview,
        tags=["dashboard"],
        summary="The swarm at a glance",
        response_description="Counts, coverage, sites, their RTTs and the bottleneck",
        response_model=OverviewOut,
        responses={503: UNAVAILABLE},
    )
    app.add_api_route(
        "/v1/routes/recent",
        recent_routes,
        tags=["dashboard"],
        summary="Latest routes, bookings and refusals",
        response_description="Routes, bookings and refusals, newest first",
        response_model=list[RecentRouteOut],
        responses={422: {"model": ValidationErrorOut}},
    )
    app.add_api_route(
        "/v1/history",
        get_history,
        tags=["dashboard"],
        summary="The swarm over time",
        response_description="Samples, re-plans and per-generation times",
        response_model=HistoryOut,
        responses={422: {"model": ValidationErrorOut}},
    )
