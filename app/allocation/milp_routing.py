"""The routing-only ILP (paper eq. 19a-e) and the CP-SAT helpers it shares with MILP-BPRR.

For a fixed placement, requests of client c travel source -> servers -> sink on the links that
Lemma 1 allows (see app/allocation/milp.py for the graph and the project coordinates); integer
per-client flows on those links are exact, and memory (19c) is the exact integer
instance.cache_slots(j, m_j). The helpers here (counts check, weights that fit, scaled objective
coefficients, the CP-SAT solver, flow decomposition, the route check) are used by both models;
app/allocation/milp.py imports this module, never the other way round.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

from ortools.sat.python import cp_model

from app.allocation import cg
from app.allocation.instance import MEMORY_EPSILON, Instance, Placement, Span
from app.allocation.perf import hops_for_path
from app.allocation.solve import PlannedRoute

__all__ = [
    "SINK",
    "SOURCE",
    "TIME_SCALE",
    "Link",
    "MilpNoSolutionError",
    "check_counts",
    "check_solution",
    "decompose_flow",
    "fits_memory",
    "make_solver",
    "max_blocks_fitting",
    "planned_routes",
    "route_flows",
    "route_ilp",
    "scaled_costs",
]

# Objective units per millisecond: times t_cj and tau_j enter the objective as
# round(x * TIME_SCALE). 10_000 (0.1 microsecond) makes the paper's profiled constants (four
# decimals) and whole-millisecond RTTs exact; memory is never scaled (see app/allocation/milp.py).
TIME_SCALE = 10_000

SOURCE = -1  # the request's client as the origin of the first link
SINK = -2  # the request's client as the destination of the last link

Link = tuple[int, int]  # (from, to) with SOURCE / SINK / server indices


class MilpNoSolutionError(RuntimeError):
    """CP-SAT found no solution within the time limit (and did not prove infeasibility)."""


# --- shared helpers -----------------------------------------------------------------------


def check_counts(instance: Instance, counts: Sequence[int]) -> None:
    if len(counts) != instance.num_clients:
        raise ValueError(
            f"counts: {len(counts)} entries for {instance.num_clients} clients (one per client)"
        )
    for client, count in enumerate(counts):
        if count < 0:
            raise ValueError(f"counts[{client}]: {count} is negative")


def max_blocks_fitting(instance: Instance, server: int) -> int:
    """The most blocks whose weights fit on ``server`` (the span may not exceed L)."""
    fit = math.floor(float(instance.memory_gb[server]) / instance.block_gb + MEMORY_EPSILON)
    return max(0, min(fit, instance.num_blocks))


def scaled_costs(values: Sequence[float]) -> tuple[list[int], float]:
    """Integer objective coefficients and the largest rounding error (in scaled units)."""
    scaled = [round(float(v) * TIME_SCALE) for v in values]
    error = max(
        (abs(s - float(v) * TIME_SCALE) for s, v in zip(scaled, values, strict=True)), default=0.0
    )
    return scaled, error


def make_solver(time_limit_s: float, workers: int) -> cp_model.CpSolver:
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s: must be positive, got {time_limit_s}")
    if workers < 1:
        raise ValueError(f"workers: must be at least 1, got {workers}")
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers)
    return solver


def decompose_flow(flow: dict[Link, int], total: int) -> list[list[int]]:
    """Split an integer source -> sink flow on a DAG into ``total`` server paths."""
    remaining = {link: value for link, value in flow.items() if value > 0}
    out: dict[int, list[int]] = {}
    for a, b in remaining:
        out.setdefault(a, []).append(b)
    paths = []
    for _ in range(total):
        node, path = SOURCE, []
        while node != SINK:
            nxt = next((b for b in out.get(node, []) if remaining.get((node, b), 0) > 0), None)
            if nxt is None:  # pragma: no cover - flow conservation makes this impossible
                raise RuntimeError("solver returned a flow that does not reach the sink")
            remaining[(node, nxt)] -= 1
            if nxt != SINK:
                path.append(nxt)
            node = nxt
            if len(path) > len(out) + 1:  # pragma: no cover - used links are acyclic
                raise RuntimeError("solver returned a cyclic flow")
        paths.append(path)
    return paths


def planned_routes(
    instance: Instance, placement: Placement, paths_by_client: dict[int, list[list[int]]]
) -> tuple[PlannedRoute, ...]:
    routes = []
    for client in sorted(paths_by_client):
        tally = Counter(tuple(p) for p in paths_by_client[client])
        for path, count in sorted(tally.items()):
            hops = hops_for_path(placement, path, instance.num_blocks)
            routes.append(PlannedRoute(client, count, hops))
    return tuple(routes)


def check_solution(
    instance: Instance, placement: Placement, routes: Sequence[PlannedRoute]
) -> None:
    """Raise if the routes break Lemma 1 or a server's memory (never hand out garbage)."""
    used = [0] * instance.num_servers
    for route in routes:
        path = [hop.server for hop in route.hops]
        if tuple(route.hops) != hops_for_path(placement, path, instance.num_blocks):
            raise RuntimeError(f"route {path}: hops disagree with the placement")
        for hop in route.hops:
            used[hop.server] += route.requests * hop.blocks
    for server, span in enumerate(placement):
        if span is None:
            if used[server]:
                raise RuntimeError(f"server {server}: carries requests but hosts nothing")
            continue
        if span.length > max_blocks_fitting(instance, server):
            raise RuntimeError(f"server {server}: {span.length} blocks do not fit")
        if used[server] > instance.cache_slots(server, span.length):
            raise RuntimeError(
                f"server {server}: {used[server]} cache slots needed, "
                f"{instance.cache_slots(server, span.length)} available"
            )


