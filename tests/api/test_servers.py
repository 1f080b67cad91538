"""Model, registration, heartbeats and leases through the HTTP API (SQLite and PostgreSQL)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import FakeClock, admin, bearer
from tests.api.helpers import SMALL_MODEL, heartbeat, register, server_body


def test_model_is_admin_only_and_round_trips(client: TestClient) -> None:
    assert client.get("/v1/model").status_code == 404
    assert client.put("/v1/model", json=SMALL_MODEL).status_code == 401
    assert client.put("/v1/model", json=SMALL_MODEL, headers=bearer("nope")).status_code == 403
    response = client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    assert response.status_code == 200
    got = client.get("/v1/model").json()
    assert got["num_blocks"] == 8 and got["overheads"]["per_token_ms"] == 10


def test_bad_model_names_the_field(client: TestClient) -> None:
    bad = dict(SMALL_MODEL, num_blocks=0)
    response = client.put("/v1/model", json=bad, headers=admin())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "num_blocks"
    assert client.get("/v1/model").status_code == 404  # nothing written


def test_registration_needs_the_join_token(client: TestClient) -> None:
    assert client.post("/v1/servers", json=server_body(0)).status_code == 401
    response = client.post("/v1/servers", json=server_body(0), headers=bearer("wrong"))
    assert response.status_code == 403
    assert client.get("/v1/servers").json() == []


def test_nan_memory_is_rejected_naming_the_field(client: TestClient) -> None:
    raw = (
        '{"site": "east", "memory_gb": NaN, "decode_ms_per_block": 1, '
        '"address": "x:1", "boot_epoch": 0}'
    )
    response = client.post(
        "/v1/servers",
        content=raw,
        headers={"Authorization": "Bearer join-secret", "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert "memory_gb" in response.json()["detail"][0]["loc"]


def test_heartbeat_renews_the_lease_and_reports_the_span(
    client: TestClient, clock: FakeClock
) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    token = register(client, server_body(0))
    listed = client.get("/v1/servers/s0").json()
    assert listed["lease"] == "live" and listed["state"] == "joining"
    clock.advance(10)
    reply = heartbeat(client, "s0", token, None, state="joining")
    assert reply.status_code == 200
    assert reply.json()["assigned_span"] is None and reply.json()["generation"] == 0
    clock.advance(10)  # 20 s after registration, 10 s after the heartbeat: still live
    assert client.get("/v1/servers/s0").json()["lease"] == "live"
    clock.advance(6)
    assert client.get("/v1/servers/s0").json()["lease"] == "expired"
    # Idempotent: the same heartbeat twice leaves the same state.
    first = heartbeat(client, "s0", token, {"start": 0, "end": 4}).json()
    second = heartbeat(client, "s0", token, {"start": 0, "end": 4}).json()
    assert first == second
    detail = client.get("/v1/servers/s0").json()
    assert detail["lease"] == "live" and detail["loaded_span"] == {"start": 0, "end": 4}
    # 6 GB - 4 blocks x 1 GB leaves 2 GB = 10 cache slots of 0.2 GB
    assert detail["cache_slots"] == 10


def test_a_server_heartbeats_only_as_itself(client: TestClient) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    token0 = register(client, server_body(0))
    register(client, server_body(1))
    assert heartbeat(client, "s1", token0, None).status_code == 403
    body = {"boot_epoch": 1, "state": "online"}
    assert client.post("/v1/servers/s1/heartbeat", json=body).status_code == 401
    assert heartbeat(client, "nobody", token0, None).status_code == 404


def test_older_boot_epoch_is_refused(client: TestClient) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    token = register(client, server_body(0, boot_epoch=5))
    response = heartbeat(client, "s0", token, None, boot_epoch=4)
    assert response.status_code == 409 and "boot_epoch" in response.json()["detail"]
    # A live id re-registers with its own token (whatever its epoch); the old token stops
    # working.
    again = client.post("/v1/servers", json=server_body(0, boot_epoch=6), headers=bearer(token))
    assert again.status_code == 201, again.text
    fresh = again.json()["token"]
    assert heartbeat(client, "s0", token, None, boot_epoch=6).status_code == 403
    assert heartbeat(client, "s0", fresh, None, boot_epoch=6).status_code == 200


def test_loaded_span_past_the_model_is_refused(client: TestClient) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    token = register(client, server_body(0))
    response = heartbeat(client, "s0", token, {"start": 2, "end": 9})
    assert response.status_code == 422 and "loaded_span.end" in response.json()["detail"]
    reversed_span = heartbeat(client, "s0", token, {"start": 5, "end": 3})
    assert reversed_span.status_code == 422
    assert client.get("/v1/servers/s0").json()["loaded_span"] is None


def test_graceful_leave(client: TestClient) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    token = register(client, server_body(0))
    other = register(client, server_body(1))
    assert client.delete("/v1/servers/s0", headers=bearer(other)).status_code == 403
    assert client.delete("/v1/servers/s0", headers=bearer(token)).status_code == 204
    assert client.get("/v1/servers/s0").status_code == 404
    assert [s["id"] for s in client.get("/v1/servers").json()] == ["s1"]


def test_rtts_bulk_with_ewma_and_validation(client: TestClient) -> None:
    client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    register(client, server_body(0, site="east"))
    register(client, server_body(1, site="west"))
    entries = [{"a": "east", "b": "west", "rtt_ms": 100}, {"a": "s0", "b": "ghost", "rtt_ms": 5}]
    response = client.put("/v1/rtts", json={"entries": entries}, headers=admin())
    assert response.status_code == 422 and "entries[1].b" in response.json()["detail"]
    negative = [{"a": "east", "b": "west", "rtt_ms": -1}]
    response = client.put("/v1/rtts", json={"entries": negative}, headers=admin())
    assert response.status_code == 422 and "rtt_ms" in response.json()["detail"][0]["loc"]
    assert client.put("/v1/rtts", json={"entries": entries[:1]}).status_code == 401
    ok = client.put("/v1/rtts", json={"entries": entries[:1]}, headers=admin())
    assert ok.status_code == 200 and ok.json() == {"updated": 1}
    again = [{"a": "west", "b": "east", "rtt_ms": 200}]
    client.put("/v1/rtts", json={"entries": again}, headers=admin())
    scenario = client.get("/v1/scenario").json()
    east, west = scenario["sites"].index("east"), scenario["sites"].index("west")
    # The first failed batch wrote nothing; then 100, then EWMA(0.3) with 200 -> 130.
    assert abs(scenario["site_rtt_ms"][east][west] - 130.0) < 1e-9
