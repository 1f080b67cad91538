"""CG-BPRR placement, chain plans and route-query speed, against naive baselines run in the
same process.

Targets (issue "Allocation core"): CG placement on 1,000 servers with L = 80 in under 1 s; one
route query under 1 ms at 100 servers and under 5 ms at 1,000 servers. Issue 10: the whole
chain plan (GBP-CR + GCA + Theorem 4, c chosen) on 1,000 servers in under 1 s; the search
over c must find the same c as trying every c (checked at 100 servers, where that is
affordable).

Baselines: the authors' formulation run literally (a Python loop over every window for CG; a
Dijkstra over the server-by-server graph, built per query, for routing). The fast versions must
give the same answers; the script checks that before it prints ratios.

    .venv/bin/python bench/bench_allocation.py
"""

from __future__ import annotations

import heapq
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.allocation import cg, chain_search, chains
from app.allocation.instance import Instance, Placement
from app.allocation.routing import RouteIndex
from app.allocation.scenario import parse_scenario
from app.allocation.workload import WorkloadProfile
from app.simulation import generators

GPUS = [  # label, usable GB, decode ms per block (Llama-2-70B NF4 block: 0.459 GB / bandwidth)
    ("A100-80GB", 78.0, 0.459 / 2039 * 1000),
    ("L4-24GB", 22.0, 0.459 / 300 * 1000),
    ("RTX4090-24GB", 22.0, 0.459 / 1008 * 1000),
    ("T4-16GB", 14.5, 0.459 / 320 * 1000),
]


