import json
import math
from typing import Any

import numpy as np
import pytest

from app.allocation import petals
from app.allocation.cg import InfeasibleError
from app.allocation.instance import Instance, Span
from app.allocation.perf import Hop, per_token_ms
from app.allocation.scenario import load_scenario, parse_scenario
from app.allocation.solve import solve
from app.cli import main
from tests.scenarios import CLUSTERED, scenario_dict, server

GIB = 1024**3


def toy(
    servers: list[dict[str, Any]],
    *,
    num_blocks: int = 4,
    hidden: int = 1434,
    cache_tokens: int = 200,
    **kwargs: Any,
) -> Any:
    """L blocks of 1 GB, kv 1e6 B/token/block, 50 + 50 tokens (s_c = 0.1 GB); PETALS: a
    ~0.2147 GB reserve (2 GiB / 10) and 200 cache tokens = 0.2 GB, i.e. 2 slots, per block."""
    data = scenario_dict(num_blocks=num_blocks, servers=servers, **kwargs)
    data["model"]["hidden_size"] = hidden
    data["model"]["petals_cache_tokens"] = cache_tokens
    return parse_scenario(data)


def fast_network(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "network_mbps": 1e6}


# --- sizing ------------------------------------------------------------------------------


def test_clustered_example_gives_53_blocks_per_a100_and_4_per_mig() -> None:
    scenario = load_scenario(CLUSTERED)
    assert scenario.model.effective_hidden_size == 14336
    assert scenario.model.effective_petals_cache_tokens == 4096
    assert petals.petals_block_counts(scenario) == [53, 53] + [4] * 7
    # The paper's arithmetic: (86.13e9 - 2 GiB) / (1.3234e9 + 2 x 14336 x 4096 x 2) = 53.9
    per_block = 1.3234e9 + 2 * 14336 * 4096 * 2
    assert math.floor((86.13e9 - 2 * GIB) / per_block) == 53
    assert math.floor((9.1e9 - 2 * GIB) / per_block) == 4


def test_reserve_is_gib_while_memory_is_gb() -> None:
    # 10 blocks' worth plus 2.1 GB: enough for 10 blocks if the reserve were 2 GB (decimal),
    # not with PETALS' 2 GiB = 2.147 GB.
    scenario = parse_scenario(
        {
            **scenario_dict(
                num_blocks=70,
                kv_bytes=57344,
                block_gb=1.3234,
                servers=[server("s", "a", memory=2.1 + 10 * 1.558281024, decode=1.0)],
            )
        }
    )
    assert petals.autograd_reserve_bytes(scenario) == pytest.approx(2 * GIB)
    assert petals.cache_bytes_per_block(scenario) == 2 * 14336 * 4096 * 2
    assert petals.petals_block_counts(scenario) == [9]


def test_grouped_query_model_uses_16384_cache_tokens() -> None:
    # Llama-2-70B-like: hidden 8192, 8 kv heads of 128 in fp16 -> 4096 B/token/block (GQA).
    data = scenario_dict(
        num_blocks=80,
        kv_bytes=4096,
        block_gb=0.5,
        input_tokens=1000,
        output_tokens=1000,
        servers=[
            server("big", "a", memory=40.0, decode=1.0),
            server("tiny", "a", memory=1.5, decode=1.0),
            server("huge", "b", memory=200.0, decode=1.0),
        ],
    )
    data["model"]["hidden_size"] = 8192
    scenario = parse_scenario(data)
    assert scenario.model.effective_petals_cache_tokens == 16384
    # reserve = 2 GiB x 8192 / 14336 = 1227133513.14 B; per block = 0.5e9 + 4096 x 16384
    # big: (40e9 - 1227133513.14) / 567108864 = 68.37; tiny: 0.48 -> 0; huge: capped at L
    assert petals.petals_block_counts(scenario) == [68, 0, 80]
    # cache: 68 blocks x 16384 tokens / (1000 + 1000) tokens per request
    assert petals.petals_cache_slots(scenario, [68, 0, 80]) == [557, 0, 655]
    # An explicit cache size overrides the default: 4096 tokens -> (40e9 - r) / 516777216
    data["model"]["petals_cache_tokens"] = 4096
    assert petals.petals_block_counts(parse_scenario(data))[0] == 75


