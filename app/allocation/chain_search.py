"""The search over c for GBP-CR + GCA: the c that minimises Theorem 4's lower bound.

GBP-CR depends on c only through the vector m(c) = min(floor(M_j / (s_m + s_c c)), L) and
its stop point. m(c) is a step function, constant on intervals bounded by the breakpoints
where some floor drops (at most #distinct memories x L of them). Inside one interval the
server order and spans are identical; a smaller c only stops later, i.e. places a longer
prefix of the same order, and GCA then allocates the memory of a superset of servers.
Theorem 4's lower bound cannot grow when slots are added (its death rate at n is the sum of
the n fastest slot rates, which a superset of slots can only raise), so the interval's
smallest c is its best candidate and only breakpoints are evaluated.

Then, exactly (the same plan as trying every c, ties to the smaller c):
- each breakpoint gets a cheap bound never above its true lower bound (M/M/C with every slot
  as fast as the knapsack relaxation of the fastest chain, C = residual slots / L);
- the largest c among the best cheap bounds is evaluated first (few servers, a quick finite
  bound), then the rest by cheap bound; one whose cheap bound is above the best is skipped;
- a GCA is stopped once its chains so far, plus every slot left at the latest chain's rate,
  cannot beat the best plan (``pruner``).
tests/allocation/test_chains.py checks the result against the exhaustive search over every c
on 40 random small swarms; bench/bench_allocation.py on a 100-server swarm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.allocation.chains import (
    DEFAULT_RHO,
    Bounds,
    Chain,
    ChainsInfeasible,
    JobCosts,
    block_counts,
    chains_for_placement,
    erlang_bound,
    gbp_cr,
    gca,
    job_costs,
    residual_slots,
    response_bounds,
)
from app.allocation.instance import GB, MEMORY_EPSILON, FloatArray, Instance, Placement
from app.allocation.workload import WorkloadProfile


@dataclass(frozen=True)
class ChainPlan:
    c: int
    placement: Placement
    chains: tuple[Chain, ...]  # fastest first
    bounds: Bounds
    design_tokens: int
    rate_target_met: bool
    candidates_evaluated: int = 0
    warnings: tuple[str, ...] = field(default_factory=tuple)


def max_reservation(instance: Instance, s_c_gb: float) -> int:
    """c_max = floor((max_j M_j - s_m) / s_c)."""
    top = float(instance.memory_gb.max()) if instance.num_servers else 0.0
    return max(0, math.floor((top - instance.block_gb) / s_c_gb + MEMORY_EPSILON))


def breakpoints(instance: Instance, s_c_gb: float, c_max: int) -> list[int]:
    """The smallest c of every interval of c over which m(c) is constant."""
    memories = np.unique(instance.memory_gb)
    cs = np.arange(1, c_max + 1, dtype=float)
    per_block = instance.block_gb + s_c_gb * cs
    m = np.minimum(
        np.floor(memories[:, None] / per_block[None, :] + MEMORY_EPSILON), instance.num_blocks
    )
    changed = np.flatnonzero((m[:, 1:] != m[:, :-1]).any(axis=0)) + 2
    return [1, *changed.tolist()]


def evaluate_c(
    instance: Instance,
    profile: WorkloadProfile,
    c: int,
    rho: float = DEFAULT_RHO,
    costs: JobCosts | None = None,
) -> ChainPlan:
    """GBP-CR at c, then GCA on its placement, then the bounds."""
    costs = costs or job_costs(instance, profile)
    tokens = profile.design_tokens()
    s_c = instance.kv_bytes * tokens / GB
    gbp = gbp_cr(instance, costs, s_c, c, profile.rate_per_s, rho)
    chains, bounds = chains_for_placement(instance, profile, gbp.placement, costs)
    return ChainPlan(c, gbp.placement, chains, bounds, tokens, gbp.rate_target_met)


def plan_chains(
    instance: Instance, profile: WorkloadProfile, rho: float = DEFAULT_RHO
) -> ChainPlan:
    """GBP-CR + GCA at the c that minimises Theorem 4's lower bound (see the module doc)."""
    costs = job_costs(instance, profile)
    tokens = profile.design_tokens()
    s_c = instance.kv_bytes * tokens / GB
    c_max = max_reservation(instance, s_c)
    if c_max < 1:
        raise ChainsInfeasible(
            "infeasible: no server holds one block and one job's cache "
            f"({instance.block_gb + s_c:.4f} GB needed)"
        )
    lam = profile.rate_per_s
    candidates: list[tuple[float, int]] = []
    for c in breakpoints(instance, s_c, c_max):
        counts = block_counts(instance, s_c, c)
        if sum(counts) < instance.num_blocks:
            break  # m(c) only shrinks as c grows
        cheap = round(_cheap_bound(instance, costs, counts, tokens, lam), 9)
        candidates.append((cheap, c))
    if not candidates:
        raise ChainsInfeasible(
            f"infeasible: the servers cannot hold all {instance.num_blocks} blocks even with "
            "room for a single job's cache"
        )
    candidates.sort(key=lambda item: (item[0], item[1]))
    # First the largest c among the best cheap bounds: it places the fewest servers, so its GCA
    # is quick, and its finite bound lets the pruner cut the others short (an unstable plan
    # would otherwise need a full GCA to show it). Ties still go to the smaller c (plan_key).
    lowest = candidates[0][0]
    first = max(i for i, item in enumerate(candidates) if item[0] == lowest)
    candidates.insert(0, candidates.pop(first))
    best: ChainPlan | None = None
    evaluated = 0
    for cheap, c in candidates:
        best_lower = math.inf if best is None else plan_key(best)[0]
        if best is not None and math.isfinite(best_lower):
            if cheap > best_lower:
                continue  # its plan cannot do better (sorted by the cheap bound after the first)
            if cheap == best_lower and c > best.c:
                continue  # at best a tie, and ties go to the smaller c
        evaluated += 1
        gbp = gbp_cr(instance, costs, s_c, c, lam, rho)
        stop = None if best is None else pruner(instance.num_blocks, lam, plan_key(best), c)
        residual = residual_slots(instance, gbp.placement, tokens)
        chains = gca(instance, costs, gbp.placement, residual, stop)
        if stop is not None and stop.fired:
            continue
        bounds = response_bounds(lam, chains)
        plan = ChainPlan(c, gbp.placement, chains, bounds, tokens, gbp.rate_target_met)
        if best is None or plan_key(plan) < plan_key(best):
            best = plan
    assert best is not None
    warnings: list[str] = []
    if not best.rate_target_met and best.bounds.total_rate_per_s < lam / rho:
        warnings.append(
            "chains: the servers ran out before the chains' service rate reached "
            f"lambda / rho = {lam / rho:.3f} jobs/s (GBP-CR at c = {best.c}; after GCA the "
            f"chains serve {best.bounds.total_rate_per_s:.3f} jobs/s)"
        )
    if not best.bounds.stable:
        warnings.append(
            f"chains: unstable, the arrival rate {lam:.3f}/s is at least the chains' total "
            f"service rate {best.bounds.total_rate_per_s:.3f}/s"
        )
    return ChainPlan(
        best.c,
        best.placement,
        best.chains,
        best.bounds,
        tokens,
        best.rate_target_met,
        evaluated,
        tuple(warnings),
    )


