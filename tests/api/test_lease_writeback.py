"""Quiet heartbeats renew leases write-behind, in one guarded batch (group commit)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.api.conftest import AppFactory, FakeClock, bearer
from tests.api.helpers import heartbeat, small_swarm


def _lease_in_database(client: TestClient, server_id: str) -> float:
    engine = client.app.state.coordinator.engine  # type: ignore[attr-defined]
    with engine.connect() as connection:  # bypasses the coordinator (no flush)
        value = connection.execute(
            text("SELECT lease_expires_at FROM servers WHERE id = :id"), {"id": server_id}
        ).scalar_one()
    return float(value)


def _loaded(client: TestClient, server_id: str) -> dict[str, int]:
    span = client.app.state.coordinator.view().spans[server_id]  # type: ignore[attr-defined]
    return {"start": span.start, "end": span.end}


def test_quiet_heartbeats_are_written_behind_and_read_back(
    make_client: AppFactory, database_url: str, clock: FakeClock
) -> None:
    client = make_client(database_url)
    tokens = small_swarm(client)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    before = _lease_in_database(client, "s0")
    clock.advance(5)
    reply = heartbeat(client, "s0", tokens["s0"], _loaded(client, "s0"), free_cache_slots=3)
    assert reply.status_code == 200
    assert "s0" in coordinator.core.pending_renewals()  # pending, not written yet
    assert _lease_in_database(client, "s0") == before
    servers = client.get("/v1/servers").json()  # any transaction writes the batch first
    assert not coordinator.core.pending_renewals()
    assert _lease_in_database(client, "s0") == before + 5
    (s0,) = [s for s in servers if s["id"] == "s0"]
    assert s0["lease"] == "live"


def test_the_fast_path_still_refuses_a_wrong_token_and_a_changed_row_keeps_its_lease(
    make_client: AppFactory, database_url: str, clock: FakeClock
) -> None:
    client = make_client(database_url)
    tokens = small_swarm(client)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    span = _loaded(client, "s1")
    wrong = client.post(
        "/v1/servers/s1/heartbeat",
        json={"boot_epoch": 1, "state": "online", "loaded_span": span},
        headers=bearer(tokens["s0"]),
    )
    assert wrong.status_code == 403
    before = _lease_in_database(client, "s1")
    clock.advance(5)
    assert heartbeat(client, "s1", tokens["s1"], span).status_code == 200
    with coordinator.engine.begin() as connection:  # another process drains it meanwhile
        connection.execute(text("UPDATE servers SET state = 'draining' WHERE id = 's1'"))
    coordinator.flush_renewals()
    assert _lease_in_database(client, "s1") == before  # the guard matched no row