# --- throughput --------------------------------------------------------------------------


def test_throughput_formula() -> None:
    assert petals.throughput_rps(1000.0, 300.0, 3) == 300.0  # network binds
    assert petals.throughput_rps(1000.0, 600.0, 3) == 500.0  # 1000 / ((3 + 1) / 2)
    assert petals.throughput_rps(1000.0, 1e9, 1) == 1000.0
    with pytest.raises(ValueError):
        petals.throughput_rps(1000.0, 1.0, 0)
    scenario = toy(
        [
            {**server("s0", "a", memory=9.0, decode=2.0, prefill_fixed=100.0), "network_mbps": 1e6},
            server("s1", "a", memory=9.0, decode=2.0, prefill_fixed=50.0, prefill_per_token=0.05),
        ]
    )
    # s0: forward 1024 x 1000 / 100 = 10240 rps, 4 blocks -> 10240 / 2.5 = 4096
    # s1: forward 1024000 / (50 + 51.2) = 10118.6, but network 100 Mbit/s / (1434 x 16 bit) = 4358.4
    tps = petals.server_throughputs(scenario, [4, 1])
    assert tps[0] == pytest.approx(4096.0)
    assert tps[1] == pytest.approx(1e8 / (1434 * 16))
    assert petals.server_throughputs(scenario, [0, 1])[0] == 0.0


def test_clustered_throughputs() -> None:
    scenario = load_scenario(CLUSTERED)
    tps = petals.server_throughputs(scenario, petals.petals_block_counts(scenario))
    a100 = 1024e3 / (32.99 + 0.0743 * 1024) / 27  # compute-bound: 347.7 rps
    network = 100e6 / (14336 * 16)  # MIG: 3272 / 2.5 rps exceeds the network's 436 rps
    assert tps == pytest.approx([a100, a100] + [network] * 7)


# --- block selection ---------------------------------------------------------------------


def test_lexicographically_smallest_sorted_window() -> None:
    # [0, 5, 5] has the largest sum but the only zero: the sorted vector is smallest.
    assert petals.choose_best_start([0, 5, 5, 1, 1, 1], 3) == 0
    # second element decides when the minima tie: sorted [0, 1] < [0, 9] < [1, 1]
    assert petals.choose_best_start([1, 1, 0, 9], 2) == 1
    assert petals.choose_best_start([2, 2, 2, 2], 2) == 0  # ties: lowest start
    assert petals.choose_best_start([3, 0, 0, 0], 4) == 0
    with pytest.raises(ValueError):
        petals.choose_best_start([1, 2], 3)


def _three_servers() -> Any:
    # forward 10240 rps each (prefill 100 ms), fast network: 2 blocks -> 6826.7, 3 -> 5120
    return toy(
        [
            fast_network(server(f"s{j}", "a", memory=9.0, decode=1.0, prefill_fixed=100.0))
            for j in range(3)
        ]
    )


def test_join_order_decides_the_windows() -> None:
    scenario = _three_servers()
    instance = Instance.from_scenario(scenario)
    counts = [2, 2, 3]
    # 0, 1, 2: s0 -> [0,2); s1 -> [2,4) (zeros); s2 sees [a,a,a,a] and takes start 0.
    default = petals.petals_place(scenario, instance, block_counts=counts)
    assert default.placement == (Span(0, 2), Span(2, 4), Span(0, 3))
    assert default.join_order == (0, 1, 2)
    # 1, 2, 0: s1 -> [0,2) = [a,a,0,0]; s2 -> [1,4) (sorted [0,a,a] vs [0,0,a]: the latter);
    # s0 sees [a, a+b, b, b] with b = 5120 < a = 6826.7 and takes [2,4).
    reordered = petals.petals_place(scenario, instance, order=[1, 2, 0], block_counts=counts)
    assert reordered.placement == (Span(2, 4), Span(0, 2), Span(1, 4))
    assert reordered.join_order == (1, 2, 0)
    assert reordered.throughputs == pytest.approx((10240 / 1.5, 10240 / 1.5, 10240 / 2))
    assert reordered.block_counts == (2, 2, 3)
    assert reordered.cache_slots == (4, 4, 6)  # m x 200 tokens / 100 tokens per request