class _Pruner:
    """Stops GCA once its chains cannot beat the best plan so far.

    With chains 1..K found (rates non-increasing), every later chain is no faster than chain K
    and all of them hold at most (slot-blocks left) / L job slots, so Theorem 4's lower bound of
    the finished plan is at least that of chains 1..K plus that many slots at chain K's rate.
    """

    def __init__(self, num_blocks: int, lam: float, best: tuple[float, float, int], c: int):
        self.num_blocks = num_blocks
        self.lam = lam
        self.best_lower = best[0]
        self.beaten_on_ties = c > best[2]
        self.fired = False
        self.optimistic: list[Chain] = []  # the chains that proved it, when it fired

    def __call__(self, chains: Sequence[Chain], slot_blocks_left: int) -> bool:
        extra = slot_blocks_left // self.num_blocks
        optimistic = list(chains)
        if extra > 0:
            optimistic.append(Chain(chains[-1].hops, extra, chains[-1].service_ms))
        lower = response_bounds(self.lam, optimistic).lower_s
        value = round(lower, 9) if math.isfinite(lower) else math.inf
        if value > self.best_lower or (value == self.best_lower and self.beaten_on_ties):
            self.fired = True
            self.optimistic = optimistic
        return self.fired


def pruner(num_blocks: int, lam: float, best: tuple[float, float, int], c: int) -> _Pruner | None:
    # Unstable best plans are ranked by service rate too: no pruning on the bound alone.
    return _Pruner(num_blocks, lam, best, c) if math.isfinite(best[0]) else None


def plan_key(plan: ChainPlan) -> tuple[float, float, int]:
    """Order of preference: lower bound, then (unstable plans) more service rate, then c."""
    # Rounded so that floating-point noise between equal plans does not decide; ties: smaller c.
    return (round(plan.bounds.lower_s, 9), -round(plan.bounds.total_rate_per_s, 9), plan.c)


def _fastest_chain_bound(
    tau_c: FloatArray, tau_p: FloatArray, m: FloatArray, num_blocks: int
) -> float:
    """f(L) of the knapsack relaxation in _cheap_bound (ms, without the per-request cost)."""
    ks = np.arange(1, num_blocks + 1, dtype=float)
    hop = tau_c[:, None] + tau_p[:, None] * ks[None, :]
    hop = np.where(m[:, None] >= ks[None, :], hop, np.inf)
    best_hop = hop.min(axis=0)  # g(k), k = 1..L
    f = np.full(num_blocks + 1, np.inf)
    f[0] = 0.0
    for b in range(1, num_blocks + 1):
        f[b] = float((f[b - 1 :: -1][:b] + best_hop[:b]).min())
    return float(f[num_blocks])


def _cheap_bound(
    instance: Instance, costs: JobCosts, counts: Sequence[int], tokens: int, lam: float
) -> float:
    """A value never above Theorem 4's lower bound for GBP-CR at these block counts.

    GBP-CR places a subset of the servers with m_j > 0, each hosting m_j blocks. A chain is a
    sequence of hops whose block counts k <= m_j add up to L, so it is no faster than the
    cheapest such multiset of hops, servers reusable (g(k) = min over servers with m_j >= k of
    tau_c_j + tau_p_j k; f(b) = min_k f(b - k) + g(k); f(L) bounds every chain). GCA's chains
    hold at most sum_j residual_j / L job slots (a job holds L slot-blocks). Giving every one
    of that many slots the rate 1 / f(L) only raises the death rates of the lower birth-death
    chain, so its mean is a lower bound; taking all usable servers only loosens it.
    """
    m = np.asarray(counts, dtype=float)
    used = m > 0
    if not used.any():
        return math.inf
    L = instance.num_blocks
    fastest = _fastest_chain_bound(costs.tau_c[used], costs.tau_p[used], m[used], L)
    mu = 1000.0 / (costs.per_request_ms + fastest)
    free_bytes = (instance.memory_gb[used] - instance.block_gb * m[used]) * GB
    units = np.floor(np.maximum(free_bytes, 0.0) / instance.kv_bytes + MEMORY_EPSILON)
    slots = int((units // tokens).sum()) // instance.num_blocks
    return erlang_bound(lam, mu, slots)
