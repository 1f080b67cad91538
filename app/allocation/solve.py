"""One entry point for every placement algorithm: a scenario in, a Solution out.

The objective reported for every algorithm is the same quantity, so that they compare:
the performance model's mean per-token decode time over the |R| planned requests, split over
clients by share (largest remainder) and each routed by the algorithm's own routing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from app.allocation import cg
from app.allocation.instance import Instance, Placement
from app.allocation.perf import Hop, per_token_ms
from app.allocation.scenario import PoissonWorkload, Scenario

Algorithm = Literal["cg", "milp", "petals"]
ALGORITHMS: tuple[Algorithm, ...] = ("cg", "milp", "petals")


class NoSolutionError(RuntimeError):
    """The solver found no placement within its limits (neither proven infeasible nor solved)."""


@dataclass(frozen=True)
class PlannedRoute:
    """``requests`` requests of client ``client`` follow ``hops``."""

    client: int
    requests: int
    hops: tuple[Hop, ...]


@dataclass(frozen=True)
class Solution:
    algorithm: str
    concurrency: int
    placement: Placement
    routes: tuple[PlannedRoute, ...]
    objective_ms_per_token: float
    bound_ms_per_token: float | None
    optimal: bool | None
    status: str  # "optimal", "feasible" (MILP), or "heuristic"
    solve_seconds: float
    gap: float | None = None
    details: dict[str, object] = field(default_factory=dict)


def mean_per_token_ms(instance: Instance, routes: tuple[PlannedRoute, ...]) -> float:
    total = sum(r.requests for r in routes)
    if total == 0:
        return 0.0
    return sum(r.requests * per_token_ms(instance, r.client, r.hops) for r in routes) / total


def default_concurrency(scenario: Scenario, instance: Instance) -> int:
    """|R| from the workload's arrival rate when there is one, else 1 request per client."""
    if isinstance(scenario.workload, PoissonWorkload):
        return cg.design_concurrency(instance, scenario.workload.rate_per_s)
    return max(1, instance.num_clients)


def solve_cg(instance: Instance, concurrency: int, counts: list[int]) -> Solution:
    started = time.perf_counter()
    result = cg.place(instance, concurrency)
    routes = cg.shortest_routes(instance, result.placement)
    planned = tuple(
        PlannedRoute(client, count, route.hops)
        for client, (count, route) in enumerate(zip(counts, routes, strict=True))
        if count > 0
    )
    return Solution(
        algorithm="cg",
        concurrency=concurrency,
        placement=result.placement,
        routes=planned,
        objective_ms_per_token=mean_per_token_ms(instance, planned),
        bound_ms_per_token=result.bound_ms_per_token,
        optimal=None,
        status="heuristic",
        solve_seconds=time.perf_counter() - started,
        details={"block_counts": list(result.block_counts), "order": list(result.order)},
    )


def solve(
    scenario: Scenario,
    algorithm: Algorithm = "cg",
    concurrency: int | None = None,
    time_limit_s: float = 30.0,
) -> Solution:
    instance = Instance.from_scenario(scenario)
    if concurrency is None:
        concurrency = default_concurrency(scenario, instance)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    counts = scenario.client_request_counts(concurrency)
    if algorithm == "cg":
        return solve_cg(instance, concurrency, counts)
    if algorithm == "milp":
        from app.allocation import milp  # CP-SAT loads only when asked for

        try:
            return milp.solve_milp(instance, concurrency, counts, time_limit_s=time_limit_s)
        except milp.MilpNoSolutionError as error:
            raise NoSolutionError(str(error)) from None
    if algorithm == "petals":
        from app.allocation import petals

        return petals.solve_petals(scenario, instance, concurrency, counts)
    raise ValueError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
