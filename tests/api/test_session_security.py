"""Who may do what with sessions (issue 12): the session token, client identity and quotas,
idempotent retries, public GETs without session ids, sessions through a lost server, and
token-granular bookings (issue 10). Each of these failed on the code before them."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.store.models import ModelRow, ServerRow
from tests.api.conftest import AppFactory, FakeClock, admin, bearer
from tests.api.helpers import heartbeat, route_params, small_swarm


def _book(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post("/v1/sessions", json={**route_params(), **body}, headers=headers or {})


def units_by_server(url: str) -> dict[str, tuple[int, int]]:
    """server id -> (reserved units, capacity in units from its memory and loaded span)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            model = connection.execute(select(ModelRow)).one()
            rows = connection.execute(select(ServerRow)).all()
    finally:
        engine.dispose()
    out = {}
    for row in rows:
        blocks = (row.loaded_end or 0) - (row.loaded_start or 0)
        free = (row.memory_gb - model.block_memory_gb * blocks) * 1e9
        capacity = int(free / model.kv_bytes_per_token_per_block + 1e-9) if blocks else 0
        out[row.id] = (row.reserved_slots, capacity)
    return out


def test_release_needs_the_sessions_own_token_or_the_admin_token(client: TestClient) -> None:
    small_swarm(client)
    first, second = _book(client).json(), _book(client).json()
    assert first["token"] and first["token"] != second["token"]
    path = f"/v1/sessions/{first['id']}"
    assert client.delete(path).status_code == 401
    assert client.delete(path, headers=bearer(second["token"])).status_code == 403
    assert client.delete(path, headers=bearer("guess")).status_code == 403
    assert client.delete(path, headers=bearer(first["token"])).status_code == 204
    assert client.delete(path, headers=bearer(first["token"])).status_code == 404
    assert client.delete(f"/v1/sessions/{second['id']}", headers=admin()).status_code == 204


def test_public_gets_never_show_session_ids_or_tokens(client: TestClient) -> None:
    small_swarm(client)
    booked = _book(client).json()
    for path in ("/v1/routes/recent", "/v1/overview", "/v1/servers"):
        text = client.get(path).text
        assert booked["id"] not in text and booked["token"] not in text, path


