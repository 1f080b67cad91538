"""Hand-checked timelines, conservation properties and determinism of the simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.allocation.instance import Instance, Span
from app.allocation.perf import Hop
from app.allocation.routing import Route
from app.simulation import generators
from app.simulation.engine import Retry, SimResult, SimulationError, Simulator, Start
from app.simulation.policies import (
    POLICIES,
    FixedRoutePolicy,
    WsrrPolicy,
    cg_capacity,
)
from app.simulation.run import peak_concurrency, simulate
from tests.simulation.helpers import fixed_workload, two_server_scenario

# Two-server swarm: s0 hosts block 0, s1 block 1, one cache slot each. Route s0 -> s1.
# prefill = 2 x (10 ms RTT + 7 ms) = 34 ms; decode step = 2 x (10 + 2) = 24 ms;
# a 3-token request takes 34 + 2 x 24 = 82 ms.
PLACEMENT = (Span(0, 1), Span(1, 2))
ROUTE = (Hop(0, 0, 1), Hop(1, 1, 2))


def run_two_server(policy_kind: str, arrivals: list[float]) -> SimResult:
    scenario = two_server_scenario()
    instance = Instance.from_scenario(scenario)
    capacity = cg_capacity(instance, PLACEMENT)
    assert capacity == [10, 10]  # units: 1.05 GB / 1e8 B; a 7-token request holds 7
    policy: FixedRoutePolicy | WsrrPolicy
    if policy_kind == "sp":
        policy = FixedRoutePolicy("sp", PLACEMENT, capacity, [Route(ROUTE, 0.0)])
    else:
        policy = WsrrPolicy("wsrr", instance, PLACEMENT, capacity)
    return Simulator(instance, fixed_workload(arrivals), policy).run()


@pytest.mark.parametrize("kind", ["sp", "wsrr"])
def test_two_server_timeline_by_hand(kind: str) -> None:
    result = run_two_server(kind, [0.0, 50.0, 200.0])
    # r0 runs at once; r1 arrives while r0 holds both slots and waits until r0 ends at 82;
    # r2 finds the swarm idle.
    assert result.start_ms.tolist() == [0.0, 82.0, 200.0]
    assert result.first_token_ms.tolist() == [34.0, 116.0, 234.0]
    assert result.end_ms.tolist() == [82.0, 164.0, 282.0]
    assert result.routes == [ROUTE, ROUTE, ROUTE]
    assert result.peak_slots == [7, 7]
    summary = result.summary()
    assert summary["mean_wait_ms"] == pytest.approx(32.0 / 3)
    assert summary["mean_ttft_ms"] == pytest.approx((34 + 66 + 34) / 3)
    assert summary["mean_e2e_ms"] == pytest.approx((82 + 114 + 82) / 3)
    assert summary["mean_ms_per_token"] == pytest.approx((82 + 114 + 82) / 3 / 3)
    # arrival, start, end for every request: 9 events, no per-token events.
    assert summary["events"] == 9


def test_release_at_the_same_instant_admits_the_next_request() -> None:
    # r1 arrives exactly when r0 ends: the release comes first, so r1 does not wait.
    result = run_two_server("sp", [0.0, 82.0])
    assert result.start_ms.tolist() == [0.0, 82.0]


@pytest.mark.parametrize("kind", ["sp", "wsrr"])
def test_booked_start_is_exactly_the_release_instant(kind: str) -> None:
    # r0 ends at 17.52 + 82 = 99.52; r1 arriving at 33.51 books that instant. In floating
    # point 33.51 + (99.52 - 33.51) = 99.51999999999998: a start computed as now + wait
    # would come one ulp before r0's release and find its slots still held.
    assert 33.51 + ((17.52 + 82.0) - 33.51) < 17.52 + 82.0
    result = run_two_server(kind, [17.52, 33.51])
    assert result.start_ms[1] == result.end_ms[0] == 17.52 + 82.0
    assert result.completions.tolist() == [1, 1]


def test_overcommitting_policy_is_caught() -> None:
    scenario = two_server_scenario()
    instance = Instance.from_scenario(scenario)

    class Greedy:
        name = "greedy"
        placement = PLACEMENT
        capacity = (1, 1)

        def decide(self, sim: Simulator, request: int, now: float) -> Start | Retry:
            return Start(ROUTE, now)  # ignores the free slots

    with pytest.raises(SimulationError, match="capacity"):
        Simulator(instance, fixed_workload([0.0, 1.0]), Greedy()).run()


def test_retry_must_move_time_forward() -> None:
    instance = Instance.from_scenario(two_server_scenario())

    class Stuck:
        name = "stuck"
        placement = PLACEMENT
        capacity = (1, 1)

        def decide(self, sim: Simulator, request: int, now: float) -> Start | Retry:
            return Retry(now)

    with pytest.raises(SimulationError, match="future"):
        Simulator(instance, fixed_workload([0.0]), Stuck()).run()


def check_conservation(result: SimResult, instance: Instance) -> None:
    n = result.requests
    assert result.completions.tolist() == [1] * n  # every request completes exactly once
    wait = result.start_ms - result.arrival_ms
    assert (wait >= 0).all()
    assert (result.first_token_ms > result.start_ms).all()
    assert (result.end_ms >= result.first_token_ms).all()
    # Replay the cache books independently from the recorded routes.
    deltas: dict[int, list[tuple[float, int]]] = {}
    for request, hops in enumerate(result.routes):
        tokens = int(result.tokens[request])  # each request holds its own tokens per block
        for server, start, end in hops:
            units = (end - start) * tokens
            deltas.setdefault(server, []).append((float(result.start_ms[request]), units))
            deltas[server].append((float(result.end_ms[request]), -units))
    for server, changes in deltas.items():
        changes.sort(key=lambda c: (c[0], c[1]))  # releases first at the same instant
        used = np.cumsum([c[1] for c in changes])
        assert used.max() <= result.capacity[server]
        assert used.max() == result.peak_slots[server]
        assert used[-1] == 0


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "milp-wsrr"])
@pytest.mark.parametrize("seed", [1, 2])
def test_conservation_on_random_swarms(policy: str, seed: int) -> None:
    scenario = generators.random_clustered(12, 0.25, 3.0, 150, seed, l_max=32)
    result = simulate(scenario, policy)
    instance = Instance.from_scenario(scenario)
    check_conservation(result, instance)
    if policy.startswith("cg") or policy in ("milp-wsrr", "auto", "chains"):
        # Caches use the memory left after the weights: never more than the GPU has.
        for j, span in enumerate(result_placement(scenario, policy)):
            if span is None:
                continue
            cache_gb = instance.kv_bytes * result.peak_slots[j] / 1e9
            assert instance.block_gb * span.length + cache_gb <= instance.memory_gb[j] + 1e-9


def result_placement(scenario: object, policy: str) -> tuple[Span | None, ...]:
    from app.simulation.policies import build_policy
    from app.simulation.workload import scenario_workload

    assert hasattr(scenario, "workload")
    instance = Instance.from_scenario(scenario)  # type: ignore[arg-type]
    rate = scenario_workload(scenario).rate_per_s  # type: ignore[arg-type]
    return build_policy(policy, scenario, instance, rate).policy.placement  # type: ignore[arg-type]


def test_milp_wsrr_conserves_on_the_clustered_testbed() -> None:
    scenario = generators.clustered(32, 0.5, 40, 3)
    result = simulate(scenario, "milp-wsrr", milp_time_limit_s=2.0)
    check_conservation(result, Instance.from_scenario(scenario))


def test_same_seed_same_bytes_other_seed_differs() -> None:
    scenario = generators.random_clustered(15, 0.2, 2.0, 120, 4, l_max=32)

    def fingerprint(seed: int) -> str:
        result = simulate(scenario, "petals", seed)
        summary = result.summary()
        for key in ("wall_seconds", "events_per_second", "placement_seconds"):
            summary.pop(key)
        arrays = [result.start_ms, result.first_token_ms, result.end_ms, result.attempts]
        return json.dumps(summary) + "".join(a.tobytes().hex() for a in arrays)

    assert fingerprint(7) == fingerprint(7)
    assert fingerprint(7) != fingerprint(8)


def test_peak_concurrency_counts_overlaps() -> None:
    result = run_two_server("sp", [0.0, 50.0, 200.0])
    assert peak_concurrency(result) == 2
    assert peak_concurrency(run_two_server("sp", [0.0, 82.0])) == 1
