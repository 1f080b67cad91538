"""Restarts, migrations, the planner (auto re-plan with hysteresis) and `bprr serve` errors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from app.cli import main
from app.store import db as store_db
from tests.api.conftest import PG_ADMIN_DSN, AppFactory, FakeClock, admin, bearer, pg_database_url
from tests.api.helpers import heartbeat, register, route_params, server_body, small_swarm


def test_state_survives_a_restart(make_client: AppFactory, sqlite_url: str) -> None:
    first = make_client(sqlite_url)
    tokens = small_swarm(first)
    session = first.post("/v1/sessions", json=route_params()).json()
    generation = first.get("/v1/placements/current").json()["generation"]
    first.__exit__(None, None, None)
    second = make_client(sqlite_url)
    assert {s["id"] for s in second.get("/v1/servers").json()} == set(tokens)
    assert second.get("/v1/placements/current").json()["generation"] == generation
    # The old tokens still authenticate, and the booked session is still there to release.
    assert heartbeat(second, "s0", tokens["s0"], None).status_code == 200
    release = second.delete(f"/v1/sessions/{session['id']}", headers=bearer(session["token"]))
    assert release.status_code == 204


def test_migrations_upgrade_downgrade_and_match_the_models(database_url: str) -> None:
    engine = store_db.make_engine(database_url)
    try:
        store_db.upgrade(engine)
        assert store_db.schema_at_head(engine)
        store_db.check(engine)  # alembic check: models and migrations agree
        tables = set(inspect(engine).get_table_names())
        assert {"servers", "sessions", "reservations", "placements"} <= tables
        store_db.downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert store_db.current_revision(engine) is None
        store_db.upgrade(engine)
        assert store_db.schema_at_head(engine)
    finally:
        engine.dispose()


def test_refuses_to_start_behind_without_auto_migrate(
    make_client: AppFactory, sqlite_url: str
) -> None:
    with pytest.raises(store_db.SchemaBehindError, match="alembic upgrade head"):
        make_client(sqlite_url, auto_migrate=False)


def test_serve_reports_a_schema_behind_in_one_line(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BPRR_AUTO_MIGRATE", "false")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--database-url", sqlite_url])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: database schema is at revision none")


def test_serve_says_where_it_listens(sqlite_url: str) -> None:
    """Port 0: the line names the port the kernel chose, and that port answers."""
    environment = dict(os.environ, BPRR_DATABASE_URL=sqlite_url, BPRR_PLANNER_INTERVAL_S="0")
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:  # the warning about closed registration comes first
            if "listening on" in line:
                break
        else:
            pytest.fail(f"bprr serve exited {process.wait()} without a listening line")
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+)) ", line)
        assert match and int(match[2]) > 0, line
        assert f"API docs {match[1]}/docs" in line and "sqlite" in line
        assert httpx.get(f"{match[1]}/livez", timeout=30).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_on_a_busy_port_is_one_error_line(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(
                ["serve", "--database-url", sqlite_url, "--host", "127.0.0.1", "--port", str(port)]
            )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --port: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not any("Traceback" in line for line in err)


def test_readyz_and_livez(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["schema_at_head"] is True
    metrics = client.get("/metrics").text
    assert "bprr_live_servers" in metrics and "http_requests_total" in metrics


def _tick(client: TestClient) -> str:
    outcome: str = client.app.state.coordinator.planner_tick()  # type: ignore[attr-defined]
    return outcome


def _load_assigned(client: TestClient, tokens: dict[str, str]) -> None:
    placement = client.get("/v1/placements/current").json()
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placement["spans"]}
    for server_id, token in tokens.items():
        assert heartbeat(client, server_id, token, spans.get(server_id)).status_code == 200


def test_planner_replans_on_join_and_keeps_spans(client: TestClient) -> None:
    tokens = small_swarm(client, count=3)
    # small_swarm registered servers, which requested a re-plan: the current plan is fine.
    assert _tick(client).startswith("kept")
    assert _tick(client) == "steady"
    before = {
        s["server_id"]: (s["start"], s["end"])
        for s in client.get("/v1/placements/current").json()["spans"]
    }
    tokens["s3"] = register(client, server_body(3))
    outcome = _tick(client)
    assert outcome.startswith(("published", "kept"))
    after = {
        s["server_id"]: (s["start"], s["end"])
        for s in client.get("/v1/placements/current").json()["spans"]
    }
    # Hysteresis: no existing server's span moved just because another one joined.
    assert all(after.get(server) == span for server, span in before.items())
    _load_assigned(client, tokens)
    assert _tick(client) == "steady"


def test_planner_replans_when_coverage_is_lost(client: TestClient, clock: FakeClock) -> None:
    tokens = small_swarm(client, count=4, memory_gb=6.0)
    _tick(client)
    placement = client.get("/v1/placements/current").json()
    # Every server hosting block 0 goes silent.
    victims = {s["server_id"] for s in placement["spans"] if s["start"] == 0}
    assert len(victims) < len(tokens)
    clock.advance(10)
    _load_assigned(client, {k: v for k, v in tokens.items() if k not in victims})
    clock.advance(6)  # the victims' leases expire
    outcome = _tick(client)
    assert outcome.startswith("published"), outcome
    fresh = client.get("/v1/placements/current").json()
    assert not victims & {s["server_id"] for s in fresh["spans"]}
    assert "coverage lost" in fresh["reason"]
    covered = set()
    for span in fresh["spans"]:
        covered.update(range(span["start"], span["end"]))
    assert covered == set(range(8))


def test_planner_notices_drift(client: TestClient) -> None:
    tokens = small_swarm(client, count=3)
    _tick(client)
    assert _tick(client) == "steady"
    # One server reports a much slower decode speed, repeatedly (EWMA).
    placement = client.get("/v1/placements/current").json()
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placement["spans"]}
    server = placement["spans"][0]["server_id"]
    for _ in range(15):
        heartbeat(client, server, tokens[server], spans.get(server), decode_ms_per_block=500.0)
    outcome = _tick(client)
    assert outcome != "steady"
    latest = client.get("/v1/placements/current").json()
    if outcome.startswith("published"):
        assert "drifted" in latest["reason"]


def test_no_admin_token_disables_admin_routes(make_client: AppFactory, sqlite_url: str) -> None:
    client = make_client(sqlite_url, admin_token=None)
    response = client.put("/v1/model", json={}, headers=admin())
    assert response.status_code in {403, 422}
    from tests.api.helpers import SMALL_MODEL

    response = client.put("/v1/model", json=SMALL_MODEL, headers=admin())
    assert response.status_code == 403 and "BPRR_ADMIN_TOKEN" in response.json()["detail"]


def test_example_file_exists() -> None:
    assert (Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json").exists()


@pytest.fixture
def outage_database() -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A PostgreSQL database of its own, and a switch that takes it away (new connections
    refused, open ones terminated) and brings it back."""
    name = f"bprr_outage_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
        user = connection.execute("SELECT current_user").fetchone()

    def reachable(up: bool) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
            connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(up).lower()}')
            if not up:
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    yield pg_database_url(name, str(user[0]) if user else "postgres"), reachable
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_an_unreachable_database_is_a_503_and_the_service_recovers(
    outage_database: tuple[str, Callable[[bool], None]], make_client: AppFactory
) -> None:
    url, reachable = outage_database
    client = make_client(url)
    tokens = small_swarm(client, memory_gb=10.0)  # room for several sessions
    booked = client.post("/v1/sessions", json=route_params())
    assert booked.status_code == 201, booked.text
    reachable(False)
    try:
        refused = [
            client.get("/v1/servers"),
            client.post("/v1/sessions", json=route_params()),
            client.delete(
                f"/v1/sessions/{booked.json()['id']}", headers=bearer(booked.json()["token"])
            ),
            client.put(
                "/v1/rtts",
                json={"entries": [{"a": "east", "b": "s0", "rtt_ms": 5.0}]},
                headers=admin(),
            ),
            client.post("/v1/placements", json={"algorithm": "cg"}, headers=admin()),
        ]
        for response in refused:
            assert response.status_code == 503, (response.request.url, response.text)
            assert "database" in response.json()["detail"]
            assert response.headers["Retry-After"] == "1"
        assert client.get("/readyz").json()["database"] is False
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "bprr_database_up 0.0" in metrics.text
    finally:
        reachable(True)
    assert "bprr_database_up 1.0" in client.get("/metrics").text
    # Nothing was lost: the booked session is still there to release.
    assert client.get("/v1/servers").status_code == 200
    assert heartbeat(client, "s0", tokens["s0"], None).status_code == 200
    release = client.delete(
        f"/v1/sessions/{booked.json()['id']}", headers=bearer(booked.json()["token"])
    )
    assert release.status_code == 204


@pytest.mark.postgres
def test_heartbeats_during_an_outage_promise_only_committed_leases(
    outage_database: tuple[str, Callable[[bool], None]], make_client: AppFactory, clock: FakeClock
) -> None:
    """Before, quiet heartbeats got 200 (a fresh 15 s lease) while the database was away and
    the renewals were lost; now a 200 promises no more than the lease already committed, and
    once that is spent the heartbeat goes to the database: 503."""
    url, reachable = outage_database
    client = make_client(url)
    tokens = small_swarm(client)
    spans = {s["id"]: s["loaded_span"] for s in client.get("/v1/servers").json()}
    committed = clock.now + 15.0  # small_swarm's heartbeats were written (full path)
    reachable(False)
    statuses = []
    try:
        for _ in range(5):
            clock.advance(4)
            reply = heartbeat(client, "s0", tokens["s0"], spans["s0"])
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                promised = clock.now + reply.json()["lease_expires_in_s"]
                assert promised <= committed + 1e-6, (promised, committed)
            else:
                assert reply.status_code == 503, reply.text
    finally:
        reachable(True)
    assert statuses[-1] == 503, statuses
    assert heartbeat(client, "s0", tokens["s0"], spans["s0"]).status_code == 200
