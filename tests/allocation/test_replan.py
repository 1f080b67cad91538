"""The pure re-plan decision: who may be planned on, when to re-plan, what to publish."""

from __future__ import annotations

import pytest

from app.allocation import replan
from app.allocation.instance import Instance, Span
from app.allocation.solve import solve
from app.allocation.workload import WorkloadProfile
from tests.scenarios import build, server


def states() -> list[replan.ServerState]:
    return [
        replan.ServerState("live", 3.0, lease_expires_at=100.0, state="online"),
        replan.ServerState("expired", 3.0, lease_expires_at=10.0, state="online"),
        replan.ServerState("draining", 3.0, lease_expires_at=100.0, state="draining"),
        replan.ServerState("small", 1.05, lease_expires_at=100.0, state="online"),
    ]


def test_plannable_keeps_live_undrained_servers_with_room() -> None:
    live = replan.plannable(states(), now=50.0, block_gb=1.0, cache_gb=0.1)
    assert [s.id for s in live] == ["live"]


def test_coverage_lost() -> None:
    live = replan.plannable(states(), 50.0, 1.0, 0.1)
    assert replan.coverage_lost(4, live, None)  # nothing published
    assert not replan.coverage_lost(4, live, {"live": Span(0, 4)})
    assert replan.coverage_lost(4, live, {"live": Span(0, 3), "expired": Span(3, 4)})


def test_replan_reason_in_priority_order() -> None:
    calls: list[int] = []

    def current() -> float:
        calls.append(1)
        return 130.0

    assert replan.replan_reason("operator asked", True, 100.0, current, 0.2) == "operator asked"
    assert replan.replan_reason(None, True, 100.0, current, 0.2) == "coverage lost"
    assert calls == []  # the objective is evaluated only when needed
    assert replan.replan_reason(None, False, None, current, 0.2) is None  # nothing published
    drifted = replan.replan_reason(None, False, 100.0, current, 0.2)
    assert drifted == "measurements drifted (100.0 -> 130.0 ms/token)"
    assert replan.replan_reason(None, False, 100.0, 110.0, 0.2) is None  # within 20%
    assert replan.replan_reason(None, False, 100.0, None, 0.2) == "coverage lost"


def test_planner_concurrency() -> None:
    assert replan.planner_concurrency(10, 4, None, 0, 3) == 4
    assert replan.planner_concurrency(10, 40, None, 0, 3) == 10  # capped
    assert replan.planner_concurrency(10, None, lambda: 7, 5, 3) == 7
    assert replan.planner_concurrency(10, None, None, 5, 3) == 5
    assert replan.planner_concurrency(10, None, None, 0, 3) == 3  # one per client site
    with pytest.raises(ValueError, match="even for one request"):
        replan.planner_concurrency(0, None, None, 0, 3)


def two_servers() -> tuple[Instance, object]:
    scenario = build(
        servers=[
            server("s0", "a", memory=6.0, decode=2.0),
            server("s1", "a", memory=6.0, decode=1.0),
        ]
    )
    return Instance.from_scenario(scenario), scenario


def test_plan_update_publishes_when_nothing_usable_and_keeps_unchanged() -> None:
    instance, scenario = two_servers()
    solution = solve(scenario, "cg", 2)  # type: ignore[arg-type]
    counts = [2]
    first = replan.plan_update(instance, solution, (None, None), counts, 0.1)
    assert first.publish and first.reason == "no usable plan"
    again = replan.plan_update(instance, solution, solution.placement, counts, 0.1)
    assert not again.publish and again.reason == "unchanged"


def test_plan_update_hysteresis() -> None:
    instance, scenario = two_servers()
    solution = solve(scenario, "cg", 1)  # type: ignore[arg-type]
    fresh = replan.evaluate(instance, solution.placement, [1])
    assert fresh is not None
    # Current: the model split over both servers (usable, one hop more: slower).
    current = (Span(0, 2), Span(2, 4))
    slow = replan.evaluate(instance, current, [1])
    assert slow is not None and slow > fresh
    gain = 1 - fresh / slow
    published = replan.plan_update(instance, solution, current, [1], gain / 2)
    assert published.publish and published.reason == "gain" and published.moved > 0
    kept = replan.plan_update(instance, solution, current, [1], min(0.99, gain * 2))
    assert not kept.publish and kept.reason == "gain below hysteresis"


def test_chain_plans_compare_their_bounds() -> None:
    instance, scenario = two_servers()
    profile = WorkloadProfile.at_caps(scenario, 0.5)  # type: ignore[arg-type]
    solution = solve(scenario, "chains", profile=profile)  # type: ignore[arg-type]
    assert solution.chains
    decision = replan.plan_update(instance, solution, (None, None), [1], 0.1, profile)
    assert decision.publish and decision.reason == "no usable plan"
    same = replan.plan_update(instance, solution, solution.placement, [1], 0.1, profile)
    assert not same.publish
    assert same.objective_ms_per_token == pytest.approx(float(solution.details["lower_bound_s"]))  # type: ignore[arg-type]