def test_bad_order_and_counts_are_rejected() -> None:
    scenario = _three_servers()
    instance = Instance.from_scenario(scenario)
    with pytest.raises(ValueError, match="order"):
        petals.petals_place(scenario, instance, order=[0, 0, 1])
    with pytest.raises(ValueError, match="block_counts"):
        petals.petals_place(scenario, instance, block_counts=[1, 2])
    with pytest.raises(ValueError, match=r"block_counts\[2\]"):
        petals.petals_place(scenario, instance, block_counts=[1, 2, 5])


def test_clustered_placement() -> None:
    scenario = load_scenario(CLUSTERED)
    result = petals.petals_place(scenario, Instance.from_scenario(scenario))
    # The second A100 takes the window with the most unserved blocks: [17, 70).
    assert result.placement[:2] == (Span(0, 53), Span(17, 70))
    assert [s.length for s in result.placement if s is not None] == [53, 53] + [4] * 7
    # 4096 cache tokens per block, 148 tokens per request
    assert result.cache_slots == (53 * 4096 // 148,) * 2 + (4 * 4096 // 148,) * 7


# --- rebalancing -------------------------------------------------------------------------


def test_balance_quality_by_hand() -> None:
    # X and Y (10 rps) both on block 0, Z (1 rps) alone on block 1: Y moving to block 1 lifts
    # the bottleneck from 1 to 10 -> quality 0.1.
    spans = [Span(0, 1), Span(0, 1), Span(1, 2)]
    assert petals.balance_quality_after_move(spans, [10, 10, 1], 1, 2) == pytest.approx(0.1)
    assert petals.should_choose_other_blocks(spans, [10, 10, 1], 1, 2)
    # Y at 2 rps, Z at 9: moving lifts 9 to 10 only -> quality 0.9, stay.
    assert petals.balance_quality_after_move(spans, [10, 2, 9], 1, 2) == pytest.approx(0.9)
    assert not petals.should_choose_other_blocks(spans, [10, 2, 9], 1, 2)
    # The only server of a block never leaves it (the swarm would be disjoint).
    assert petals.balance_quality_after_move(spans, [10, 10, 1], 2, 2) is None
    # balance_quality > 1 forces a move, as in PETALS
    assert petals.should_choose_other_blocks(spans, [10, 2, 9], 1, 2, balance_quality=1.5)


def _rebalance_case(third_forward_prefill_ms: float) -> Any:
    # L = 3; s0 and s1 hold 2 blocks at 5 rps forward (prefill 204800 ms -> 5 rps, / 1.5),
    # s2 holds 1 block. Join: s0 [0,2), s1 [1,3), s2 [0,1) (tie with block 2, lowest start).
    return toy(
        [
            fast_network(server("s0", "a", memory=9.0, decode=1.0, prefill_fixed=204800.0)),
            fast_network(server("s1", "a", memory=9.0, decode=1.0, prefill_fixed=204800.0)),
            fast_network(
                server("s2", "a", memory=9.0, decode=1.0, prefill_fixed=third_forward_prefill_ms)
            ),
        ],
        num_blocks=3,
    )


def test_rebalancing_moves_a_server_only_below_quality_075() -> None:
    counts = [2, 2, 1]
    # s2 at 20 rps: s0 moving to [1,3) lifts the bottleneck 3.33 -> 6.67: quality 0.5, move.
    scenario = _rebalance_case(51200.0)
    instance = Instance.from_scenario(scenario)
    joined = petals.petals_place(scenario, instance, block_counts=counts)
    assert joined.placement == (Span(0, 2), Span(1, 3), Span(0, 1))
    quality = petals.balance_quality_after_move(
        joined.placement, joined.throughputs, 0, instance.num_blocks
    )
    assert quality == pytest.approx(0.5)
    moved = petals.petals_place(scenario, instance, block_counts=counts, rebalance=True)
    assert moved.placement == (Span(1, 3), Span(1, 3), Span(0, 1))
    assert moved.moves == 1
    # s2 at 4 rps: the same move only lifts 3.33 -> 4: quality 0.83, nobody moves.
    scenario = _rebalance_case(256000.0)
    instance = Instance.from_scenario(scenario)
    joined = petals.petals_place(scenario, instance, block_counts=counts)
    quality = petals.balance_quality_after_move(
        joined.placement, joined.throughputs, 0, instance.num_blocks
    )
    assert quality == pytest.approx((5 / 1.5) / 4)
    kept = petals.petals_place(scenario, instance, block_counts=counts, rebalance=True)
    assert kept.placement == joined.placement
    assert kept.moves == 0


def test_clustered_swarm_is_balanced() -> None:
    scenario = load_scenario(CLUSTERED)
    instance = Instance.from_scenario(scenario)
    plain = petals.petals_place(scenario, instance)
    balanced = petals.petals_place(scenario, instance, rebalance=True)
    assert balanced.placement == plain.placement
    assert balanced.moves == 0


# --- routing -----------------------------------------------------------------------------


def _router_case() -> tuple[Any, Instance, tuple[Span, ...]]:
    # client at site a: RTT 10 ms to a, 50 ms to b. s0 [0,4) at a, s1 [0,2) at a, s2 [0,4) at b.
    scenario = toy(
        [
            server("s0", "a", memory=9.0, decode=1.0),
            server("s1", "a", memory=9.0, decode=1.0),
            server("s2", "b", memory=9.0, decode=1.0),
        ]
    )
    return scenario, Instance.from_scenario(scenario), (Span(0, 4), Span(0, 2), Span(0, 4))


def test_route_costs_by_hand() -> None:
    scenario, instance, placement = _router_case()
    router = petals.PetalsRouter(scenario, instance, placement)
    route = router.route(0)
    assert route is not None
    assert route.hops == (Hop(0, 0, 4),)
    assert route.cost == pytest.approx(5 + 18 + 4 * 1 + 5)  # RTT/2 + 18 ms + k tau + RTT/2
    all_free = router.route(0, np.array([100, 100, 100]))
    assert all_free is not None and all_free.hops == route.hops


def test_penalty_for_a_server_without_cache_changes_the_route() -> None:
    scenario, instance, placement = _router_case()
    router = petals.PetalsRouter(scenario, instance, placement)
    # s0 has 2 free slots but hosts 4 blocks: PETALS' pessimistic check penalises any use.
    route = router.route(0, np.array([2, 100, 100]))
    assert route is not None
    assert route.hops == (Hop(2, 0, 4),)
    assert route.cost == pytest.approx(25 + 18 + 4 + 25)
    # Judged by the blocks actually run there, s1 -> s0 (2 blocks at s0) is not penalised.
    by_hop = petals.PetalsRouter(scenario, instance, placement, cache_check="hop")
    route = by_hop.route(0, np.array([2, 100, 100]))
    assert route is not None
    assert route.hops == (Hop(1, 0, 2), Hop(0, 2, 4))
    assert route.cost == pytest.approx((5 + 18 + 2) + (5 + 18 + 2 + 5))
    # When every server lacks cache the penalties cancel out: the plain best path again.
    route = router.route(0, np.array([0, 0, 0]))
    assert route is not None
    assert route.hops == (Hop(0, 0, 4),)
    assert route.cost == pytest.approx(32 + petals.ALLOC_PENALTY_MS)


def test_banned_servers_are_excluded() -> None:
    scenario, instance, placement = _router_case()
    router = petals.PetalsRouter(scenario, instance, placement)
    route = router.route(0, banned=[0])
    assert route is not None
    assert 0 not in route.servers
    assert route.hops == (Hop(2, 0, 4),)  # 72 ms beats s1 -> s2 (25 + 95 ms)
    route = router.route(0, banned={0, 2})
    assert route is None  # s1 alone cannot finish the model
    with pytest.raises(ValueError, match="banned"):
        router.route(0, banned=[3])
    with pytest.raises(ValueError, match="free_slots"):
        router.route(0, np.array([1, 2]))
    with pytest.raises(ValueError, match="client"):
        router.route(1)


def test_half_rtt_is_capped_at_five_seconds() -> None:
    scenario = toy(
        [server("s0", "b", memory=9.0, decode=1.0)], site_rtt=[[10.0, 30000.0], [30000.0, 10.0]]
    )
    instance = Instance.from_scenario(scenario)
    route = petals.PetalsRouter(scenario, instance, (Span(0, 4),)).route(0)
    assert route is not None
    assert route.cost == pytest.approx(5000 + 18 + 4 + 5000)


# --- solve -------------------------------------------------------------------------------


def _cache_case() -> Any:
    # (5.3 GB - 0.2147) / (1 + 0.2) = 4.2 -> 4 blocks; cache 4 x 200 / 100 = 8 slots, i.e.
    # two requests over the whole span. s0 near (RTT 10, tau 2), s1 far (RTT 50, tau 1).
    return toy(
        [
            server("s0", "a", memory=5.3, decode=2.0),
            server("s1", "b", memory=5.3, decode=1.0),
        ]
    )


def test_solve_routes_requests_as_cache_is_taken() -> None:
    scenario = _cache_case()
    assert petals.petals_block_counts(scenario) == [4, 4]
    three = solve(scenario, "petals", concurrency=3)
    # two on the near server (10 + 4 x 2 = 18 ms per token), then it is full: the far one (54)
    assert three.objective_ms_per_token == pytest.approx((18 + 18 + 54) / 3)
    assert {(r.hops, r.requests) for r in three.routes} == {
        ((Hop(0, 0, 4),), 2),
        ((Hop(1, 0, 4),), 1),
    }
    assert three.details["requests_without_cache"] == 0
    assert three.bound_ms_per_token is None and three.optimal is None
    assert three.status == "heuristic"
    # the fifth finds both full: routed (with the penalty) on the cheaper path, counted
    five = solve(scenario, "petals", concurrency=5)
    assert five.objective_ms_per_token == pytest.approx((3 * 18 + 2 * 54) / 5)
    assert five.details["requests_without_cache"] == 1
    assert sum(r.requests for r in five.routes) == 5


def test_solve_on_clustered_example() -> None:
    scenario = load_scenario(CLUSTERED)
    solution = solve(scenario, "petals", concurrency=10)
    instance = Instance.from_scenario(scenario)
    assert solution.details["block_counts"] == [53, 53] + [4] * 7
    assert sum(r.requests for r in solution.routes) == 10
    expected = sum(r.requests * per_token_ms(instance, r.client, r.hops) for r in solution.routes)
    assert solution.objective_ms_per_token == pytest.approx(expected / 10)
    # a100-0 [0,53) then a100-1 [53,70): 2 x (100 + 100) ms + 70 x 3.2197 ms
    assert solution.objective_ms_per_token == pytest.approx(400 + 70 * 3.2197)


def test_unserved_blocks_are_reported() -> None:
    scenario = toy([server("s0", "a", memory=3.0, decode=1.0)])  # 2 blocks of 4
    with pytest.raises(InfeasibleError, match="2 of 4 blocks unserved"):
        solve(scenario, "petals", concurrency=1)


def test_cli_solve_petals_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["solve", str(CLUSTERED), "--algorithm", "petals", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["algorithm"] == "petals"
    assert out["bound_ms_per_token"] is None
    spans = {p["server"]: (p["start"], p["end"]) for p in out["placement"]}
    assert spans["a100-0"] == (0, 53) and spans["a100-1"] == (17, 70)
    assert sorted(end - start for start, end in spans.values()) == [4] * 7 + [53, 53]
    assert out["objective_ms_per_token"] > 0


def test_router_rejects_a_placement_of_the_wrong_size() -> None:
    scenario, instance, placement = _router_case()
    with pytest.raises(ValueError, match="placement"):
        petals.PetalsRouter(scenario, instance, placement[:2])
