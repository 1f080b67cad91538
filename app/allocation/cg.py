"""CG-BPRR: conservative greedy block placement + shortest-path routing (paper Algorithm 1).

1. Every server gets the conservative block count m_j = min(floor(M_j / (s_m + s_c |R|)), L):
   enough memory left for |R| caches per hosted block, so routing never runs out of memory.
2. Servers are visited by increasing amortised time t~_j = tau_j + t*_j / m_j, where t*_j is
   the per-token hop cost to the farthest client. While some block is under-served, a server
   takes the window that contains an under-served block and maximises the summed deficit
   T_b; afterwards it takes the window whose sorted capacities are lexicographically smallest
   (PETALS' rule). Ties go to the lowest start block, as in the authors' code.
3. Every client routes on its shortest path (hop cost t_cj + tau_j k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.allocation.instance import MEMORY_EPSILON, Instance, Placement, Span
from app.allocation.perf import total_ms
from app.allocation.routing import Route, RouteIndex


class InfeasibleError(ValueError):
    """The servers cannot host the model for the requested concurrency."""


def conservative_block_counts(instance: Instance, concurrency: int) -> list[int]:
    """m_j = min(floor(M_j / (s_m + s_c |R|)), L)."""
    per_block = instance.block_gb + instance.cache_gb * concurrency
    return [
        min(math.floor(memory / per_block + MEMORY_EPSILON), instance.num_blocks)
        for memory in instance.memory_gb
    ]


def sessions_per_server(instance: Instance, block_counts: list[int]) -> list[int]:
    """cap_j = floor((M_j - s_m m_j) / (s_c m_j)): requests server j can carry over its span."""
    caps = []
    for server, m in enumerate(block_counts):
        caps.append(instance.cache_slots(server, m) // m if m > 0 else 0)
    return caps


def is_feasible(instance: Instance, concurrency: int) -> bool:
    """Corollary 1: feasible iff sum_j min(floor(M_j / (s_m + s_c |R|)), L) >= L."""
    return sum(conservative_block_counts(instance, concurrency)) >= instance.num_blocks


def paper_max_concurrency(instance: Instance) -> int:
    """The paper's upper bound R_max = floor((sum M - s_m (L + n)) / (s_c (L + n)))."""
    slots = instance.num_blocks + instance.num_servers
    free = float(instance.memory_gb.sum()) - instance.block_gb * slots
    return max(0, math.floor(free / (instance.cache_gb * slots) + MEMORY_EPSILON))


def max_feasible_concurrency(instance: Instance) -> int:
    """The largest |R| that passes Corollary 1 (0 when even one request does not fit)."""
    if not is_feasible(instance, 1):
        return 0
    low, high = 1, max(1, paper_max_concurrency(instance)) + 1
    while is_feasible(instance, high):  # R_max is a bound for the formula, not for floors
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if is_feasible(instance, middle):
            low = middle
        else:
            high = middle
    return low


def infeasibility_message(instance: Instance, concurrency: int) -> str:
    counts = conservative_block_counts(instance, concurrency)
    missing_blocks = instance.num_blocks - sum(counts)
    per_block = instance.block_gb + instance.cache_gb * concurrency
    best = max_feasible_concurrency(instance)
    fits = f"at most {best} concurrent requests fit" if best else "not even one request fits"
    return (
        f"infeasible: the servers hold {sum(counts)} of {instance.num_blocks} blocks with room "
        f"for {concurrency} concurrent requests; about {missing_blocks * per_block:.2f} GB more "
        f"GPU memory is missing ({missing_blocks} blocks x {per_block:.4f} GB per block incl. "
        f"{concurrency} caches); {fits}"
    )


@dataclass(frozen=True)
class CgPlacement:
    concurrency: int
    placement: Placement
    block_counts: tuple[int, ...]
    sessions: tuple[int, ...]
    amortised_ms: tuple[float, ...]
    order: tuple[int, ...]
    servers_to_cover: int  # K: the first K servers of the order already serve every block
    bound_ms_per_token: float  # Theorem 2