def test_an_idempotent_retry_returns_the_same_session(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client)
    key = {"Idempotency-Key": "retry-me-1"}
    first = _book(client, key)
    assert first.status_code == 201, first.text
    again = _book(client, key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["route"] == first.json()["route"]
    reserved = sum(r for r, _ in units_by_server(database_url).values())
    hops = first.json()["route"]["hops"]
    assert reserved == sum(h["end"] - h["start"] for h in hops) * 100  # booked once
    # The retry's token is the session's token now (the first reply may have been lost).
    path = f"/v1/sessions/{first.json()['id']}"
    assert client.delete(path, headers=bearer(first.json()["token"])).status_code == 403
    assert client.delete(path, headers=bearer(again.json()["token"])).status_code == 204
    # Another key is another session.
    other = _book(client, {"Idempotency-Key": "retry-me-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_a_bad_idempotency_key_is_422_naming_the_header(client: TestClient) -> None:
    small_swarm(client)
    response = _book(client, {"Idempotency-Key": "x" * 201})
    assert response.status_code == 422 and "Idempotency-Key" in response.text


def test_the_session_says_active_then_ended_and_why(client: TestClient) -> None:
    small_swarm(client)
    booked = _book(client).json()
    path = f"/v1/sessions/{booked['id']}"
    assert client.get(path).status_code == 401
    assert client.get(path, headers=bearer("guess")).status_code == 403
    status = client.get(path, headers=bearer(booked["token"])).json()
    assert status["state"] == "active" and status["end_reason"] is None
    assert status["route"] == booked["route"] and status["expires_in_s"] > 0
    client.delete(path, headers=bearer(booked["token"]))
    status = client.get(path, headers=admin()).json()
    assert status["state"] == "ended" and status["end_reason"] == "released"
    assert client.get("/v1/sessions/nope", headers=admin()).status_code == 404


def test_sessions_through_a_server_that_died_are_ended_and_say_so(
    client: TestClient, clock: FakeClock, database_url: str
) -> None:
    tokens = small_swarm(client, count=4)
    booked = _book(client).json()
    dead = booked["route"]["hops"][0]["server_id"]
    placement = client.get("/v1/placements/current").json()
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placement["spans"]}
    clock.advance(10)
    for server_id, token in tokens.items():
        if server_id != dead:
            assert heartbeat(client, server_id, token, spans.get(server_id)).status_code == 200
    clock.advance(6)  # the dead server's lease (15 s) has expired; the others' have not
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    assert coordinator.sweep_sessions() == 1
    status = client.get(f"/v1/sessions/{booked['id']}", headers=bearer(booked["token"])).json()
    assert status["state"] == "ended" and status["end_reason"] == "server_lost"
    assert all(reserved == 0 for reserved, _ in units_by_server(database_url).values())


def test_bookings_reserve_their_own_tokens_and_never_overcommit(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    small = _book(client, input_tokens=5, output_tokens=5).json()
    large = _book(client, input_tokens=100, output_tokens=100).json()
    units = units_by_server(database_url)

    def blocks(session: dict[str, Any]) -> int:
        return sum(h["end"] - h["start"] for h in session["route"]["hops"])

    assert sum(r for r, _ in units.values()) == blocks(small) * 10 + blocks(large) * 200
    booked = 2
    while _book(client, input_tokens=10, output_tokens=10).status_code == 201:
        booked += 1
        assert booked < 10_000
    for server_id, (reserved, capacity) in units_by_server(database_url).items():
        assert 0 <= reserved <= capacity, server_id
    # At the caps (200 tokens: 0.2 GB a block) the 1 GB left on a 3-block server holds 5
    # sessions; requests of 20 tokens are held to their own size.
    assert booked > 5


@pytest.fixture
def quota_client(
    make_client: AppFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("BPRR_ANONYMOUS_MAX_SESSIONS", "2")
    monkeypatch.setenv("BPRR_ANONYMOUS_RATE_PER_S", "1")
    monkeypatch.setenv("BPRR_ANONYMOUS_BURST", "3")
    monkeypatch.setenv("BPRR_CLIENT_TOKENS", '{"alice": "alice-secret"}')
    return make_client(database_url)


def test_an_anonymous_client_is_held_to_its_quota_and_rate(quota_client: TestClient) -> None:
    small_swarm(quota_client)
    first, second = _book(quota_client), _book(quota_client)
    assert first.status_code == second.status_code == 201
    over = _book(quota_client)
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
    assert "quota" in over.json()["detail"]
    # A named client is not held to the anonymous quota.
    assert _book(quota_client, bearer("alice-secret")).status_code == 201
    released = quota_client.delete(
        f"/v1/sessions/{first.json()['id']}", headers=bearer(first.json()["token"])
    )
    assert released.status_code == 204
    # The clock stands still: the burst of 3 is spent, the 4th booking is over the rate.
    limited = _book(quota_client)
    assert limited.status_code == 429 and "rate" in limited.json()["detail"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert _book(quota_client, bearer("not-a-client")).status_code == 403


def test_without_anonymous_mode_a_booking_needs_a_client_token(
    make_client: AppFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BPRR_ANONYMOUS_CLIENTS", "false")
    monkeypatch.setenv("BPRR_CLIENT_TOKENS", '{"alice": "alice-secret"}')
    client = make_client(database_url)
    small_swarm(client)
    assert _book(client).status_code == 401
    assert _book(client, bearer("alice-secret")).status_code == 201


def test_wait_s_out_of_range_is_422_naming_the_field(
    make_client: AppFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BPRR_QUEUE_MAX_WAIT_S", "5")
    client = make_client(database_url)
    small_swarm(client)
    for bad in (-1, 3601, "soon", True, None):
        response = _book(client, wait_s=bad)
        assert response.status_code == 422, (bad, response.text)
        assert "wait_s" in response.text
    response = _book(client, wait_s=6)
    assert response.status_code == 422 and "wait_s" in response.json()["detail"]
    assert _book(client, wait_s=5).status_code == 201
