"""The re-plan decision, pure: a snapshot of the swarm in, what the planner should do out.

The coordinator's planner loop (app/service/placements.py) calls these; nothing here reads a
database or a clock. Three questions, each one function:

- which servers may be planned on (``plannable``): a live lease, not draining, and memory for
  one block plus one request's cache (smaller ones stay idle and are reported, never an error);
- whether to re-plan now (``replan_reason``): an explicit request, coverage lost (some block
  has no live server), or measurements drifted from the published objective by more than
  ``drift``; None means steady;
- what to publish after solving (``plan_update``): hysteresis. The fresh plan is published
  when no usable plan exists or it gains at least ``min_gain``; for CG plans, servers keep
  their current spans where the objective allows (fewer spans moved). Chain plans compare the
  Theorem-4 lower bound of their chains with that of GCA chains on the current placement.

Also the design concurrency the planner solves for (``planner_concurrency``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from app.allocation import cg
from app.allocation.instance import Instance, Placement, Span
from app.allocation.routing import RouteIndex
from app.allocation.solve import Solution
from app.allocation.workload import WorkloadProfile

__all__ = [
    "PlanDecision",
    "ServerState",
    "coverage_lost",
    "evaluate",
    "has_capacity",
    "plan_update",
    "plannable",
    "planner_concurrency",
    "replan_reason",
]


class UnusablePlan(ValueError):
    """A solver's placement that does not cover every block: never published."""


@dataclass(frozen=True)
class ServerState:
    """What the planner knows of one server."""

    id: str
    memory_gb: float
    lease_expires_at: float
    state: str  # "online", "draining", ...


def plannable(
    servers: Iterable[ServerState], now: float, block_gb: float, cache_gb: float
) -> list[ServerState]:
    """Servers the planner may use: live lease, not draining, room for one block + one cache."""
    one_block = block_gb + cache_gb
    return [
        s
        for s in servers
        if s.lease_expires_at > now and s.state != "draining" and s.memory_gb >= one_block
    ]


def coverage_lost(
    num_blocks: int, live: Iterable[ServerState], spans: dict[str, Span] | None
) -> bool:
    """True when no placement is published or some block has no live server hosting it."""
    if not spans:
        return True
    covered = np.zeros(num_blocks, dtype=bool)
    for server in live:
        span = spans.get(server.id)
        if span is not None:
            covered[span.start : min(span.end, num_blocks)] = True
    return not bool(covered.all())


def replan_reason(
    requested: str | None,
    lost: bool,
    stored_objective: float | None,
    current_objective: float | Callable[[], float | None] | None,
    drift: float,
) -> str | None:
    """Why to re-plan now, or None (steady).

    ``stored_objective``: the published placement's objective (None: nothing published);
    ``current_objective``: the same placement evaluated on the live inputs (None: no chain
    covers the model any more), or a callable computing it, called only when needed.
    """
    if requested:
        return requested
    if lost:
        return "coverage lost"
    if stored_objective is None:
        return None
    value = current_objective() if callable(current_objective) else current_objective
    if value is None:
        return "coverage lost"
    if stored_objective > 0 and abs(value - stored_objective) / stored_objective > drift:
        return f"measurements drifted ({stored_objective:.1f} -> {value:.1f} ms/token)"
    return None


def planner_concurrency(
    max_feasible: int,
    configured: int | None,
    from_rate: Callable[[], int] | None,
    default: int,
    num_clients: int,
) -> int:
    """|R| to solve for: the configured value, else the rate's design concurrency, else the
    default (> 0), else one per client site; always within [1, max_feasible].

    Raises ValueError when not even one request fits (max_feasible < 1).
    """
    if max_feasible < 1:
        raise ValueError("the live servers cannot hold the model even for one request")
    if configured is not None:
        wanted = configured
    elif from_rate is not None:
        wanted = from_rate()
    elif default > 0:
        wanted = default
    else:
        wanted = max(1, num_clients)
    return max(1, min(wanted, max_feasible))


# --- hysteresis -------------------------------------------------------------------------


def evaluate(instance: Instance, placement: Placement, counts: list[int]) -> float | None:
    """Mean per-token time of the planned requests on their shortest paths; None if a client
    has no chain over this placement."""
    index = RouteIndex(placement, instance.num_blocks)
    total = 0.0
    requests = 0
    for client, count in enumerate(counts):
        route = index.shortest(instance.token_hop_ms[client], instance.decode_ms)
        if route is None:
            return None
        total += count * route.cost
        requests += count
    return total / requests if requests else 0.0


