"""Chain policies in the simulator: JFFC with one central FIFO queue, token-granular memory,
and the Theorem-4 bounds against simulated means."""

from __future__ import annotations

import numpy as np
import pytest

from app.allocation.chains import Chain
from app.allocation.instance import Instance
from app.allocation.perf import Hop
from app.simulation import generators
from app.simulation.engine import SimResult, Simulator
from app.simulation.policies import ChainsPolicy, build_policy
from app.simulation.run import simulate, workload_profile
from app.simulation.workload import Workload, scenario_workload
from tests.simulation.helpers import fixed_workload, two_server_scenario


def varied_workload(count: int, rate_per_s: float, seed: int) -> Workload:
    """Poisson arrivals; prompts 1..4 and outputs 1..3 tokens drawn at random."""
    rng = np.random.default_rng(seed)
    return Workload(
        arrival_ms=np.cumsum(rng.exponential(1000.0 / rate_per_s, count)),
        client=np.zeros(count, dtype=np.int64),
        input_tokens=rng.integers(1, 5, count).astype(np.int64),
        output_tokens=rng.integers(1, 4, count).astype(np.int64),
        description="varied",
    )


def two_chains_policy() -> tuple[Instance, ChainsPolicy]:
    """Both servers host both blocks: two one-hop chains, 2 job slots on the first, 1 on the
    second; 20 cache units each, so memory binds too (a 7-token request holds 14)."""
    scenario = two_server_scenario(
        servers=[
            {
                "id": f"s{j}",
                "site": "a",
                "memory_gb": 4.0,
                "decode_ms_per_block": 2.0 + j,
                "prefill_ms_per_block": {"fixed": 5.0, "per_token": 0.5},
            }
            for j in range(2)
        ]
    )
    instance = Instance.from_scenario(scenario)
    placement = ((0, 2), (0, 2))
    from app.allocation.instance import Span

    spans = tuple(Span(*p) for p in placement)
    chains = [Chain((Hop(0, 0, 2),), 2, 80.0), Chain((Hop(1, 0, 2),), 1, 90.0)]
    return instance, ChainsPolicy("jffc", spans, [20, 20], chains)


def chain_index(result: SimResult, policy: ChainsPolicy) -> list[int]:
    hops_to_chain = {chain.hops: k for k, chain in enumerate(policy.chains)}
    return [hops_to_chain[hops] for hops in result.routes]


def check_jffc_invariants(result: SimResult, policy: ChainsPolicy) -> int:
    """Rebuild the swarm's state at every completion from the record alone and check:
    FIFO (starts in arrival order) and no waiting head while a chain could take it."""
    starts = result.start_ms
    assert (np.diff(starts) >= 0).all()  # nobody overtakes: one FIFO queue
    on_chain = chain_index(result, policy)
    tokens = result.tokens
    checked = 0
    for t in np.unique(result.end_ms):
        running = (starts <= t) & (result.end_ms > t)
        waiting = np.flatnonzero((result.arrival_ms <= t) & (starts > t))
        if waiting.size == 0:
            continue
        head = int(waiting[0])  # earliest arrival among those waiting (arrivals are sorted)
        used = [0] * len(policy.capacity)
        in_service = [0] * len(policy.chains)
        for r in np.flatnonzero(running).tolist():
            in_service[on_chain[r]] += 1
            for server, start, end in result.routes[r]:
                used[server] += (end - start) * int(tokens[r])
        for k, chain in enumerate(policy.chains):
            slot = in_service[k] < chain.capacity
            room = all(
                policy.capacity[h.server] - used[h.server] >= h.blocks * int(tokens[head])
                for h in chain.hops
            )
            assert not (slot and room), f"request {head} waits at {t} while chain {k} is free"
        checked += 1
    return checked


@pytest.mark.parametrize("seed", range(6))
def test_jffc_fifo_and_no_idle_chain_while_waiting(seed: int) -> None:
    instance, policy = two_chains_policy()
    result = Simulator(instance, varied_workload(300, 40.0, seed), policy).run()
    assert result.completions.tolist() == [1] * result.requests
    checked = check_jffc_invariants(result, policy)
    assert checked > 10  # the load was high enough to queue
    assert int(result.extra["max_queue"]) > 0  # type: ignore[call-overload]
    # Memory is never over-committed: replayed from the record.
    for server in range(2):
        assert max(result.peak_slots) <= 20 and result.peak_slots[server] <= 20


def test_jffc_hand_timeline() -> None:
    # 7-token requests (4 in + 3 out) hold 14 units of a server's 20: one job per server
    # although chain 0 has two slots. r0 -> chain 0; r1 -> chain 1 (chain 0's server lacks
    # room); r2 waits in the queue and takes chain 0 when r0 ends at 80 ms.
    instance, policy = two_chains_policy()
    result = Simulator(instance, fixed_workload([0.0, 1.0, 2.0]), policy).run()
    assert chain_index(result, policy) == [0, 1, 0]
    assert result.start_ms[2] == result.end_ms[0]
    assert result.start_ms[0] == 0.0 and result.start_ms[1] == 1.0


@pytest.mark.parametrize(("rate", "seed"), [(0.3, 1), (1.0, 2), (2.0, 3)])
def test_simulated_mean_lies_between_the_theorem4_bounds(rate: float, seed: int) -> None:
    # Every request at the caps: the chains' service times are exact, only arrivals vary.
    scenario = generators.random_clustered(12, 0.25, rate, 1500, seed, l_max=32)
    instance = Instance.from_scenario(scenario)
    workload = scenario_workload(scenario)
    built = build_policy(
        "chains", scenario, instance, workload.rate_per_s, profile=workload_profile(workload)
    )
    lower = float(built.details["lower_bound_ms"])  # type: ignore[arg-type]
    upper = float(built.details["upper_bound_ms"])  # type: ignore[arg-type]
    result = Simulator(instance, workload, built.policy).run()
    mean = float((result.end_ms - result.arrival_ms).mean())
    # Service times are deterministic here, the bounds assume exponential ones: a few percent
    # of slack either side.
    assert lower * 0.95 <= mean <= upper * 1.05


@pytest.mark.parametrize("policy", ["chains", "auto"])
def test_chain_policies_never_overcommit_on_trace_lengths(policy: str) -> None:
    scenario = generators.mig_swarm(9, 2.57, 300, 1)
    result = simulate(scenario, policy)
    assert result.completions.tolist() == [1] * result.requests
    instance = Instance.from_scenario(scenario)
    assert len(set(result.tokens.tolist())) > 10  # requests hold their own lengths
    for j, peak in enumerate(result.peak_slots):
        assert peak <= result.capacity[j]
        span_blocks = max(
            (h.end for hops in result.routes for h in hops if h.server == j), default=0
        )
        if peak:
            assert instance.block_gb * 0 + instance.kv_bytes * peak / 1e9 <= instance.memory_gb[j]
        assert span_blocks <= instance.num_blocks
