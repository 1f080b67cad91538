"""POST /v1/placements with every algorithm through the worker process, and its time limit."""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.allocation import replan
from app.allocation.instance import Instance, Span
from app.allocation.scenario import parse_scenario
from app.service import planner
from tests.api.conftest import admin, example_scenario


def _load_example(client: TestClient) -> None:
    loaded = client.post("/v1/scenario", json=example_scenario(), headers=admin())
    assert loaded.status_code == 201, loaded.text


def _check_valid(placement: dict[str, Any]) -> float:
    """The published placement is valid for the scenario it was solved on; returns the
    objective recomputed from its stored inputs and spans."""
    scenario = parse_scenario(placement["inputs"])
    instance = Instance.from_scenario(scenario)
    blocks = scenario.model.num_blocks
    covered: set[int] = set()
    by_server = {}
    for span in placement["spans"]:
        assert span["server_id"] in instance.server_ids
        assert 0 <= span["start"] < span["end"] <= blocks, span
        covered.update(range(span["start"], span["end"]))
        by_server[span["server_id"]] = Span(span["start"], span["end"])
    assert covered == set(range(blocks))
    aligned = planner.aligned_current(instance.server_ids, by_server)
    for j, span in enumerate(aligned):
        if span is not None:  # the weights and at least one attention cache fit
            assert instance.cache_slots(j, span.length) >= 1, (instance.server_ids[j], span)
    counts = scenario.client_request_counts(placement["concurrency"])
    objective = replan.evaluate(instance, aligned, counts)
    assert objective is not None
    return objective


@pytest.mark.parametrize("algorithm", ["petals", "milp"])
def test_placement_algorithms_publish_valid_placements(client: TestClient, algorithm: str) -> None:
    _load_example(client)
    body = {"algorithm": algorithm, "concurrency": 3, "time_limit_s": 20}
    response = client.post("/v1/placements", json=body, headers=admin())
    assert response.status_code == 201, response.text
    placed = response.json()
    assert placed["algorithm"] == algorithm and placed["concurrency"] == 3
    assert placed["generation"] == 2  # the scenario load published generation 1 (cg)
    objective = _check_valid(placed)
    assert placed["objective_ms_per_token"] == pytest.approx(objective, abs=0.05)  # 0.1 ms
    if algorithm == "milp":
        assert placed["status"] in {"optimal", "feasible"}
        bound = placed["bound_ms_per_token"]
        assert bound is not None and math.isfinite(bound) and bound > 0
        if placed["status"] == "optimal":
            # Shortest routes on the optimal placement are no slower than its planned routes.
            assert objective <= bound * (1 + 1e-6)
    else:
        assert placed["status"] == "heuristic" and placed["bound_ms_per_token"] is None
    # What was published is what is stored: by generation and as the current placement.
    stored = client.get(f"/v1/placements/{placed['generation']}").json()
    assert stored == placed
    assert client.get("/v1/placements/current").json()["generation"] == placed["generation"]


def test_a_solver_past_its_time_limit_is_killed_and_answers_503(client: TestClient) -> None:
    _load_example(client)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    coordinator.solver_grace_s = 0.05  # a worker that cannot answer in 0.1 s is killed
    started = time.monotonic()
    response = client.post(
        "/v1/placements",
        json={"algorithm": "milp", "concurrency": 3, "time_limit_s": 0.05},
        headers=admin(),
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert "time limit" in response.json()["detail"]
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 120  # a hang guard (limit + grace + the kill), not a speed target
    assert multiprocessing.active_children() == []  # the worker is gone
    # Nothing was published: generation 1 (the scenario load's) is still current.
    assert client.get("/v1/placements/current").json()["generation"] == 1


def test_no_solution_within_the_limit_is_a_422_naming_time_limit(client: TestClient) -> None:
    _load_example(client)
    response = client.post(
        "/v1/placements",
        json={"algorithm": "milp", "concurrency": 3, "time_limit_s": 0.001},
        headers=admin(),
    )
    # Below the 0.01 s floor: refused before any solver runs, naming the field.
    assert response.status_code == 422, response.text
    assert "time_limit_s" in response.text
    assert client.get("/v1/placements/current").json()["generation"] == 1