def swarm(num_servers: int, num_clients: int = 20, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    sites = [f"site{i}" for i in range(30)]
    points = [(rng.uniform(0, 100), rng.uniform(0, 100)) for _ in sites]
    rtt = [
        [5 + 2.0 * ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 for bx, by in points]
        for ax, ay in points
    ]
    servers = []
    for j in range(num_servers):
        label, memory, decode = rng.choice(GPUS)
        servers.append(
            {
                "id": f"s{j}",
                "site": rng.choice(sites),
                "gpu": label,
                "memory_gb": memory,
                "decode_ms_per_block": decode,
                "prefill_ms_per_block": {"fixed": 4 * decode, "per_token": 0.01},
            }
        )
    clients = [
        {"id": f"c{i}", "site": rng.choice(sites), "share": rng.uniform(0.5, 1.5)}
        for i in range(num_clients)
    ]
    return {
        "name": f"bench-{num_servers}",
        "model": {
            "name": "llama-2-70b",
            "num_blocks": 80,
            "block_memory_gb": 0.459,
            "kv_bytes_per_token_per_block": 4096,
        },
        "requests": {"max_input_tokens": 512, "max_output_tokens": 512},
        "sites": sites,
        "site_rtt_ms": rtt,
        "servers": servers,
        "clients": clients,
        "overheads": {"per_token_ms": 20},
    }


def naive_place(instance: Instance, concurrency: int) -> Placement:
    """Algorithm 1 as written: Python loops over every window, sorted lists compared."""
    L = instance.num_blocks
    counts = cg.conservative_block_counts(instance, concurrency)
    caps = cg.sessions_per_server(instance, counts)
    worst = instance.token_hop_ms.max(axis=0)
    amortised = [
        float(instance.decode_ms[j] + worst[j] / m) if m else float("inf")
        for j, m in enumerate(counts)
    ]
    order = sorted((j for j in range(len(counts)) if counts[j]), key=lambda j: (amortised[j], j))
    virtual = max(amortised[j] for j in order) + 1
    capacity = [0] * L
    deficit = [concurrency * virtual] * L
    spans: list[Any] = [None] * len(counts)
    for j in order:
        m = counts[j]
        best_start, best_key = 0, None
        if any(c < concurrency for c in capacity):
            best_sum = -1.0
            for a in range(L - m + 1):
                window = range(a, a + m)
                total = sum(deficit[b] for b in window)
                if any(capacity[b] < concurrency for b in window) and total > best_sum * (1 + 1e-9):
                    best_start, best_sum = a, total
        else:
            for a in range(L - m + 1):
                key = sorted(capacity[a : a + m])
                if best_key is None or key < best_key:
                    best_start, best_key = a, key
        for b in range(best_start, best_start + m):
            deficit[b] -= (virtual - amortised[j]) * min(max(concurrency - capacity[b], 0), caps[j])
            capacity[b] += caps[j]
        spans[j] = (best_start, best_start + m)
    return tuple(spans)


def graph_dijkstra(
    placement: Placement, L: int, hop_fixed: np.ndarray, per_block: np.ndarray
) -> float:
    """Shortest path on the server-by-server graph (O(n^2) edges), as in the authors' code."""
    n = len(placement)
    spans = [s for s in placement]
    dist = [float("inf")] * n
    heap: list[tuple[float, int]] = []
    for j, span in enumerate(spans):
        if span is not None and span.start == 0:
            dist[j] = float(hop_fixed[j] + per_block[j] * span.end)
            heapq.heappush(heap, (dist[j], j))
    best = float("inf")
    while heap:
        d, i = heapq.heappop(heap)
        if d > dist[i]:
            continue
        end = spans[i].end
        if end == L:
            best = min(best, d)
            continue
        for j in range(n):  # every server: the O(n^2) graph
            span = spans[j]
            if span is not None and span.start <= end < span.end:
                nd = d + float(hop_fixed[j] + per_block[j] * (span.end - end))
                if nd < dist[j]:
                    dist[j] = nd
                    heapq.heappush(heap, (nd, j))
    return best


def timed(repeat: int, function: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    samples, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


def exhaustive_c(instance: Instance, profile: WorkloadProfile) -> chain_search.ChainPlan:
    """The authors' optimiser: GBP-CR + GCA + the lower bound for every c from 1 to c_max."""
    s_c = instance.kv_bytes * profile.design_tokens() / 1e9
    best: chain_search.ChainPlan | None = None
    for c in range(1, chain_search.max_reservation(instance, s_c) + 1):
        try:
            plan = chain_search.evaluate_c(instance, profile, c)
        except chains.ChainsInfeasible:
            break
        if best is None or chain_search.plan_key(plan) < chain_search.plan_key(best):
            best = plan
    assert best is not None
    return best


def chain_plans() -> None:
    print("Chain plan (GBP-CR + GCA + Theorem 4, best c), MIG swarms, Llama-2-7B (medians of 3)")
    for n in (100, 1000):
        scenario = generators.mig_swarm(n, 2.57 * n / 9, 1000, 1, trace=False)
        instance = Instance.from_scenario(scenario)
        profile = WorkloadProfile.from_scenario(scenario)
        fast_s, plan = timed(3, chain_search.plan_chains, instance, profile)
        cpu_samples = []
        for _ in range(3):
            began = time.process_time()
            chain_search.plan_chains(instance, profile)
            cpu_samples.append(time.process_time() - began)
        cpu_s = statistics.median(cpu_samples)
        s_c = instance.kv_bytes * profile.design_tokens() / 1e9
        c_max = chain_search.max_reservation(instance, s_c)
        line = (
            f"  {n:5d} servers: {fast_s * 1000:8.1f} ms wall, {cpu_s * 1000:7.1f} ms CPU, "
            f"c = {plan.c} "
            f"({plan.candidates_evaluated} of {c_max} values of c evaluated)"
        )
        if n <= 100:
            naive_s, naive = timed(1, exhaustive_c, instance, profile)
            assert naive.c == plan.c and chain_search.plan_key(naive) == chain_search.plan_key(plan)
            line += f"; every c: {naive_s * 1000:8.1f} ms, same c, {naive_s / fast_s:6.1f}x"
        print(line)


def main() -> None:
    chain_plans()
    print("CG-BPRR placement, L = 80 (median of 5 runs)")
    for n in (100, 1000):
        instance = Instance.from_scenario(parse_scenario(swarm(n)))
        concurrency = min(cg.max_feasible_concurrency(instance), n // 2)
        fast_s, fast = timed(5, cg.place, instance, concurrency)
        naive_s, naive = timed(3, naive_place, instance, concurrency)
        assert [tuple(s) if s else None for s in fast.placement] == list(naive), "placements differ"
        print(
            f"  {n:5d} servers, |R| = {concurrency:4d}: {fast_s * 1000:8.2f} ms "
            f"(naive loops {naive_s * 1000:8.2f} ms, {naive_s / fast_s:5.1f}x)"
        )
    print("Route query: DP over block boundaries vs Dijkstra on the server graph (median)")
    for n in (100, 1000):
        instance = Instance.from_scenario(parse_scenario(swarm(n)))
        concurrency = min(cg.max_feasible_concurrency(instance), n // 2)
        placement = cg.place(instance, concurrency).placement
        index = RouteIndex(placement, instance.num_blocks)
        clients = range(instance.num_clients)
        per_block = instance.decode_ms
        samples_fast, samples_graph = [], []
        for c in clients:
            hop = instance.token_hop_ms[c]
            fast_s, route = timed(20, index.shortest, hop, per_block)
            graph_s, cost = timed(3, graph_dijkstra, placement, 80, hop, per_block)
            assert route is not None and abs(route.cost - cost) < 1e-6 * cost, "costs differ"
            samples_fast.append(fast_s)
            samples_graph.append(graph_s)
        fast_med, graph_med = statistics.median(samples_fast), statistics.median(samples_graph)
        print(
            f"  {n:5d} servers ({index.size} server-block pairs): {fast_med * 1000:7.3f} ms/query "
            f"(graph Dijkstra {graph_med * 1000:8.3f} ms, {graph_med / fast_med:6.1f}x)"
        )


if __name__ == "__main__":
    main()
