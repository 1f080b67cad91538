"""auto: candidates scored for the workload, the best kept, every score reported."""

from __future__ import annotations

import pytest

from app.allocation.auto import Candidate, plan_auto
from app.allocation.chains import ChainsInfeasible, response_bounds
from app.allocation.instance import Instance
from app.allocation.solve import solve
from app.allocation.workload import WorkloadProfile
from app.simulation import generators
from tests.scenarios import build, server


def scenarios() -> list[object]:
    return [
        generators.clustered(128, 0.5, 50, 1),
        generators.clustered(64, 0.1, 50, 2, client_cluster=1),
        generators.random_clustered(30, 0.2, 1.2, 50, 3),
        generators.geo(rate_per_s=2.0, num_requests=50, seed=1),
        generators.mig_swarm(9, 2.57, 200, 1),
        generators.mig_swarm(60, 17.0, 200, 2, trace=False),
    ]


@pytest.mark.parametrize("index", range(6))
def test_auto_never_picks_a_worse_score(index: int) -> None:
    scenario = scenarios()[index]
    instance = Instance.from_scenario(scenario)  # type: ignore[arg-type]
    profile = WorkloadProfile.from_scenario(scenario)  # type: ignore[arg-type]
    plan = plan_auto(scenario, instance, profile)  # type: ignore[arg-type]
    names = [c.name for c in plan.candidates]
    assert names[0] == "chains" and "petals" in names
    assert any(name.startswith("cg-R") for name in names)
    assert plan.best.chains
    for other in plan.candidates:
        assert plan.best.score_s <= other.score_s + 1e-9 or not other.chains
    # The winner's chains fit its placement's memory with the design request.
    tokens = profile.design_tokens()
    held = [0] * instance.num_servers
    for chain in plan.best.chains:
        for hop in chain.hops:
            held[hop.server] += chain.capacity * hop.blocks * tokens
    if len(instance.client_ids) == 1:  # several clients: chains overlap, memory checked per job
        for j, span in enumerate(plan.best.placement):
            if span is not None:
                assert held[j] <= instance.cache_tokens(j, span.length)


def test_an_injected_score_decides() -> None:
    scenario = generators.clustered(128, 0.5, 50, 1)
    instance = Instance.from_scenario(scenario)
    profile = WorkloadProfile.from_scenario(scenario)

    def prefer_petals(candidate: Candidate) -> float:
        return 0.0 if candidate.name == "petals" else 1.0

    plan = plan_auto(scenario, instance, profile, score=prefer_petals)
    assert plan.best.name == "petals"
    assert {c.name: c.score_s for c in plan.candidates}["petals"] == 0.0


def test_pruned_candidates_report_the_bound_that_pruned_them() -> None:
    scenario = generators.mig_swarm(120, 34.0, 200, 1, trace=False)
    instance = Instance.from_scenario(scenario)
    plan = plan_auto(scenario, instance, WorkloadProfile.from_scenario(scenario))
    for candidate in plan.candidates:
        if candidate.details.get("pruned"):
            assert not candidate.chains
            assert candidate.score_s > plan.best.score_s


def test_solve_auto_reports_every_candidate_and_the_winner() -> None:
    solution = solve(generators.mig_swarm(9, 2.57, 200, 1))
    assert solution.algorithm == "auto" and solution.dispatcher == "jffc"
    details = solution.details
    scores = {c["name"]: c["score_s"] for c in details["candidates"]}  # type: ignore[attr-defined]
    assert details["candidate"] in scores
    best = scores[str(details["candidate"])]
    assert all(best <= s + 1e-6 for s in scores.values() if s is not None)
    lower = float(details["lower_bound_s"])  # type: ignore[arg-type]
    assert lower == pytest.approx(response_bounds(2.57, solution.chains).lower_s, rel=0.05)


def test_solve_chains_carries_chains_and_bounds() -> None:
    solution = solve(generators.clustered(128, 0.5, 50, 1), "chains")
    assert solution.chains and solution.dispatcher == "jffc"
    chain = solution.chains[0]
    assert chain.hops[0].start == 0 and chain.hops[-1].end == 70
    assert solution.details["lower_bound_s"] <= solution.details["upper_bound_s"]  # type: ignore[operator]
    assert isinstance(solution.details["c"], int)
    assert sum(r.requests for r in solution.routes) == solution.concurrency


def test_small_servers_are_left_idle_with_a_warning() -> None:
    scenario = build(
        servers=[
            server("tiny", "a", memory=1.05, decode=1.0),
            server("s1", "a", memory=6.0, decode=1.0),
        ]
    )
    for algorithm in ("auto", "chains", "cg"):
        solution = solve(scenario, algorithm)  # type: ignore[arg-type]
        assert solution.placement[0] is None
        assert any("tiny" in w and "left idle" in w for w in solution.warnings), algorithm


def test_no_feasible_candidate_is_an_error() -> None:
    scenario = build(servers=[server("tiny", "a", memory=1.05, decode=1.0)])
    with pytest.raises((ChainsInfeasible, ValueError)):
        solve(scenario, "auto")
