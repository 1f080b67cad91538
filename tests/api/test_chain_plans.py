"""Chain plans in the coordinator: POST /v1/placements with "chains" and "auto" (the default)
stores the chains and the dispatcher with the placement; the planner runs auto by default."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.store.models import PlacementRow
from tests.api.conftest import AppFactory, admin
from tests.api.helpers import SMALL_MODEL, heartbeat, register, route_params, server_body


def _swarm(client: TestClient) -> dict[str, str]:
    assert client.put("/v1/model", json=SMALL_MODEL, headers=admin()).status_code == 200
    return {f"s{i}": register(client, server_body(i, memory_gb=12.0)) for i in range(4)}


def _stored(url: str, generation: int) -> PlacementRow:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                select(PlacementRow).where(PlacementRow.generation == generation)
            ).one()
    finally:
        engine.dispose()
    return row  # type: ignore[return-value]


@pytest.mark.parametrize("algorithm", ["chains", "auto", None])
def test_a_chain_plan_is_stored_with_its_chains_and_dispatcher(
    make_client: AppFactory, sqlite_url: str, algorithm: str | None
) -> None:
    client = make_client(sqlite_url)
    tokens = _swarm(client)
    body = {} if algorithm is None else {"algorithm": algorithm}
    placed = client.post("/v1/placements", json=body, headers=admin())
    assert placed.status_code == 201, placed.text
    out = placed.json()
    assert out["algorithm"] in ({"chains", "auto"} if algorithm is None else {algorithm})
    row = _stored(sqlite_url, out["generation"])
    assert row.dispatcher in ("jffc", "wsrr")
    if row.dispatcher == "jffc":
        chains = json.loads(row.chains)
        assert chains and all(c["capacity"] >= 1 and c["service_ms"] > 0 for c in chains)
        for chain in chains:
            blocks = [b for _, start, end in chain["hops"] for b in range(start, end)]
            assert blocks == list(range(SMALL_MODEL["num_blocks"]))
            assert {sid for sid, _, _ in chain["hops"]} <= set(tokens)
            # each client site's service time, for the route view's per-client order
            assert set(chain["client_ms"]) == {"east"} and chain["client_ms"]["east"] > 0
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in out["spans"]}
    for sid, token in tokens.items():
        assert heartbeat(client, sid, token, spans.get(sid)).status_code == 200
    assert client.post("/v1/sessions", json=route_params()).status_code == 201


def test_the_planner_runs_auto_by_default(make_client: AppFactory, sqlite_url: str) -> None:
    client = make_client(sqlite_url, planner_algorithm="auto")
    _swarm(client)
    outcome = client.app.state.coordinator.planner_tick()  # type: ignore[attr-defined]
    assert outcome.startswith("published"), outcome
    current = client.get("/v1/placements/current").json()
    assert current["algorithm"] in ("auto", "chains", "cg", "petals")
    assert _stored(sqlite_url, current["generation"]).dispatcher in ("jffc", "wsrr")
