"""One dispatcher: the simulator's policies and the coordinator's route view call the same
functions (app.allocation.dispatch) and reach the same decision from the same state.

The coordinator's state (route view: capacities, units held, release times) is handed to the
simulator's own policy objects through a stand-in for the engine exposing exactly that state;
both must pick the same hops. WS-RR is compared at the caps (the simulator's paper baseline
prices requests at the caps; the coordinator prices each request at its own lengths)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, update

from app.allocation import dispatch
from app.allocation.chains import Chain
from app.allocation.perf import Hop
from app.simulation.policies import ChainsPolicy, WsrrPolicy
from app.store.models import PlacementRow
from tests.api.conftest import bearer
from tests.api.helpers import SMALL_MODEL, route_params, small_swarm


def engine_standin(view: Any, client: int, tokens: int, now_s: float) -> SimpleNamespace:
    """The simulator engine's view of the coordinator's state (times in ms)."""
    capacity = [int(c) for c in view.capacity]
    committed = [int(r) for r in view.reserved]
    return SimpleNamespace(
        client_of=lambda _request: client,
        tokens_of=lambda _request: tokens,
        free=lambda server: capacity[server] - committed[server],
        free_units=[c - u for c, u in zip(capacity, committed, strict=True)],
        capacity=capacity,
        committed=committed,
        bookings=[[(at * 1000.0, units) for at, units in items] for items in view.reservations],
        now_ms=now_s * 1000.0,
    )


def publish_chains(database_url: str, chains: list[dict[str, Any]]) -> None:
    """Make the current placement a JFFC plan over ``chains`` (written as the planner does)."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                update(PlacementRow).values(dispatcher="jffc", chains=json.dumps(chains))
            )
    finally:
        engine.dispose()


def test_wsrr_same_decision_in_the_simulator_and_the_coordinator(client: TestClient) -> None:
    small_swarm(client, count=5, memory_gb=4.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    caps = route_params(
        inputs=SMALL_MODEL["max_input_tokens"], outputs=SMALL_MODEL["max_output_tokens"]
    )
    now = coordinator.clock()
    decisions = 0
    for _ in range(12):  # fill up: later decisions route around full servers, then wait
        view = coordinator.view()
        sim = engine_standin(view, view.site_index["east"], 200, now)
        policy = WsrrPolicy("cg-wsrr", view.instance, [e.span for e in view.entries], sim.capacity)
        simulated = policy.decide(sim, 0, sim.now_ms)  # type: ignore[arg-type]
        planned = view.query("east", caps["input_tokens"], caps["output_tokens"], now)
        assert planned is not None
        assert tuple(simulated.hops) == tuple(planned.hops)
        assert simulated.at_ms == pytest.approx(sim.now_ms + planned.wait_ms)
        decisions += 1
        if client.post("/v1/sessions", json=caps).status_code != 201:
            break
    assert decisions >= 2


def test_jffc_same_decision_in_the_simulator_and_the_coordinator(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=4, memory_gb=6.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    view = coordinator.view()
    # Two chains over the same path (WS-RR's on the empty swarm): 2 job slots, and (slower) 3.
    path = view.query("east", 10, 10, coordinator.clock())
    assert path is not None
    hops = [[view.entries[h.server].id, h.start, h.end] for h in path.hops]
    chains = [
        {"hops": hops, "capacity": 2, "service_ms": 100.0},
        {"hops": hops, "capacity": 3, "service_ms": 150.0},
    ]
    publish_chains(database_url, chains)
    coordinator.invalidate()
    picked: list[int | None] = []
    booked = []
    for _ in range(7):
        view = coordinator.view()
        assert view.dispatcher == "jffc"
        if view.chain_in_service is None:
            coordinator.route("east", 10, 10)  # fills the per-chain counts
        sim = engine_standin(view, 0, dispatch.tokens_of(10, 10), coordinator.clock())
        policy = ChainsPolicy(
            "chains",
            [e.span for e in view.entries],
            sim.capacity,
            [Chain(tuple(Hop(*h) for h in c.hops), c.capacity, c.service_ms) for c in view.chains],
        )
        policy.in_service = list(view.chain_in_service or [0, 0])
        simulated = policy.decide(sim, 0, 0.0)  # type: ignore[arg-type]
        planned = view.query("east", 10, 10, coordinator.clock())
        assert planned is not None
        if planned.wait_ms > 0:
            assert type(simulated).__name__ == "Wait"  # both: the central queue
            picked.append(None)
            break
        assert tuple(simulated.hops) == tuple(planned.hops)
        picked.append(planned.chain)
        response = client.post("/v1/sessions", json=route_params(inputs=10, outputs=10))
        assert response.status_code == 201
        booked.append(response.json())
    # Fastest chain first (2 slots), then the slower one (3), then the queue.
    assert picked == [0, 0, 1, 1, 1, None]
    release = client.delete(f"/v1/sessions/{booked[0]['id']}", headers=bearer(booked[0]["token"]))
    assert release.status_code == 204
    view = coordinator.view()
    again = view.query("east", 10, 10, coordinator.clock())
    assert again is not None and again.chain == 0 and again.wait_ms == 0
    assert np.all(view.reserved <= view.capacity)


@pytest.mark.parametrize("per_site", [True, False])
def test_jffc_takes_the_chains_fastest_for_the_clients_site(
    client: TestClient, database_url: str, per_site: bool
) -> None:
    """The plan's per-site service times order the chains for each site's requests (as the
    simulator orders them per client); without them, the plan's order."""
    small_swarm(client, count=4, memory_gb=6.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    view = coordinator.view()
    path = view.query("east", 10, 10, coordinator.clock())
    assert path is not None
    hops = [[view.entries[h.server].id, h.start, h.end] for h in path.hops]
    # fastest on the clients' mean first; but for east the second chain is the faster one
    chains = [
        {"hops": hops, "capacity": 2, "service_ms": 100.0, "client_ms": {"east": 300.0}},
        {"hops": hops, "capacity": 2, "service_ms": 150.0, "client_ms": {"east": 120.0}},
    ]
    if not per_site:
        for chain in chains:
            chain["client_ms"] = {"elsewhere": 1.0}  # no time for this view's sites
    publish_chains(database_url, chains)
    coordinator.invalidate()
    view = coordinator.view()
    assert [c.client_ms for c in view.chains] == ([(300.0,), (120.0,)] if per_site else [(), ()])
    picked = view.query("east", 10, 10, coordinator.clock())
    assert picked is not None and picked.chain == (1 if per_site else 0)