def has_capacity(instance: Instance, placement: Placement, concurrency: int) -> bool:
    """Every block can carry ``concurrency`` requests (each server spreading its cache slots
    evenly over its span), as CG-BP's conservative sizing guarantees."""
    capacity = np.zeros(instance.num_blocks, dtype=np.int64)
    for server, span in enumerate(placement):
        if span is None:
            continue
        if span.end > instance.num_blocks:
            return False
        capacity[span.start : span.end] += instance.cache_slots(server, span.length) // span.length
    return bool((capacity >= concurrency).all())


@dataclass(frozen=True)
class PlanDecision:
    publish: bool
    placement: Placement
    objective_ms_per_token: float | None
    current_objective_ms_per_token: float | None
    moved: int
    kept: int
    reason: str


def _moved(current: Placement, candidate: Placement) -> int:
    return sum(
        1 for old, new in zip(current, candidate, strict=True) if old is not None and old != new
    )


def plan_update(
    instance: Instance,
    solution: Solution,
    current: Placement,
    counts: list[int],
    min_gain: float,
    profile: WorkloadProfile | None = None,
) -> PlanDecision:
    """What to publish after a re-plan, given the spans servers hold now (``current``).

    A solution that carries chains (and a ``profile`` to score them) is judged by Theorem 4's
    lower bound on the mean response time (its ``objective``: seconds); others by the mean
    per-token time of the planned requests.
    """
    if solution.chains and profile is not None:
        return _chain_update(instance, solution, current, min_gain, profile)
    concurrency = solution.concurrency
    fresh = list(solution.placement)
    fresh_objective = evaluate(instance, solution.placement, counts)
    if fresh_objective is None:  # cannot happen for a solver's output, but never publish it
        raise UnusablePlan("the solver returned a placement that does not cover every block")
    blocks = cg.conservative_block_counts(instance, concurrency)
    best = list(fresh)
    best_objective = fresh_objective
    kept = 0
    tolerance = fresh_objective * (1 + min_gain / 2)
    for server, span in enumerate(current):
        if span is None or best[server] == span or span.length > blocks[server]:
            continue
        trial = list(best)
        trial[server] = span
        trial_placement: Placement = tuple(trial)
        if not has_capacity(instance, trial_placement, concurrency):
            continue
        objective = evaluate(instance, trial_placement, counts)
        if objective is not None and objective <= tolerance:
            best = trial
            best_objective = objective
            kept += 1
    candidate: Placement = tuple(best)
    moved = _moved(current, candidate)
    current_ok = any(s is not None for s in current) and has_capacity(
        instance, current, concurrency
    )
    current_objective = evaluate(instance, current, counts) if current_ok else None
    return _decide(current, candidate, best_objective, current_objective, moved, kept, min_gain)


def _decide(
    current: Placement,
    candidate: Placement,
    best_objective: float,
    current_objective: float | None,
    moved: int,
    kept: int,
    min_gain: float,
) -> PlanDecision:
    if current_objective is None:
        return PlanDecision(True, candidate, best_objective, None, moved, kept, "no usable plan")
    if candidate == current:
        return PlanDecision(
            False, current, current_objective, current_objective, 0, kept, "unchanged"
        )
    if moved == 0 and best_objective <= current_objective * (1 + 1e-9):
        return PlanDecision(
            True, candidate, best_objective, current_objective, 0, kept, "new servers only"
        )
    if best_objective <= current_objective * (1 - min_gain):
        return PlanDecision(True, candidate, best_objective, current_objective, moved, kept, "gain")
    return PlanDecision(
        False, current, current_objective, current_objective, 0, kept, "gain below hysteresis"
    )


def _chain_update(
    instance: Instance,
    solution: Solution,
    current: Placement,
    min_gain: float,
    profile: WorkloadProfile,
) -> PlanDecision:
    from app.allocation.chains import chains_for_placement

    _, fresh = chains_for_placement(instance, profile, solution.placement)
    if not fresh.stable and not any(s is not None for s in solution.placement):
        raise UnusablePlan("the solver returned an empty placement")
    current_objective: float | None = None
    if any(s is not None for s in current):
        chains, bounds = chains_for_placement(instance, profile, current)
        current_objective = bounds.lower_s if chains else None
    return _decide(
        current,
        solution.placement,
        fresh.lower_s,
        current_objective,
        _moved(current, solution.placement),
        0,
        min_gain,
    )


def spans_by_id(server_ids: Sequence[str], placement: Placement) -> dict[str, Span]:
    return {server_ids[j]: span for j, span in enumerate(placement) if span is not None}
