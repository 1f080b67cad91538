"""The dashboard's routes in-process: the page and its assets, GET /v1/overview and
GET /v1/routes/recent (the ring buffer of route and booking decisions)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.api.dashboard import STATIC_DIR
from app.service.activity import RouteLog
from app.service.schemas import RouteHop, RouteOut
from tests.api.conftest import FakeClock, admin, example_scenario

BOOKING = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 64}


def test_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/dashboard.js">' in page.text
    assert 'href="/dashboard/dashboard.css"' in page.text
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "setInterval(refresh, POLL_MS)" in script.text
    style = client.get("/dashboard/dashboard.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert client.get("/dashboard/other.js").status_code == 404
    assert client.get("/dashboard/index.html").status_code == 404  # only the listed assets
    # The charting library ships with the page (no CDN), and the page loads it from here.
    assert '<script src="/dashboard/uPlot.iife.min.js">' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        asset = client.get(f"/dashboard/{name}")
        assert asset.status_code == 200 and asset.content == (STATIC_DIR / name).read_bytes()
    # The page is not part of the API schema; the three read-only routes are.
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert {"/v1/overview", "/v1/routes/recent", "/v1/history"} <= set(paths)
    # Read-only: other methods are 405 with the allowed ones listed.
    for path in ("/", "/v1/overview", "/v1/routes/recent", "/v1/history"):
        refused = client.post(path)
        assert refused.status_code == 405 and refused.headers["allow"] == "GET", path


def test_the_script_reads_only_public_get_routes(client: TestClient) -> None:
    script = (STATIC_DIR / "dashboard.js").read_text()
    assert "method:" not in script and "Authorization" not in script
    fetched = re.findall(r'getJSON\("([^"?]+)', script)
    assert len(fetched) == 6
    paths = client.get("/openapi.json").json()["paths"]
    gets = {path for path, operations in paths.items() if "get" in operations}
    for path in fetched:
        assert path in gets, path
        # Public: no bearer token needed (404/409 only say "nothing yet").
        assert client.get(path).status_code in {200, 404, 409}, path


def test_overview_of_an_empty_coordinator(client: TestClient) -> None:
    body = client.get("/v1/overview").json()
    assert body["generation"] == 0 and body["num_blocks"] is None
    assert body["sites"] == [] and body["site_rtts"] == [] and body["block_servers"] == []
    assert body["active_sessions"] == 0 and body["coverage"] == 0.0
    assert body["lease_ttl_s"] == 15.0 and body["heartbeat_interval_s"] == 5.0


def test_overview_follows_the_swarm(client: TestClient, clock: FakeClock) -> None:
    loaded = client.post("/v1/scenario", json=example_scenario(), headers=admin())
    assert loaded.status_code == 201, loaded.text
    body = client.get("/v1/overview").json()
    assert body["generation"] == loaded.json()["generation"] == 1
    assert body["num_blocks"] == 70 and len(body["block_servers"]) == 70
    assert min(body["block_servers"]) >= 1 and body["coverage"] == 1.0
    placed = [s for s in client.get("/v1/servers").json() if s["assigned_span"] is not None]
    assert body["live_servers"] == 9 and body["routable_servers"] == len(placed) >= 1
    sites = {s["name"]: s for s in body["sites"]}
    assert set(sites) == {"cluster0", "cluster1", "cluster2"}
    assert sites["cluster1"]["servers"] == ["a100-0", "a100-1"]
    assert len(sites["cluster2"]["servers"]) == 7
    assert sites["cluster0"]["client_share"] == 1.0 and sites["cluster1"]["client_share"] == 0.0
    assert sites["cluster0"]["internal_rtt_ms"] == 5.0
    assert {(r["a"], r["b"], r["rtt_ms"], r["measured"]) for r in body["site_rtts"]} == {
        ("cluster0", "cluster1", 100.0, True),
        ("cluster0", "cluster2", 100.0, True),
        ("cluster1", "cluster2", 100.0, True),
    }
    session = client.post("/v1/sessions", json=BOOKING)
    assert session.status_code == 201, session.text
    # Token-granular cache: k blocks x (input + output tokens) units per hop.
    blocks = sum(hop["end"] - hop["start"] for hop in session.json()["route"]["hops"])
    held = blocks * (BOOKING["input_tokens"] + BOOKING["output_tokens"])
    after = client.get("/v1/overview").json()
    assert after["active_sessions"] == 1 and after["sessions_booked"] == 1
    assert after["reserved_slots"] == held
    # Leases run out: nothing is live or routable any more, and coverage drops to zero.
    clock.advance(20)
    expired = client.get("/v1/overview").json()
    assert expired["live_servers"] == 0 and expired["routable_servers"] == 0
    assert max(expired["block_servers"]) == 0 and expired["coverage"] == 0.0


def test_recent_routes_record_queries_bookings_and_refusals(
    client: TestClient, clock: FakeClock
) -> None:
    assert client.get("/v1/routes/recent").json() == []
    assert client.post("/v1/scenario", json=example_scenario(), headers=admin()).status_code == 201
    route = client.get("/v1/routes", params=BOOKING)
    assert route.status_code == 200
    booked = client.post("/v1/sessions", json=BOOKING)
    assert booked.status_code == 201
    clock.advance(20)  # every lease expires: the next booking is refused
    refused = client.post("/v1/sessions", json=BOOKING)
    assert refused.status_code == 503

    recent = client.get("/v1/routes/recent").json()
    assert [r["kind"] for r in recent] == ["rejected", "booked", "route"]
    assert [r["seq"] for r in recent] == [3, 2, 1]
    rejected, booking, query = recent
    assert rejected["hops"] == [] and rejected["generation"] is None and rejected["detail"]
    assert rejected["at"] == clock.now
    assert booking["session_id"] is None  # public: session ids are never shown
    assert booked.json()["id"] not in client.get("/v1/routes/recent").text
    assert booking["hops"] == booked.json()["route"]["hops"]
    assert booking["per_token_ms"] == booked.json()["route"]["per_token_ms"]
    assert query["hops"] == route.json()["hops"] and query["session_id"] is None
    assert query["first_token_ms"] == route.json()["first_token_ms"]

    only_booked = client.get("/v1/routes/recent", params={"kind": "booked"}).json()
    assert [r["seq"] for r in only_booked] == [2]
    assert len(client.get("/v1/routes/recent", params={"limit": 1}).json()) == 1
    for bad in ({"limit": 0}, {"limit": 201}, {"kind": "other"}):
        response = client.get("/v1/routes/recent", params=bad)
        assert response.status_code == 422
        assert next(iter(bad)) in response.text


def test_route_log_is_bounded() -> None:
    log = RouteLog(capacity=3)
    route = RouteOut(
        generation=4,
        client_site="x",
        hops=[RouteHop(server_id="s", address="a", start=0, end=2)],
        first_token_ms=1.0,
        per_token_ms=2.0,
        total_ms=3.0,
        wait_ms=0.0,
    )
    for i in range(5):
        log.routed(float(i), route)
    recent = log.recent(10)
    assert [r.seq for r in recent] == [5, 4, 3] and [r.at for r in recent] == [4.0, 3.0, 2.0]
    assert recent[0].generation == 4 and recent[0].hops[0].end == 2
    with pytest.raises(ValueError, match="capacity"):
        RouteLog(capacity=0)