def route_flows(routes: Sequence[PlannedRoute]) -> dict[int, list[tuple[list[int], int]]]:
    """Client -> [(server path, requests)]."""
    flows: dict[int, list[tuple[list[int], int]]] = {}
    for route in routes:
        flows.setdefault(route.client, []).append(
            ([hop.server for hop in route.hops], route.requests)
        )
    return flows


def fits_memory(instance: Instance, placement: Placement, routes: Sequence[PlannedRoute]) -> bool:
    try:
        check_solution(instance, placement, routes)
    except (RuntimeError, ValueError):  # perf.InfeasiblePath is a ValueError
        return False
    return True


# --- routing-only ILP (19a-e) -------------------------------------------------------------


def route_ilp(
    instance: Instance,
    placement: Placement,
    counts: Sequence[int],
    time_limit_s: float = 10.0,
    workers: int = 2,
) -> tuple[PlannedRoute, ...]:
    """Optimal routing of ``counts[c]`` requests per client for a fixed placement (19a-e).

    Integer per-client flows on the feasible links of the placement, cost
    sum (t_cj + tau_j k_ij) per request (the paper's l_max factor is a constant), memory
    sum_c sum_i k_ij f^c_ij <= cache_slots(j, m_j). Raises cg.InfeasibleError when no routing
    fits and MilpNoSolutionError when CP-SAT finds none in time.
    """
    check_counts(instance, counts)
    if len(placement) != instance.num_servers:
        raise ValueError(
            f"placement: {len(placement)} spans for {instance.num_servers} servers (one per server)"
        )
    L = instance.num_blocks
    spans: dict[int, Span] = {}
    for j, span in enumerate(placement):
        if span is None:
            continue
        if not 0 <= span.start < span.end <= L:
            raise ValueError(f"placement[{j}]: span [{span.start}, {span.end}) is out of range")
        if span.length > max_blocks_fitting(instance, j):
            raise cg.InfeasibleError(
                f"placement[{j}]: the weights of {span.length} blocks do not fit in "
                f"{instance.memory_gb[j]} GB"
            )
        spans[j] = span
    solver = make_solver(time_limit_s, workers)
    # Feasible links (Lemma 1) and the blocks k_ij processed at j when entering from i.
    blocks: dict[Link, int] = {}
    for j, sj in spans.items():
        if sj.start == 0:
            blocks[(SOURCE, j)] = sj.end
        if sj.end == L:
            blocks[(j, SINK)] = 0
        for i, si in spans.items():
            if i != j and sj.start <= si.end < sj.end:
                blocks[(i, j)] = sj.end - si.end
    hop_cost, _ = scaled_costs(instance.token_hop_ms.ravel().tolist())
    block_cost, _ = scaled_costs(instance.decode_ms.tolist())
    n = instance.num_servers
    model = cp_model.CpModel()
    flows: dict[int, dict[Link, cp_model.IntVar]] = {}
    objective: list[cp_model.LinearExprT] = []
    for client, count in enumerate(counts):
        if count == 0:
            continue
        flow = {
            link: model.new_int_var(0, count, f"y{client}_{link[0]}_{link[1]}") for link in blocks
        }
        flows[client] = flow
        model.add(sum(v for (i, _), v in flow.items() if i == SOURCE) == count)  # (19b)
        model.add(sum(v for (_, j), v in flow.items() if j == SINK) == count)
        for j in spans:
            model.add(
                sum(v for (_, b), v in flow.items() if b == j)
                == sum(v for (a, _), v in flow.items() if a == j)
            )
        for (i, j), var in flow.items():
            if j >= 0:
                cost = hop_cost[client * n + j] + block_cost[j] * blocks[(i, j)]
                objective.append(cost * var)  # (19a)
    for j, span in spans.items():  # (19c) memory in cache slots
        load = [
            blocks[link] * flow[link] for flow in flows.values() for link in flow if link[1] == j
        ]
        model.add(sum(load) <= instance.cache_slots(j, span.length))
    model.minimize(sum(objective))
    # Every client needs a chain; warm-start from the shortest paths when they fit in memory.
    try:
        shortest = cg.shortest_routes(instance, placement)
    except cg.InfeasibleError:
        raise cg.InfeasibleError(
            "infeasible: the placement does not cover every block (no chain from block 0 to L)"
        ) from None
    greedy = tuple(
        PlannedRoute(client, count, shortest[client].hops)
        for client, count in enumerate(counts)
        if count > 0
    )
    if fits_memory(instance, placement, greedy):
        for route in greedy:
            nodes = [SOURCE, *(hop.server for hop in route.hops), SINK]
            on_path = set(itertools.pairwise(nodes))
            for link, var in flows[route.client].items():
                model.add_hint(var, route.requests if link in on_path else 0)
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        raise cg.InfeasibleError(
            f"infeasible: {sum(counts)} concurrent requests do not fit the placement's free memory"
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise MilpNoSolutionError(
            f"routing ILP found no solution within {time_limit_s:g} s "
            f"(CP-SAT status {solver.status_name(status)})"
        )
    paths = {
        client: decompose_flow(
            {link: int(solver.value(v)) for link, v in flow.items()}, counts[client]
        )
        for client, flow in flows.items()
    }
    routes = planned_routes(instance, placement, paths)
    check_solution(instance, placement, routes)
    return routes
