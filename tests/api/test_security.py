"""Who may do what (issue 12): server-id takeover, boot epochs, RTT writes, closed
registration outside dev mode, authentication before the body, and the audit lines."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, JOIN, AppFactory, FakeClock, admin, bearer
from tests.api.helpers import SMALL_MODEL, register, route_params, server_body, small_swarm


def _servers(client: TestClient) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in client.get("/v1/servers").json()}


def test_a_live_server_id_is_not_taken_over_with_the_join_token(client: TestClient) -> None:
    token = register(client, server_body(0))
    hijack = server_body(0, address="6.6.6.6:31337", boot_epoch=2)
    for headers, status in ((bearer(JOIN), 403), ({}, 401), (bearer("guess"), 403)):
        reply = client.post("/v1/servers", json=hijack, headers=headers)
        assert reply.status_code == status, reply.text
    assert _servers(client)["s0"]["address"] == "10.0.0.0:31337"
    # The server itself re-registers with its own token, even with an older epoch.
    again = client.post("/v1/servers", json=server_body(0, boot_epoch=0), headers=bearer(token))
    assert again.status_code == 201, again.text


def test_an_expired_id_is_taken_with_the_join_token_and_a_newer_epoch(
    client: TestClient, clock: FakeClock
) -> None:
    register(client, server_body(0, boot_epoch=5))
    clock.advance(60)  # the lease (15 s) expired
    same = client.post("/v1/servers", json=server_body(0, boot_epoch=5), headers=bearer(JOIN))
    assert same.status_code == 409 and "boot_epoch" in same.json()["detail"]
    newer = client.post("/v1/servers", json=server_body(0, boot_epoch=6), headers=bearer(JOIN))
    assert newer.status_code == 201, newer.text


def test_boot_epochs_are_bounded_so_nobody_locks_the_owner_out(
    client: TestClient, clock: FakeClock
) -> None:
    huge = client.post("/v1/servers", json=server_body(0, boot_epoch=2**62), headers=bearer(JOIN))
    assert huge.status_code == 422 and "boot_epoch" in huge.json()["detail"]
    ahead = int(clock.now * 1000) + 2 * 3_600_000
    reply = client.post("/v1/servers", json=server_body(0, boot_epoch=ahead), headers=bearer(JOIN))
    assert reply.status_code == 422
    token = register(client, server_body(0, boot_epoch=int(clock.now * 1000)))
    clock.advance(60)
    # Even after its lease expired, the owner's token re-registers with any bounded epoch.
    again = client.post("/v1/servers", json=server_body(0, boot_epoch=1), headers=bearer(token))
    assert again.status_code == 201, again.text


def test_a_server_token_writes_only_rtts_that_involve_itself(client: TestClient) -> None:
    tokens = small_swarm(client, count=2)
    foreign = {"entries": [{"a": "s1", "b": "east", "rtt_ms": 1e9}]}
    reply = client.put("/v1/rtts", json=foreign, headers=bearer(tokens["s0"]))
    assert reply.status_code == 403 and "entries[0]" in reply.json()["detail"]
    mixed = {
        "entries": [{"a": "s0", "b": "east", "rtt_ms": 3}, {"a": "east", "b": "s1", "rtt_ms": 3}]
    }
    assert client.put("/v1/rtts", json=mixed, headers=bearer(tokens["s0"])).status_code == 403
    own = {"entries": [{"a": "east", "b": "s0", "rtt_ms": 3.0}]}
    assert client.put("/v1/rtts", json=own, headers=bearer(tokens["s0"])).status_code == 200
    assert client.put("/v1/rtts", json=foreign, headers=admin()).status_code == 200


def test_registration_is_closed_without_a_join_token_outside_dev_mode(
    make_client: AppFactory, sqlite_url: str
) -> None:
    closed = make_client(sqlite_url, join_token=None)
    assert closed.post("/v1/servers", json=server_body(0)).status_code == 401
    reply = closed.post("/v1/servers", json=server_body(0), headers=bearer("anything"))
    assert reply.status_code == 403 and "BPRR_JOIN_TOKEN" in reply.json()["detail"]


def test_dev_mode_opens_registration(make_client: AppFactory, tmp_path: Any) -> None:
    dev = make_client(f"sqlite:///{tmp_path / 'dev.db'}", join_token=None, dev_mode=True)
    assert dev.post("/v1/servers", json=server_body(0)).status_code == 201


WRITE_METHODS = {"post", "put", "delete", "patch"}
ADMIN_ONLY = "**Token**: the admin token."  # how an admin-only operation's description says so


def _secured_writes(client: TestClient, ids: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """Every write operation of the OpenAPI schema that requires a security scheme (not the
    booking, whose client token is optional): its method, its path (parameters filled from
    ``ids``), its description and whether it takes a request body."""
    schema: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    found = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            security = operation.get("security")
            if method in WRITE_METHODS and security and {} not in security:
                concrete = re.sub(r"\{([a-z_]+)\}", lambda m: ids[m.group(1)], path)
                description = operation.get("description", "")
                found.append((method.upper(), concrete, description, "requestBody" in operation))
    return found


MALFORMED = b'{"entries": [1, 2'  # not JSON: FastAPI fails to decode it before any dependency
JSON = {"Content-Type": "application/json"}


def test_authentication_comes_before_the_body(client: TestClient) -> None:
    """Every write route that needs a token answers a bad body (schema-invalid or not even
    JSON) sent without one with 401, and with a wrong token with 403, never 422 (nobody
    learns the body's shape without the right token); with the right token the 422 stands.
    The routes come from the OpenAPI schema, so a new secured write route is covered without
    editing this test; the ids in their paths exist, so a wrong token is not a 404."""
    tokens = small_swarm(client, count=2)
    booked = client.post("/v1/sessions", json=route_params())
    assert booked.status_code == 201, booked.text
    ids = {"server_id": "s0", "session_id": booked.json()["id"], "generation": "1"}
    routes = _secured_writes(client, ids)
    assert {
        ("PUT", "/v1/model"),
        ("POST", "/v1/servers"),
        ("POST", "/v1/servers/s0/heartbeat"),
        ("PUT", "/v1/rtts"),
        ("POST", "/v1/placements"),
        ("POST", "/v1/scenario"),
    } <= {(method, path) for method, path, _, has_body in routes if has_body}
    assert len(routes) >= 8, routes
    bad_body = {"not": "valid", "num_blocks": True, "boot_epoch": "x", "entries": 3}
    for method, path, _, _ in routes:
        for headers, status in (({}, 401), (bearer("wrong-token"), 403)):
            schema_invalid = client.request(method, path, json=bad_body, headers=headers)
            assert schema_invalid.status_code == status, (method, path, schema_invalid.text)
            malformed = client.request(method, path, content=MALFORMED, headers=JSON | headers)
            assert malformed.status_code == status, (method, path, malformed.text)
    # The right token gets past authentication: then the body's 422 (the field named).
    right = {"/v1/servers": JOIN, "/v1/servers/s0/heartbeat": tokens["s0"]}
    for method, path, _, has_body in routes:
        if has_body:
            headers = JSON | bearer(right.get(path, ADMIN))
            reply = client.request(method, path, content=MALFORMED, headers=headers)
            assert reply.status_code == 422, (method, path, reply.text)
            assert reply.json()["detail"][0]["type"] == "json_invalid", (method, path)
    admin_routes = [(method, path) for method, path, text, _ in routes if ADMIN_ONLY in text]
    assert ("POST", "/v1/placements") in admin_routes and len(admin_routes) >= 3


def test_registration_checks_the_token_before_the_body_by_its_rules(
    client: TestClient, make_client: AppFactory, tmp_path: Any
) -> None:
    """Before the body (which names the id), registration takes the join token or any
    registered server's own token (the service then applies its id rules); in dev mode
    without a join token, any token or none."""
    token = register(client, server_body(0))
    bad_body = {"site": 3}
    for headers in (bearer(JOIN), bearer(token)):
        reply = client.post("/v1/servers", json=bad_body, headers=headers)
        assert reply.status_code == 422, reply.text
    # A server's own token passes the check before the body, but takes no other live id.
    other = client.post("/v1/servers", json=server_body(1), headers=bearer(token))
    assert other.status_code == 403, other.text
    assert client.post("/v1/servers", json=bad_body, headers=bearer(ADMIN)).status_code == 403
    dev = make_client(f"sqlite:///{tmp_path / 'dev.db'}", join_token=None, dev_mode=True)
    for number, headers in enumerate(({}, bearer("anything"))):
        malformed = dev.post("/v1/servers", content=MALFORMED, headers=JSON | headers)
        assert malformed.status_code == 422, malformed.text
        joined = dev.post("/v1/servers", json=server_body(number), headers=headers)
        assert joined.status_code == 201, joined.text


def test_a_heartbeat_token_is_checked_before_the_body_by_the_view_or_the_row(
    client: TestClient,
) -> None:
    """A heartbeat's token is checked before its body: against the server's row while no
    route view vouches for it (right after a re-registration), then by the view; the old
    token is refused either way, and an unknown id is a 404 before the body."""
    old = small_swarm(client, count=2)["s0"]
    again = client.post("/v1/servers", json=server_body(0, boot_epoch=2), headers=bearer(old))
    assert again.status_code == 201, again.text
    new = again.json()["token"]
    servers = client.app.state.coordinator.servers  # type: ignore[attr-defined]
    for vouched in (False, True):
        assert servers.vouches_for("s0", new) is vouched
        for token, status in ((new, 422), (old, 403)):
            headers = JSON | bearer(token)
            reply = client.post("/v1/servers/s0/heartbeat", content=MALFORMED, headers=headers)
            assert reply.status_code == status, reply.text
        assert client.get("/v1/overview").status_code == 200  # builds the route view
    unknown = client.post("/v1/servers/s9/heartbeat", json={}, headers=bearer(new))
    assert unknown.status_code == 404, unknown.text


def test_a_closed_booking_route_asks_for_the_client_token_before_the_body(
    make_client: AppFactory, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bookings' client token is optional (anonymous clients may book when allowed); with
    anonymous clients refused, a bad body without a client token is a 401 and with an unknown
    one a 403, not a 422, even when the body is not JSON."""
    monkeypatch.setenv("BPRR_ANONYMOUS_CLIENTS", "false")
    closed = make_client(sqlite_url)
    for headers, status in (({}, 401), (bearer("unknown-client"), 403)):
        reply = closed.post("/v1/sessions", json={"client_site": 3}, headers=headers)
        assert reply.status_code == status, reply.text
        malformed = closed.post("/v1/sessions", content=MALFORMED, headers=JSON | headers)
        assert malformed.status_code == status, malformed.text
    # An Authorization header that is not a bearer token is refused, not taken as anonymous.
    basic = closed.post("/v1/sessions", json=route_params(), headers={"Authorization": "Basic x"})
    assert basic.status_code == 401 and "Bearer" in basic.json()["detail"]


def test_security_events_leave_one_audit_line_each(
    capfd: pytest.CaptureFixture[str], make_client: AppFactory, database_url: str
) -> None:
    client = make_client(database_url)  # after capfd: its log lines go to the capture
    assert client.put("/v1/model", json=SMALL_MODEL, headers=bearer("wrong")).status_code == 403
    token = register(client, server_body(0))
    hijack = server_body(0, boot_epoch=2)
    assert client.post("/v1/servers", json=hijack, headers=bearer(JOIN)).status_code == 403
    assert client.put("/v1/model", json=SMALL_MODEL, headers=admin()).status_code == 200
    assert client.delete("/v1/servers/s0", headers=bearer(token)).status_code == 204
    lines = [line for line in capfd.readouterr().err.splitlines() if " audit " in f" {line} "]
    text = "\n".join(lines)
    for action in (
        "auth_failed",
        "server_registered",
        "takeover_refused",
        "model_changed",
        "server_left",
    ):
        assert f"action={action}" in text, text
    failed = next(line for line in lines if "action=auth_failed" in line and "/v1/model" in line)
    assert "client=testclient" in failed and "status=403" in failed
    assert ADMIN not in text and JOIN not in text and token not in text
