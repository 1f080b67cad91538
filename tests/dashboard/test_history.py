"""The dashboard's history (a ring buffer sampled from the route view and the telemetry),
GET /v1/history, the re-plan marks, predicted vs measured per generation, and the bottleneck
named in GET /v1/overview."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.service import telemetry
from app.service.activity import History, Snapshot
from app.service.overview import record_history
from tests.api.conftest import FakeClock, admin, example_scenario

BOOKING = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 64}


def snapshot(at: float, generation: int = 1, **totals: Any) -> Snapshot:
    values: dict[str, Any] = {
        "booked_total": 0,
        "refused_total": 0,
        "wait_s_total": 0.0,
        "waits_total": 0,
        **totals,
    }
    return Snapshot(
        at=at,
        generation=generation,
        routable_servers=3,
        coverage=1.0,
        active_sessions=2,
        queue_depth=1,
        **values,
    )


def test_history_differences_the_running_totals() -> None:
    history = History(capacity=3, interval_s=2.0)
    history.add(snapshot(10.0, booked_total=5, refused_total=1))
    history.add(snapshot(12.0, booked_total=8, refused_total=3, wait_s_total=6.0, waits_total=3))
    history.add(snapshot(14.0, booked_total=8, refused_total=3, wait_s_total=6.0, waits_total=3))
    out = history.out(10, [])
    assert [p.booked for p in out.points] == [0, 3, 0]  # the first sample has no interval
    assert [p.refused for p in out.points] == [0, 2, 0]
    assert [p.mean_wait_s for p in out.points] == [None, 2.0, None]
    # Totals that restart (a new process) never give negative counts.
    history.add(snapshot(16.0, booked_total=1))
    out = history.out(10, [])
    assert [p.at for p in out.points] == [12.0, 14.0, 16.0]  # bounded: the oldest dropped
    assert out.points[-1].booked == 0 and out.points[-1].refused == 0
    assert [p.at for p in history.out(2, []).points] == [14.0, 16.0]
    with pytest.raises(ValueError, match="capacity"):
        History(capacity=0)
    with pytest.raises(ValueError, match="interval"):
        History(interval_s=0)


def test_generation_changes_are_marked_with_their_reason() -> None:
    history = History()
    assert history.add(snapshot(1.0, generation=1)) is False  # nothing to compare with
    assert history.add(snapshot(2.0, generation=1)) is False
    assert history.add(snapshot(3.0, generation=2), reason="coverage_lost") is True
    assert history.add(snapshot(4.0, generation=3)) is True
    marks = history.out(100, []).replans
    assert [(m.at, m.generation, m.reason) for m in marks] == [
        (3.0, 2, "coverage_lost"),
        (4.0, 3, "not recorded"),
    ]
    # Only the re-plans inside the returned window.
    assert [m.generation for m in history.out(1, []).replans] == [3]


def test_history_route_samples_the_live_swarm(client: TestClient, clock: FakeClock) -> None:
    app: Any = client.app
    history: History = app.state.history
    loaded = client.post("/v1/scenario", json=example_scenario(), headers=admin())
    assert loaded.status_code == 201
    generation = loaded.json()["generation"]
    start = len(client.get("/v1/history").json()["points"])  # the sampler's own, if any
    coordinator = app.state.coordinator
    record_history(coordinator, history)
    assert client.post("/v1/sessions", json=BOOKING).status_code == 201
    telemetry.record_booking("cluster0", "booked", 0.5)  # what the sessions code records
    telemetry.record_booking("cluster0", "refused", 0.0)
    clock.advance(2)
    record_history(coordinator, history)
    body = client.get("/v1/history").json()
    assert body["interval_s"] == history.interval_s and body["capacity"] == history.capacity
    first, second = body["points"][start:]
    assert second["at"] - first["at"] == 2.0
    assert (first["generation"], second["generation"]) == (generation, generation)
    routable = client.get("/v1/overview").json()["routable_servers"]
    assert second["routable_servers"] == routable >= 1 and second["coverage"] == 1.0
    assert (first["active_sessions"], second["active_sessions"]) == (0, 1)
    assert second["booked"] >= 1 and second["refused"] >= 1
    assert second["mean_wait_s"] is not None
    # The published placement's objective is recorded as the generation's prediction.
    placement = client.get("/v1/placements/current").json()
    times = {g["generation"]: g for g in body["generations"]}
    assert times[generation]["predicted_ms_per_token"] == placement["objective_ms_per_token"]
    assert times[generation]["measured_ms_per_token"] is None
    assert client.get("/v1/history", params={"limit": 1}).json()["points"] == [second]
    for bad in ({"limit": 0}, {"limit": 10_001}):
        refused = client.get("/v1/history", params=bad)
        assert refused.status_code == 422 and "limit" in refused.text


def test_the_bottleneck_names_the_blocks_with_fewest_copies(
    client: TestClient, clock: FakeClock
) -> None:
    assert client.get("/v1/overview").json()["bottleneck"] is None  # no model yet
    assert client.post("/v1/scenario", json=example_scenario(), headers=admin()).status_code == 201
    body = client.get("/v1/overview").json()
    copies = body["block_servers"]
    neck = body["bottleneck"]
    fewest = min(copies)
    assert neck["live_copies"] == fewest >= 1
    named = {b for start, end in neck["blocks"] for b in range(start, end)}
    assert named == {b for b, count in enumerate(copies) if count == fewest}
    servers = {s["id"]: s for s in client.get("/v1/servers").json()}
    hosting = {
        server_id
        for server_id, s in servers.items()
        if s["loaded_span"]
        and named & set(range(s["loaded_span"]["start"], s["loaded_span"]["end"]))
    }
    assert set(neck["servers"]) == hosting
    assert neck["cache_used"] == 0.0 and "0% of their cache in use" in neck["text"]
    # Servers the placement leaves without a span are named as idle.
    idle = sorted(i for i, s in servers.items() if s["assigned_span"] is None)
    assert neck["idle"] == idle
    if idle:
        plural = "s" if len(idle) > 1 else ""
        assert neck["text"].endswith(
            f"; {len(idle)} server{plural} idle (no span in the placement)"
        )
    assert f"only {fewest} live cop" in neck["text"]
    # A session through the bottleneck uses its cache.
    session = client.post("/v1/sessions", json=BOOKING)
    assert session.status_code == 201
    assert client.get("/v1/overview").json()["bottleneck"]["cache_used"] > 0
    # Leases run out: every block has no live copy, and the text says no route can be built.
    clock.advance(20)
    lost = client.get("/v1/overview").json()["bottleneck"]
    assert lost["live_copies"] == 0 and lost["servers"] == [] and lost["cache_used"] is None
    assert lost["idle"] == []  # their leases ran out too
    assert lost["blocks"] == [[0, len(copies)]]
    assert (
        lost["text"]
        == f"blocks 0-{len(copies) - 1} have no live copy: no route until a server hosts them"
    )