def place(instance: Instance, concurrency: int) -> CgPlacement:
    """CG-BP: conservative block counts and greedy windows (Algorithm 1, steps 1-2)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    L = instance.num_blocks
    counts = conservative_block_counts(instance, concurrency)
    if sum(counts) < L:
        raise InfeasibleError(infeasibility_message(instance, concurrency))
    caps = sessions_per_server(instance, counts)
    worst_hop = instance.token_hop_ms.max(axis=0)  # t*_j
    amortised = [
        float(instance.decode_ms[j] + worst_hop[j] / m) if m > 0 else math.inf
        for j, m in enumerate(counts)
    ]
    usable = [j for j in range(instance.num_servers) if counts[j] > 0]
    order = sorted(usable, key=lambda j: (amortised[j], j))
    virtual = max(amortised[j] for j in usable) + 1.0  # t_max: cost of a "virtual" server
    capacity = np.zeros(L, dtype=np.int64)
    deficit = np.full(L, concurrency * virtual)
    spans: list[Span | None] = [None] * instance.num_servers
    covered_after: int | None = None
    for position, server in enumerate(order, start=1):
        m = counts[server]
        if (capacity < concurrency).any():
            start = _deficit_window(capacity, deficit, m, concurrency)
        else:
            start = _least_served_window(capacity, m)
        window = slice(start, start + m)
        shortfall = np.minimum(np.maximum(concurrency - capacity[window], 0), caps[server])
        deficit[window] -= (virtual - amortised[server]) * shortfall
        capacity[window] += caps[server]
        spans[server] = Span(start, start + m)
        if covered_after is None and (capacity >= concurrency).all():
            covered_after = position
    if covered_after is None:  # pragma: no cover - Corollary 1 guarantees coverage
        raise InfeasibleError(infeasibility_message(instance, concurrency))
    first = order[:covered_after]
    last = first[-1]
    bound = sum(amortised[j] * counts[j] for j in first) - float(instance.decode_ms[last]) * (
        sum(counts[j] for j in first) - L
    )
    return CgPlacement(
        concurrency=concurrency,
        placement=tuple(spans),
        block_counts=tuple(counts),
        sessions=tuple(caps),
        amortised_ms=tuple(amortised),
        order=tuple(order),
        servers_to_cover=covered_after,
        bound_ms_per_token=float(bound),
    )


def _deficit_window(capacity: np.ndarray, deficit: np.ndarray, m: int, concurrency: int) -> int:
    """Start of the window with an under-served block that maximises the summed deficit."""
    L = capacity.size
    under = np.concatenate(([0], np.cumsum(capacity < concurrency)))
    sums = np.concatenate(([0.0], np.cumsum(deficit)))
    starts = np.arange(L - m + 1)
    window_sum = sums[starts + m] - sums[starts]
    has_under = (under[starts + m] - under[starts]) > 0
    window_sum = np.where(has_under, window_sum, -np.inf)
    best = window_sum.max()
    # Prefix sums make equal windows differ in the last bits; treat those as ties and take the
    # lowest start, as the authors' code does with its strict comparison.
    tolerance = 1e-9 * max(1.0, abs(float(best)))
    return int(np.flatnonzero(window_sum >= best - tolerance)[0])


def _least_served_window(capacity: np.ndarray, m: int) -> int:
    """Start of the window whose sorted capacities are lexicographically smallest."""
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(capacity, m), axis=1)
    # lexsort's last key is primary; it is stable, so ties keep the lowest start.
    return int(np.lexsort(windows.T[::-1])[0])


def shortest_routes(instance: Instance, placement: Placement) -> list[Route]:
    """Each client's shortest path by per-token cost t_cj + tau_j k (Algorithm 1, step 3)."""
    index = RouteIndex(placement, instance.num_blocks)
    routes = []
    for client in range(instance.num_clients):
        route = index.shortest(instance.token_hop_ms[client], instance.decode_ms)
        if route is None:
            raise InfeasibleError(
                f"client {instance.client_ids[client]!r}: no chain covers all blocks"
            )
        routes.append(route)
    return routes


def design_concurrency(instance: Instance, rate_per_s: float) -> int:
    """|R| = min(round(lambda T1 + sqrt(lambda T1)), R_max) as the paper's authors set it.

    T1 is one request's time alone under CG-BPRR (placement for |R| = 1), weighted over
    clients by share. R_max is also capped by what Corollary 1 admits, so the result is
    always a feasible design target.
    """
    single = place(instance, 1)
    routes = shortest_routes(instance, single.placement)
    t1_ms = float(
        sum(
            share * total_ms(instance, client, route.hops)
            for client, (share, route) in enumerate(
                zip(instance.client_shares, routes, strict=True)
            )
        )
    )
    expected = rate_per_s * t1_ms / 1000.0
    target = round(expected + math.sqrt(expected))
    upper = min(paper_max_concurrency(instance), max_feasible_concurrency(instance))
    return max(1, min(target, upper))
