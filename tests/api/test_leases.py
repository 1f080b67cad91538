"""Leases (issue 12): a server that comes back after its lease expired gets a span at the next
plan; the planner's leadership fails over within one leader lease."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import AppFactory, FakeClock, bearer
from tests.api.helpers import heartbeat, server_body, small_swarm


def _tick(client: TestClient) -> str:
    outcome: str = client.app.state.coordinator.planner_tick()  # type: ignore[attr-defined]
    return outcome


def _servers(client: TestClient) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in client.get("/v1/servers").json()}


def _loaded(client: TestClient, server_id: str) -> dict[str, int] | None:
    span = _servers(client)[server_id]["assigned_span"]
    return None if span is None else {"start": span["start"], "end": span["end"]}


def test_a_server_back_after_its_lease_expired_gets_a_span_at_the_next_plan(
    client: TestClient, clock: FakeClock
) -> None:
    tokens = small_swarm(client, count=4, memory_gb=10.0)
    _tick(client)  # the registrations' re-plan request
    for sid, token in tokens.items():
        assert heartbeat(client, sid, token, _loaded(client, sid)).status_code == 200
    # s3 goes quiet past its lease; the others keep heartbeating.
    for _ in range(4):
        clock.advance(5)
        for sid in ("s0", "s1", "s2"):
            assert heartbeat(client, sid, tokens[sid], _loaded(client, sid)).status_code == 200
    _tick(client)
    for sid in ("s0", "s1", "s2"):
        assert heartbeat(client, sid, tokens[sid], _loaded(client, sid)).status_code == 200
    _tick(client)
    assert _servers(client)["s3"]["lease"] == "expired"
    # It comes back (its own token) and reports in without a span.
    back = client.post(
        "/v1/servers",
        json=server_body(3, memory_gb=10.0, boot_epoch=2),
        headers=bearer(tokens["s3"]),
    )
    assert back.status_code == 201, back.text
    token = back.json()["token"]
    assert heartbeat(client, "s3", token, None, boot_epoch=2).status_code == 200
    outcome = _tick(client)
    assert _servers(client)["s3"]["assigned_span"] is not None, outcome


@pytest.mark.postgres
def test_leadership_fails_over_within_one_leader_lease(
    make_client: AppFactory, pg_url: str, clock: FakeClock
) -> None:
    first = make_client(pg_url, leader_lease_s=6.0)
    second = make_client(pg_url, leader_lease_s=6.0)
    assert first.app.state.coordinator.try_lead()  # type: ignore[attr-defined]
    assert _tick(second) == "follower"
    clock.advance(3)
    assert _tick(second) == "follower"  # the leader's lease still runs
    # The leader dies without a word: nobody renews its lease.
    clock.advance(3.01)
    assert _tick(second) != "follower"
