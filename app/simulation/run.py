"""One simulation run: a scenario, a policy, a seed -> a SimResult."""

from __future__ import annotations

from app.allocation.instance import Instance
from app.allocation.scenario import Scenario
from app.allocation.workload import WorkloadProfile
from app.simulation.engine import SimResult, Simulator
from app.simulation.policies import build_policy
from app.simulation.service import make_service_model
from app.simulation.workload import Workload, scenario_workload


def simulate(
    scenario: Scenario,
    policy: str,
    seed: int | None = None,
    *,
    workload: Workload | None = None,
    service_model: str = "paper",
    milp_time_limit_s: float = 10.0,
) -> SimResult:
    """Simulate ``scenario``'s workload (or ``workload``) under ``policy``.

    The same scenario, policy and seed always give the same result (wall time aside).
    """
    instance = Instance.from_scenario(scenario)
    if workload is None:
        workload = scenario_workload(scenario, seed)
    profile = workload_profile(workload)
    built = build_policy(
        policy, scenario, instance, workload.rate_per_s, milp_time_limit_s, profile
    )
    sim = Simulator(
        instance,
        workload,
        built.policy,
        make_service_model(service_model, instance),
        scenario_name=scenario.name,
    )
    result = sim.run()
    result.placement_seconds = built.placement_seconds
    if built.concurrency is not None:
        result.extra["design_concurrency"] = built.concurrency
    result.extra["peak_concurrency"] = peak_concurrency(result)
    for key, value in built.details.items():
        if key != "block_counts":
            result.extra[key] = value
    return result


def workload_profile(workload: Workload) -> WorkloadProfile:
    """The profile the chain policies plan for: the workload's rate and length statistics."""
    return WorkloadProfile.from_samples(
        workload.rate_per_s, workload.input_tokens, workload.output_tokens
    )


def peak_concurrency(result: SimResult) -> int:
    """Most requests in the system (arrived, not finished) at any instant."""
    import numpy as np

    times = np.concatenate([result.arrival_ms, result.end_ms])
    # Ends sort before arrivals at the same instant, as in the engine.
    kinds = np.concatenate([np.ones(result.requests), -np.ones(result.requests)])
    order = np.lexsort((kinds, times))
    return int(np.cumsum(kinds[order]).max())
