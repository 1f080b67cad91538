"""One entry point for every placement algorithm: a scenario in, a Solution out.

The objective reported for every algorithm is the same quantity, so that they compare:
the performance model's mean per-token decode time over the |R| planned requests, split over
clients by share (largest remainder) and each routed by the algorithm's own routing (chain
plans: the requests fill the chains fastest first, as JFFC does).

Algorithms: ``cg`` (CG-BPRR), ``milp`` (MILP-BPRR), ``petals`` (PETALS 2.2), ``chains``
(GBP-CR + GCA, served by JFFC) and ``auto`` (the default: the best of several candidate
placements for the workload profile, see app.allocation.auto). Chain plans carry their chains
and the Theorem-4 bounds on the mean response time; servers too small to serve are reported in
``details["warnings"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from app.allocation import cg
from app.allocation.chains import Chain, ChainsInfeasible
from app.allocation.instance import Instance, Placement
from app.allocation.perf import Hop, per_token_ms
from app.allocation.scenario import PoissonWorkload, Scenario
from app.allocation.workload import WorkloadProfile

Algorithm = Literal["auto", "chains", "cg", "milp", "petals"]
ALGORITHMS: tuple[Algorithm, ...] = ("auto", "chains", "cg", "milp", "petals")


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
    chains: tuple[Chain, ...] = ()  # chain plans: fastest first, served by JFFC
    dispatcher: str = "wsrr"  # "jffc" for chain plans

    @property
    def warnings(self) -> list[str]:
        value = self.details.get("warnings", [])
        return [str(w) for w in value] if isinstance(value, list) else []


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


def chain_routes(chains: tuple[Chain, ...], counts: list[int]) -> tuple[PlannedRoute, ...]:
    """The planned requests on the chains, fastest chain first up to its capacity (JFFC)."""
    tally: dict[tuple[int, int], int] = {}
    slots = [chain.capacity for chain in chains]
    position = 0
    for client, count in enumerate(counts):
        for _ in range(count):
            while position < len(chains) - 1 and slots[position] == 0:
                position += 1
            slots[position] = max(0, slots[position] - 1)
            tally[(client, position)] = tally.get((client, position), 0) + 1
    return tuple(
        PlannedRoute(client, number, chains[k].hops) for (client, k), number in tally.items()
    )


def solve_chains(
    scenario: Scenario,
    instance: Instance,
    concurrency: int,
    counts: list[int],
    profile: WorkloadProfile,
    algorithm: str,
) -> Solution:
    from app.allocation.auto import plan_auto
    from app.allocation.chain_search import plan_chains

    started = time.perf_counter()
    details: dict[str, object] = {"profile": profile.to_json()}
    if algorithm == "chains":
        plan = plan_chains(instance, profile)
        placement, chains, bounds = plan.placement, plan.chains, plan.bounds
        details.update(c=plan.c, candidates_evaluated=plan.candidates_evaluated)
        warnings = list(plan.warnings)
    else:
        auto = plan_auto(scenario, instance, profile)
        best = auto.best
        placement, chains, bounds = best.placement, best.chains, best.bounds
        details.update(
            candidate=best.name,
            candidates=[c.summary() for c in auto.candidates],
        )
        if auto.chain_plan is not None:
            details["c"] = auto.chain_plan.c
        warnings = list(auto.warnings)
    if not chains:
        raise ChainsInfeasible("infeasible: no chain of servers covers every block")
    routes = chain_routes(chains, counts)
    details.update(
        lower_bound_s=bounds.lower_s,
        upper_bound_s=bounds.upper_s,
        stable=bounds.stable,
        service_rate_per_s=bounds.total_rate_per_s,
        slots=bounds.slots,
        warnings=warnings,
    )
    return Solution(
        algorithm=algorithm,
        concurrency=concurrency,
        placement=placement,
        routes=routes,
        objective_ms_per_token=mean_per_token_ms(instance, routes),
        bound_ms_per_token=None,
        optimal=None,
        status="heuristic",
        solve_seconds=time.perf_counter() - started,
        details=details,
        chains=chains,
        dispatcher="jffc",
    )


def solve(
    scenario: Scenario,
    algorithm: Algorithm = "auto",
    concurrency: int | None = None,
    time_limit_s: float = 30.0,
    profile: WorkloadProfile | None = None,
) -> Solution:
    """Place blocks (and plan routes) for ``scenario`` with ``algorithm``.

    ``profile`` (chain plans and auto): the workload to plan for; default: the scenario's.
    Servers too small to serve stay idle and are listed in ``details["warnings"]``.
    """
    instance = Instance.from_scenario(scenario)
    if concurrency is None:
        concurrency = default_concurrency(scenario, instance)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    counts = scenario.client_request_counts(concurrency)
    solution = _solve(scenario, instance, algorithm, concurrency, counts, time_limit_s, profile)
    small = scenario.warnings()
    if small:
        solution.details["warnings"] = small + solution.warnings
    return solution


def _solve(
    scenario: Scenario,
    instance: Instance,
    algorithm: Algorithm,
    concurrency: int,
    counts: list[int],
    time_limit_s: float,
    profile: WorkloadProfile | None,
) -> Solution:
    if algorithm in ("chains", "auto"):
        if profile is None:
            profile = WorkloadProfile.from_scenario(scenario)
        return solve_chains(scenario, instance, concurrency, counts, profile, algorithm)
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
