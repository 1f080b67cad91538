"""Simulator speed and the default policy at scale: 100,000 requests on 1,000 servers.

Prints, for auto, petals and cg-wsrr on the same arrivals: wall time, events and requests per
second, the mean response and per-token times, and the time to choose the plan; then auto's
mean response against petals' (the target: <= 1) and the median of 5 timings of choosing
auto's plan alone, wall and CPU (the target: <= 1 s); and the ratio against a per-token event
loop baseline (one event per decode step) measured in the same process on a 2,000-request
slice, to show what the start/end fast path saves.

    .venv/bin/python bench/bench_simulator.py [--requests N] [--servers N] [--repeat N] [--skip-cg]
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import time

from app.allocation.auto import plan_auto
from app.allocation.instance import Instance
from app.allocation.scenario import Scenario
from app.allocation.workload import WorkloadProfile
from app.simulation import generators
from app.simulation.run import simulate


def per_token_baseline(result_routes: int, tokens: int) -> float:
    """Seconds to pop one heap event per decode step for ``result_routes`` requests."""
    began = time.perf_counter()
    heap: list[tuple[float, int]] = []
    for r in range(result_routes):
        heapq.heappush(heap, (float(r), r))
    steps = 0
    while heap:
        at, r = heapq.heappop(heap)
        steps += 1
        if steps < result_routes * tokens:
            heapq.heappush(heap, (at + 1.0, r))
    return time.perf_counter() - began


def plan_seconds(scenario: Scenario, repeat: int = 5) -> tuple[float, float]:
    """Medians of the wall and CPU time of choosing auto's plan (every candidate, GCA, the
    bounds) for the scenario's workload profile. On a shared machine the CPU time is the
    algorithm's cost; the wall time adds whatever else runs."""
    instance = Instance.from_scenario(scenario)
    profile = WorkloadProfile.from_scenario(scenario)
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        plan_auto(scenario, instance, profile)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--servers", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-cg", action="store_true", help="leave out cg-wsrr (slowest)")
    args = parser.parse_args()
    rate = args.servers / 100  # busy (hundreds of requests in flight) but not saturated
    scenario = generators.random_clustered(args.servers, 0.2, rate, args.requests, seed=1)
    print(f"swarm: {args.servers} servers, {args.requests} requests at {rate:g} req/s")
    response: dict[str, float] = {}
    policies = ("auto", "petals") if args.skip_cg else ("auto", "petals", "cg-wsrr")
    for policy in policies:
        walls = []
        for _ in range(args.repeat):
            result = simulate(scenario, policy)
            walls.append(result.wall_seconds)
        summary = result.summary()
        wall = statistics.median(walls)
        response[policy] = float(summary["mean_e2e_ms"])  # type: ignore[arg-type]
        print(
            f"{policy:8s} median wall {wall:.2f} s (+ placement {result.placement_seconds:.2f} s), "
            f"{result.events / wall:,.0f} events/s, {args.requests / wall:,.0f} requests/s, "
            f"events {result.events}, mean response {response[policy] / 1000:.2f} s, "
            f"{summary['mean_ms_per_token']:.1f} ms/token, "
            f"mean wait {summary['mean_wait_ms']:.1f} ms"
        )
    print(f"auto / petals mean response: {response['auto'] / response['petals']:.3f}")
    wall, cpu = plan_seconds(scenario)
    print(f"choosing auto's plan: median of 5 {wall:.3f} s wall, {cpu:.3f} s CPU")
    slice_requests = 2_000
    tokens = scenario.requests.max_output_tokens
    baseline = per_token_baseline(slice_requests, tokens)
    fast = simulate(
        generators.random_clustered(args.servers, 0.2, rate, slice_requests, seed=1), "cg-wsrr"
    ).wall_seconds
    print(
        f"per-token event loop on {slice_requests} requests: {baseline:.2f} s (heap only) vs "
        f"simulator {fast:.2f} s: {baseline / fast:.1f}x"
    )


if __name__ == "__main__":
    main()
