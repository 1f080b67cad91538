"""GBP-CR, GCA, Theorem 4 and the search over c: hand-computed values and exhaustive search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.allocation import chain_search, chains
from app.allocation.instance import GB, Instance, Span, cache_token_capacity
from app.allocation.perf import Hop, hops_for_path
from app.allocation.workload import WorkloadProfile
from tests.scenarios import build, server

# tests.scenarios defaults: L = 4, s_m = 1 GB, 1e6 kv bytes per token per block, caps 50 + 50
# tokens, so one job at the caps holds 100 units = 0.1 GB per block. Client at site a; RTT 10 ms
# inside a site and 50 ms between; no overheads, no prefill cost.


def two_servers() -> tuple[Instance, WorkloadProfile]:
    scenario = build()  # s0 at a: 3 GB, decode 2 ms; s1 at b: 3 GB, decode 1 ms
    return Instance.from_scenario(scenario), WorkloadProfile.at_caps(scenario, 0.1)


def test_cache_token_capacity_hand_computed() -> None:
    # (3 GB - 2 x 1 GB) / 1e6 bytes = 1000 units; never negative; capped.
    assert cache_token_capacity(3.0, 1.0, 1e6, 2) == 1000
    assert cache_token_capacity(1.5, 1.0, 1e6, 2) == 0
    assert cache_token_capacity(1e12, 1.0, 1e-9, 0) == 2**62
    with pytest.raises(ValueError):
        cache_token_capacity(3.0, 1.0, 0.0, 1)


def test_job_costs_hand_computed() -> None:
    instance, profile = two_servers()
    costs = chains.job_costs(instance, profile)
    # tau_c = prefill hop (RTT) + 49 token hops (RTT): 50 x 10 and 50 x 50; tau_p = 49 x decode.
    assert costs.tau_c.tolist() == [500.0, 2500.0]
    assert costs.tau_p.tolist() == [98.0, 49.0]


def test_gbp_cr_hand_computed() -> None:
    instance, profile = two_servers()
    costs = chains.job_costs(instance, profile)
    # c = 1: m = floor(3 / (1 + 0.1)) = 2 on both; amortised (500 + 196) / 2 = 348 for s0,
    # (2500 + 98) / 2 = 1299 for s1: s0 takes [0, 2), s1 [2, 4); one chain of 696 + 2598 ms.
    result = chains.gbp_cr(instance, costs, 0.1, 1, rate_per_s=0.1, rho=0.7)
    assert result.block_counts == (2, 2)
    assert result.placement == (Span(0, 2), Span(2, 4))
    assert result.chains == ((Hop(0, 0, 2), Hop(1, 2, 4)),)
    assert result.rate_target_met  # 1 / 3.294 s >= 0.1 / 0.7
    # At a rate the single chain cannot reach, the shortfall is reported, not hidden.
    assert not chains.gbp_cr(instance, costs, 0.1, 1, rate_per_s=5.0).rate_target_met


def test_gbp_cr_last_server_shifts_back() -> None:
    scenario = build(
        servers=[
            server("s0", "a", memory=3.3, decode=1.0),  # m = 3 at c = 1
            server("s1", "a", memory=3.3, decode=2.0),  # m = 3, slower
        ]
    )
    instance = Instance.from_scenario(scenario)
    costs = chains.job_costs(instance, WorkloadProfile.at_caps(scenario, 0.1))
    result = chains.gbp_cr(instance, costs, 0.1, 1, rate_per_s=0.1)
    # s0 takes [0, 3); s1 starts at min(3, 4 - 3) = 1 to host its full 3 blocks: [1, 4),
    # and processes blocks [3, 4) of the chain.
    assert result.placement == (Span(0, 3), Span(1, 4))
    assert result.chains == ((Hop(0, 0, 3), Hop(1, 3, 4)),)


def test_gca_hand_computed_and_lemma1_and_memory() -> None:
    instance, profile = two_servers()
    costs = chains.job_costs(instance, profile)
    placement = (Span(0, 2), Span(2, 4))
    residual = chains.residual_slots(instance, placement, 100)
    assert residual == [10, 10]  # 1 GB left / 0.1 GB per job-block
    (chain,) = chains.gca(instance, costs, placement, residual)
    assert chain.hops == (Hop(0, 0, 2), Hop(1, 2, 4))
    assert chain.capacity == 5  # min(10 // 2, 10 // 2)
    assert chain.service_ms == pytest.approx(500 + 2 * 98 + 2500 + 2 * 49)


@pytest.mark.parametrize("seed", range(8))
def test_gca_chains_satisfy_lemma1_and_memory(seed: int) -> None:
    instance, profile, _ = random_case(seed)
    plan = chain_search.plan_chains(instance, profile)
    tokens = plan.design_tokens
    held = [0] * instance.num_servers
    for chain in plan.chains:
        assert chain.capacity >= 1
        path = [h.server for h in chain.hops]
        assert hops_for_path(plan.placement, path, instance.num_blocks) == chain.hops  # Lemma 1
        for hop in chain.hops:
            held[hop.server] += chain.capacity * hop.blocks * tokens
    for j, span in enumerate(plan.placement):
        if span is not None:
            assert held[j] <= instance.cache_tokens(j, span.length)  # memory never overbooked
    rates = [c.rate_per_s for c in plan.chains]
    assert rates == sorted(rates, reverse=True)  # fastest first


def test_theorem4_single_chain_is_mm1() -> None:
    chain = chains.Chain((Hop(0, 0, 4),), capacity=1, service_ms=500.0)  # mu = 2 / s
    bounds = chains.response_bounds(1.0, [chain])
    assert bounds.lower_s == pytest.approx(1 / (2 - 1))
    assert bounds.upper_s == pytest.approx(1 / (2 - 1))


def test_theorem4_two_chains_hand_computed() -> None:
    fast = chains.Chain((Hop(0, 0, 4),), 1, 500.0)  # mu 2
    slow = chains.Chain((Hop(1, 0, 4),), 1, 1000.0)  # mu 1
    bounds = chains.response_bounds(1.0, [fast, slow])
    # Lower: deaths 2, 3, then 3: phi = 1, 1/2, 1/6 (1/3)^k -> E[Z] = 1.125 / 1.75.
    assert bounds.lower_s == pytest.approx(1.125 / 1.75)
    # Upper: deaths 1, 3, then 3: phi = 1, 1, 1/3 (1/3)^k -> E[Z] = 2.25 / 2.5.
    assert bounds.upper_s == pytest.approx(2.25 / 2.5)
    assert bounds.total_rate_per_s == pytest.approx(3.0) and bounds.slots == 2
    assert not chains.response_bounds(3.0, [fast, slow]).stable


def test_theorem4_matches_erlang_c_for_identical_chains() -> None:
    lam, mu, c = 3.0, 1.0, 4
    chain = chains.Chain((Hop(0, 0, 4),), c, 1000.0 / mu)
    a = lam / mu
    top = a**c / math.factorial(c) * c / (c - a)
    wait_probability = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    expected = wait_probability / (c * mu - lam) + 1 / mu
    bounds = chains.response_bounds(lam, [chain])
    assert bounds.lower_s == pytest.approx(expected)
    assert bounds.upper_s == pytest.approx(expected)


def random_case(seed: int) -> tuple[Instance, WorkloadProfile, float]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 7))
    servers = [
        server(
            f"s{j}",
            "a" if rng.random() < 0.5 else "b",
            memory=float(rng.choice([1.6, 2.4, 3.1, 4.5, 6.0])),
            decode=float(rng.uniform(0.5, 3.0)),
        )
        for j in range(n)
    ]
    scenario = build(num_blocks=int(rng.integers(3, 7)), servers=servers)
    rate = float(rng.uniform(0.01, 1.2))
    return Instance.from_scenario(scenario), WorkloadProfile.at_caps(scenario, rate), rate


@pytest.mark.parametrize("seed", range(40))
def test_search_over_c_matches_exhaustive_search(seed: int) -> None:
    instance, profile, _ = random_case(seed)
    s_c = instance.kv_bytes * profile.design_tokens() / GB
    try:
        plan = chain_search.plan_chains(instance, profile)
    except chains.ChainsInfeasible:
        with pytest.raises(chains.ChainsInfeasible):
            chain_search.evaluate_c(instance, profile, 1)
        return
    best: chain_search.ChainPlan | None = None
    for c in range(1, chain_search.max_reservation(instance, s_c) + 1):
        try:
            trial = chain_search.evaluate_c(instance, profile, c)
        except chains.ChainsInfeasible:
            continue
        if best is None or chain_search.plan_key(trial) < chain_search.plan_key(best):
            best = trial
    assert best is not None
    assert plan.c == best.c
    assert chain_search.plan_key(plan) == chain_search.plan_key(best)
    assert plan.chains == best.chains
    assert plan.candidates_evaluated <= len(
        chain_search.breakpoints(instance, s_c, chain_search.max_reservation(instance, s_c))
    )


def test_no_room_for_one_job_is_infeasible() -> None:
    scenario = build(servers=[server("s0", "a", memory=1.05, decode=1.0)])
    instance = Instance.from_scenario(scenario)
    with pytest.raises(chains.ChainsInfeasible, match="infeasible"):
        chain_search.plan_chains(instance, WorkloadProfile.at_caps(scenario, 1.0))
