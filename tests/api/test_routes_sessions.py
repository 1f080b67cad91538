"""Placements, routes, sessions (WS-RR bookings) and the scenario snapshot."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.allocation.scenario import parse_scenario
from tests.api.conftest import FakeClock, admin, bearer, example_scenario
from tests.api.helpers import SMALL_MODEL, heartbeat, route_params, small_swarm
from tests.api.test_session_security import units_by_server


def test_placements_are_generations_with_etag(client: TestClient) -> None:
    assert client.get("/v1/placements/current").status_code == 404
    small_swarm(client)
    assert client.post("/v1/placements", json={"algorithm": "cg"}).status_code == 401
    current = client.get("/v1/placements/current")
    assert current.status_code == 200 and current.json()["generation"] == 1
    etag = current.headers["ETag"]
    assert client.get("/v1/placements/current", headers={"If-None-Match": etag}).status_code == 304
    second = client.post("/v1/placements", json={"concurrency": 2}, headers=admin())
    assert second.status_code == 201 and second.json()["generation"] == 2
    assert second.json()["concurrency"] == 2
    assert second.json()["inputs"]["model"]["num_blocks"] == 8
    fresh = client.get("/v1/placements/current", headers={"If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.headers["ETag"] != etag
    assert client.get("/v1/placements/1").json()["generation"] == 1
    assert client.get("/v1/placements/99").status_code == 404
    # Every block is covered by the spans of the published placement.
    covered = set()
    for span in second.json()["spans"]:
        covered.update(range(span["start"], span["end"]))
    assert covered == set(range(8))


def test_infeasible_concurrency_is_a_clear_4xx(client: TestClient) -> None:
    small_swarm(client)
    response = client.post(
        "/v1/placements", json={"algorithm": "cg", "concurrency": 5000}, headers=admin()
    )
    assert response.status_code == 422
    assert "algorithm" in response.json()["detail"]


def test_route_uses_live_loaded_servers_only(client: TestClient, clock: FakeClock) -> None:
    tokens = small_swarm(client)
    route = client.get("/v1/routes", params=route_params())
    assert route.status_code == 200, route.text
    body = route.json()
    assert body["hops"][0]["start"] == 0 and body["hops"][-1]["end"] == 8
    assert body["first_token_ms"] > 0 and body["per_token_ms"] > 0 and body["wait_ms"] == 0
    used = {hop["server_id"] for hop in body["hops"]}
    # Let every used server's lease lapse while the others keep heartbeating.
    clock.advance(10)
    placement = client.get("/v1/placements/current").json()
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placement["spans"]}
    for server_id, token in tokens.items():
        if server_id not in used:
            heartbeat(client, server_id, token, spans.get(server_id))
    clock.advance(6)
    after = client.get("/v1/routes", params=route_params())
    if after.status_code == 200:
        assert not used & {hop["server_id"] for hop in after.json()["hops"]}
    else:
        assert after.status_code == 503 and "Retry-After" in after.headers


def test_route_rejects_unknown_site_and_too_many_tokens(client: TestClient) -> None:
    small_swarm(client)
    response = client.get("/v1/routes", params=route_params(site="mars"))
    assert response.status_code == 422 and "client_site" in response.json()["detail"]
    response = client.get("/v1/routes", params=route_params(inputs=101))
    assert response.status_code == 422 and "input_tokens" in response.json()["detail"]
    response = client.get("/v1/routes", params={"client_site": "east"})
    assert response.status_code == 422


def test_a_span_that_does_not_match_is_not_routed(client: TestClient) -> None:
    tokens = small_swarm(client, count=3)
    placement = client.get("/v1/placements/current").json()
    for span in placement["spans"]:
        # Every server reports a different span than assigned: nothing is routable.
        wrong = (
            {"start": span["start"], "end": span["end"] - 1}
            if span["end"] - span["start"] > 1
            else None
        )
        heartbeat(client, span["server_id"], tokens[span["server_id"]], wrong)
    assert client.get("/v1/routes", params=route_params()).status_code == 503


def _servers(client: TestClient) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in client.get("/v1/servers").json()}


def test_sessions_reserve_cache_until_full_then_503(
    client: TestClient, clock: FakeClock, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    booked = []
    for _ in range(200):
        response = client.post("/v1/sessions", json=route_params())
        if response.status_code != 201:
            break
        booked.append(response.json())
    assert booked, "at least one session fits"
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    servers = _servers(client)
    # Every booking holds its own tokens (50 + 50) on every block of its path.
    total = sum((hop["end"] - hop["start"]) * 100 for s in booked for hop in s["route"]["hops"])
    assert sum(s["reserved_slots"] for s in servers.values()) == total
    for server_id, (reserved, capacity) in units_by_server(database_url).items():
        assert reserved <= capacity, server_id
    # Releasing one session (with its token) makes room for exactly that booking again.
    path = f"/v1/sessions/{booked[0]['id']}"
    assert client.delete(path, headers=bearer(booked[0]["token"])).status_code == 204
    assert client.delete(path, headers=bearer(booked[0]["token"])).status_code == 404
    assert client.post("/v1/sessions", json=route_params()).status_code == 201
    # Sessions expire at predicted completion plus the grace period.
    clock.advance(max(s["expires_in_s"] for s in booked) + 1)
    # keep leases alive for the check
    assert client.app.state.coordinator.sweep_sessions() >= len(booked) - 1  # type: ignore[attr-defined]
    assert all(s["reserved_slots"] == 0 for s in _servers(client).values())


def test_waiting_time_sets_retry_after(client: TestClient) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    first = None
    while True:
        response = client.post("/v1/sessions", json=route_params(outputs=100))
        if response.status_code != 201:
            break
        first = first or response.json()
    assert first is not None
    assert response.status_code == 503
    # WS-RR: the wait is until the earliest session completes, within its expiry.
    assert 1 <= int(response.headers["Retry-After"]) <= int(first["expires_in_s"]) + 1
    route = client.get("/v1/routes", params=route_params(outputs=100)).json()
    assert route["wait_ms"] > 0


def test_scenario_round_trip(client: TestClient) -> None:
    original = example_scenario()
    loaded = client.post("/v1/scenario", json=original, headers=admin())
    assert loaded.status_code == 201, loaded.text
    assert {s["id"] for s in loaded.json()["servers"]} == {s["id"] for s in original["servers"]}
    assert loaded.json()["generation"] == 1
    exported = client.get("/v1/scenario").json()
    parsed = parse_scenario(exported)
    source = parse_scenario(original)
    assert parsed.model == source.model and parsed.requests == source.requests
    assert parsed.site_matrix() == source.site_matrix()
    assert [s.id for s in parsed.servers] == [s.id for s in source.servers]
    assert parsed.servers[0].memory_gb == source.servers[0].memory_gb
    assert parsed.client_server_rtt() == source.client_server_rtt()
    assert parsed.overheads == source.overheads
    # Loading what we exported gives the same export again.
    again = client.post("/v1/scenario", json=exported, headers=admin())
    assert again.status_code == 201
    assert parse_scenario(client.get("/v1/scenario").json()).model_dump() == parsed.model_dump()
    route = client.get("/v1/routes", params=route_params(site="cluster0", inputs=20, outputs=64))
    assert route.status_code == 200


def test_bad_scenario_is_422_naming_the_field(client: TestClient) -> None:
    bad = example_scenario()
    bad["servers"][2]["memory_gb"] = -3
    response = client.post("/v1/scenario", json=bad, headers=admin())
    assert response.status_code == 422 and "servers[2].memory_gb" in response.json()["detail"]
    assert client.post("/v1/scenario", json=example_scenario()).status_code == 401
    assert client.get("/v1/model").status_code == 404  # nothing written


def test_model_change_sets_a_replan_request(client: TestClient) -> None:
    small_swarm(client)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    assert coordinator.planner_tick() in {
        "steady",
        "kept (unchanged)",
        "kept (gain below hysteresis)",
    }
    changed = dict(SMALL_MODEL, max_output_tokens=50)
    client.put("/v1/model", json=changed, headers=admin())
    outcome = coordinator.planner_tick()
    assert outcome.startswith(("published", "kept"))


def test_a_smaller_model_before_its_replan_gets_no_route_and_no_error(client: TestClient) -> None:
    """The placement still published is for the old model: spans past the new model's last
    block serve nothing, so routes are refused (503) and heartbeats still answered."""
    tokens = small_swarm(client)
    assert client.get("/v1/routes", params=route_params()).status_code == 200
    smaller = dict(SMALL_MODEL, num_blocks=2)
    assert client.put("/v1/model", json=smaller, headers=admin()).status_code == 200
    beat = heartbeat(client, "s0", tokens["s0"], None, decode_ms_per_block=3.0)
    assert beat.status_code == 200, beat.text
    route = client.get("/v1/routes", params=route_params())
    assert route.status_code == 503, route.text
    assert client.post("/v1/sessions", json=route_params()).status_code == 503
