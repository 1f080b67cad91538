import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.allocation import cg
from app.allocation.instance import Instance, Span
from app.allocation.perf import hops_for_path, per_token_ms, total_ms
from app.allocation.scenario import load_scenario, parse_scenario
from app.allocation.solve import solve
from tests.scenarios import CLUSTERED, build, scenario_dict, server

# L = 4, s_m = 1 GB, s_c = 0.1 GB; client at site a: RTT 10 ms to a, 50 ms to b.
TWO = build(
    servers=[server("s0", "a", memory=3.0, decode=2.0), server("s1", "b", memory=3.0, decode=1.0)]
)


def test_conservative_counts_sessions_and_amortised_order_by_hand() -> None:
    instance = Instance.from_scenario(TWO)
    assert cg.conservative_block_counts(instance, 2) == [2, 2]  # floor(3 / (1 + 0.1 x 2))
    assert cg.conservative_block_counts(instance, 1) == [2, 2]  # floor(3 / 1.1)
    assert cg.conservative_block_counts(instance, 20) == [1, 1]  # floor(3 / 3) capped by memory
    assert cg.sessions_per_server(instance, [2, 2]) == [5, 5]  # floor((3 - 2) / (0.1 x 2))
    result = cg.place(instance, 2)
    assert result.amortised_ms == pytest.approx((2 + 10 / 2, 1 + 50 / 2))
    assert result.order == (0, 1)
    # s0 takes the first window (all tie); s1 must take a window with an under-served block
    assert result.placement == (Span(0, 2), Span(2, 4))
    assert result.servers_to_cover == 2
    # Theorem 2: 7 x 2 + 26 x 2 - tau_K x (4 - 4)
    assert result.bound_ms_per_token == pytest.approx(66)
    routes = cg.shortest_routes(instance, result.placement)
    assert per_token_ms(instance, 0, routes[0].hops) == pytest.approx(10 + 2 * 2 + 50 + 2 * 1)


def test_lexicographic_rule_once_every_block_is_served() -> None:
    three = build(
        servers=[
            server("s0", "a", memory=3.0, decode=2.0),
            server("s1", "b", memory=3.0, decode=1.0),
            server("s2", "a", memory=3.0, decode=2.0),
        ]
    )
    result = cg.place(Instance.from_scenario(three), 2)
    assert result.order == (0, 2, 1)
    assert result.placement == (Span(0, 2), Span(0, 2), Span(2, 4))
    assert result.servers_to_cover == 2
    assert result.bound_ms_per_token == pytest.approx(28)


def test_window_rules_directly() -> None:
    capacity = np.array([3, 1, 2, 1, 5])
    # sorted windows: [1,3] [1,2] [1,2] [1,5]: the smallest is [1,2], first at start 1
    assert cg._least_served_window(capacity, 2) == 1
    assert cg._deficit_window(np.array([5, 5, 0, 0]), np.array([14.0, 14, 54, 54]), 2, 2) == 2
    # a window without an under-served block is never chosen, however large its deficit
    assert cg._deficit_window(np.array([0, 5, 5]), np.array([1.0, 90, 90]), 2, 2) == 0


def test_feasibility_bounds_and_error_message() -> None:
    instance = Instance.from_scenario(TWO)
    # R_max = floor((6 - 1 x (4 + 2)) / (0.1 x 6)) = 0 for 3 GB servers
    assert cg.paper_max_concurrency(instance) == 0
    big = Instance.from_scenario(
        build(
            servers=[server("s0", "a", memory=10, decode=1), server("s1", "a", memory=10, decode=1)]
        )
    )
    assert cg.paper_max_concurrency(big) == 23  # floor((20 - 6) / 0.6)
    # Corollary 1: 2 blocks per server need 1 + 0.1 R <= 1.5 -> R <= 5
    assert cg.is_feasible(instance, 5) and not cg.is_feasible(instance, 6)
    assert cg.max_feasible_concurrency(instance) == 5
    with pytest.raises(cg.InfeasibleError, match=r"4\.00 GB more GPU memory is missing") as caught:
        cg.place(instance, 10)  # m = [1, 1]: 2 blocks missing at 1 + 0.1 x 10 GB each
    assert "at most 5 concurrent requests fit" in str(caught.value)


