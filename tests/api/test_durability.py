"""Durability (issue 12): what a heartbeat reply promises survives kill -9; leases follow the
database's clock, not a replica's."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADMIN, JOIN, AppFactory, bearer
from tests.api.helpers import SMALL_MODEL, route_params, server_body
from tests.api.served import bprr_serve


def test_acknowledged_heartbeat_leases_survive_kill_9(tmp_path: Path) -> None:
    database = tmp_path / "k.db"
    promised: dict[str, float] = {}
    with bprr_serve(f"sqlite:///{database}") as served, httpx.Client(base_url=served.base) as http:
        tokens = {}
        for i in range(20):
            reply = http.post("/v1/servers", json=server_body(i), headers=bearer(JOIN))
            assert reply.status_code == 201, reply.text
            tokens[f"s{i}"] = reply.json()["token"]
        body = {"boot_epoch": 1, "state": "joining"}
        for _ in range(6):
            for server_id, token in tokens.items():
                sent = time.time()
                reply = http.post(
                    f"/v1/servers/{server_id}/heartbeat", json=body, headers=bearer(token)
                )
                assert reply.status_code == 200, reply.text
                lease = sent + reply.json()["lease_expires_in_s"]
                promised[server_id] = max(promised.get(server_id, 0.0), lease)
        os.kill(served.process.pid, signal.SIGKILL)
        served.process.wait()
    with sqlite3.connect(database) as connection:
        stored = dict(connection.execute("SELECT id, lease_expires_at FROM servers").fetchall())
    broken = {s: (stored[s], p) for s, p in promised.items() if stored[s] < p - 1e-6}
    assert not broken, f"{len(broken)} of {len(promised)} promised leases lost: {broken}"


@pytest.mark.postgres
def test_a_replica_with_a_skewed_clock_routes_and_books(
    make_client: AppFactory, pg_url: str
) -> None:
    """Two replicas on one PostgreSQL, one whose clock runs 20 s ahead: both see the same
    live leases (before, the skewed one refused every route and booking)."""
    honest = make_client(pg_url, database_clock=True, lease_ttl_s=15.0)
    skewed = make_client(pg_url, database_clock=True, lease_ttl_s=15.0)
    # make_client's clock is a shared fake one: give each replica its own real clock.
    honest.app.state.coordinator.core._local_clock = time.time  # type: ignore[attr-defined]
    skewed.app.state.coordinator.core._local_clock = lambda: time.time() + 20  # type: ignore[attr-defined]
    for client in (honest, skewed):
        client.app.state.coordinator.core.sync_clock()  # type: ignore[attr-defined]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert honest.put("/v1/model", json=SMALL_MODEL, headers=admin).status_code == 200
    tokens = {}
    for i in range(3):
        reply = honest.post("/v1/servers", json=server_body(i), headers=bearer(JOIN))
        tokens[f"s{i}"] = reply.json()["token"]
    placed = honest.post("/v1/placements", json={"algorithm": "cg"}, headers=admin)
    assert placed.status_code == 201, placed.text
    for span in placed.json()["spans"]:
        loaded = {"start": span["start"], "end": span["end"]}
        body = {"boot_epoch": 1, "state": "online", "loaded_span": loaded}
        sid = span["server_id"]
        reply = honest.post(f"/v1/servers/{sid}/heartbeat", json=body, headers=bearer(tokens[sid]))
        assert reply.status_code == 200
    skewed.app.state.coordinator.invalidate()  # type: ignore[attr-defined]
    for client in (honest, skewed):
        route = client.get("/v1/routes", params=route_params())
        assert route.status_code == 200, route.text
        servers = client.get("/v1/servers").json()
        assert all(s["lease"] == "live" and s["lease_expires_in_s"] > 10 for s in servers)
    assert skewed.post("/v1/sessions", json=route_params()).status_code == 201