def test_design_concurrency_follows_the_authors_rule() -> None:
    scenario = load_scenario(CLUSTERED)
    instance = Instance.from_scenario(scenario)
    single = cg.place(instance, 1)
    route = cg.shortest_routes(instance, single.placement)[0]
    t1 = total_ms(instance, 0, route.hops)
    for rate in (0.1, 0.5):
        x = rate * t1 / 1000
        expected = min(round(x + x**0.5), cg.paper_max_concurrency(instance))
        assert cg.design_concurrency(instance, rate) == expected
    assert cg.design_concurrency(instance, 1000.0) == min(
        cg.paper_max_concurrency(instance), cg.max_feasible_concurrency(instance)
    )


def test_clustered_example_uses_both_a100s() -> None:
    solution = solve(load_scenario(CLUSTERED), "cg", 10)
    assert solution.routes[0].requests == 10
    assert [h.server for h in solution.routes[0].hops] == [0, 1]
    # per-token time: 2 x (100 ms RTT + 100 ms overhead) + 70 blocks x 3.2197 ms
    assert solution.objective_ms_per_token == pytest.approx(400 + 70 * 3.2197)
    assert solution.bound_ms_per_token == pytest.approx(solution.objective_ms_per_token)


@st.composite
def swarms(draw: st.DrawFn) -> dict[str, object]:
    num_blocks = draw(st.integers(1, 10))
    sites = ["a", "b", "c"]
    n = draw(st.integers(1, 6))
    servers = [
        server(
            f"s{i}",
            draw(st.sampled_from(sites)),
            memory=draw(st.floats(1.1, 12.0)),
            decode=draw(st.floats(0.5, 20.0)),
        )
        for i in range(n)
    ]
    clients = [
        {"id": f"c{i}", "site": draw(st.sampled_from(sites)), "share": draw(st.floats(0.1, 1.0))}
        for i in range(draw(st.integers(1, 3)))
    ]
    rtt = [[draw(st.floats(1, 200)) for _ in sites] for _ in sites]
    return scenario_dict(
        num_blocks=num_blocks,
        servers=servers,
        clients=clients,
        sites=sites,
        site_rtt=rtt,
        overheads={"per_token_ms": draw(st.floats(0, 50))},
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(swarms(), st.integers(1, 6))
def test_cg_properties(data: dict[str, object], concurrency: int) -> None:
    scenario = parse_scenario(data)
    instance = Instance.from_scenario(scenario)
    if not cg.is_feasible(instance, concurrency):
        with pytest.raises(cg.InfeasibleError):
            cg.place(instance, concurrency)
        return
    result = cg.place(instance, concurrency)
    capacity = np.zeros(instance.num_blocks)
    for j, span in enumerate(result.placement):
        if span is None:
            continue
        # memory: weights plus |R| caches on every hosted block fit
        needed = instance.block_gb * span.length + instance.cache_gb * concurrency * span.length
        assert needed <= instance.memory_gb[j] + 1e-9
        capacity[span.start : span.end] += result.sessions[j]
    assert (capacity >= concurrency).all()  # every block served |R| times over
    solution = solve(scenario, "cg", concurrency)
    load = np.zeros(instance.num_servers)
    for planned in solution.routes:
        # routes are feasible chains that cover the blocks in order
        servers = [h.server for h in planned.hops]
        assert hops_for_path(result.placement, servers, instance.num_blocks) == planned.hops
        for hop in planned.hops:
            load[hop.server] += planned.requests * hop.blocks
    for j, span in enumerate(result.placement):
        if span is not None:
            assert load[j] <= instance.cache_slots(j, span.length)  # routing never overcommits
    assert sum(p.requests for p in solution.routes) == concurrency
    assert solution.bound_ms_per_token is not None
    assert solution.objective_ms_per_token <= solution.bound_ms_per_token + 1e-6  # Theorem 2
