"""Placement planning for the coordinator: the solver in a worker process, and hysteresis.

``run_solver`` runs ``app.allocation.solve.solve`` in a separate process (forkserver) and
kills it when the time limit plus a grace period passes, so that a slow MILP can neither block
the API nor outlive its budget. Its outcomes: a Solution; SolverNoSolution (the solver
stopped at its time limit without a placement: a longer limit may find one); SolverTimeout
(the worker overran limit + grace and was killed); SolverError (the input was refused).

``plan_update`` turns a fresh solution into the placement to
publish: it prefers keeping servers' current spans when the objective allows, and keeps the
current placement unless the new one gains enough (or the current one lost coverage).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from app.allocation import cg
from app.allocation.instance import Instance, Placement, Span
from app.allocation.routing import RouteIndex
from app.allocation.scenario import Scenario, ScenarioError, parse_scenario
from app.allocation.solve import Solution

SOLVER_GRACE_S = 5.0
_context_lock = threading.Lock()
_context: Any = None


class SolverError(Exception):
    """The solver refused the input (infeasible, unknown algorithm, ...)."""


class SolverNoSolution(SolverError):
    """The solver respected its time limit but found no placement within it."""


class SolverTimeout(Exception):
    """The solver ran past its hard time limit and was killed."""


def _mp_context() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["numpy", "app.allocation.solve"])
            _context = context
        return _context


def _worker(
    out: Connection, scenario_json: str, algorithm: str, concurrency: int, limit: float
) -> None:
    from app.allocation.solve import NoSolutionError, solve  # the allocation core only

    try:
        scenario = parse_scenario(json.loads(scenario_json))
        solution = solve(scenario, algorithm, concurrency, limit)  # type: ignore[arg-type]
        out.send(("ok", solution))
    except NoSolutionError as error:
        out.send(("no_solution", str(error)))
    except ImportError as error:
        out.send(("error", f"algorithm {algorithm!r} is not available: {error}"))
    except (ValueError, ScenarioError) as error:  # InfeasibleError is a ValueError
        out.send(("error", str(error)))
    except Exception as error:  # a crash must reach the parent as a message, not a hang
        out.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        out.close()


def run_solver(
    scenario: Scenario,
    algorithm: str,
    concurrency: int,
    time_limit_s: float,
    grace_s: float = SOLVER_GRACE_S,
) -> Solution:
    context = _mp_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker,
        args=(send, scenario.model_dump_json(), algorithm, concurrency, time_limit_s),
        daemon=True,
    )
    process.start()
    send.close()
    try:
        if not receive.poll(time_limit_s + grace_s):
            raise SolverTimeout(
                f"the {algorithm} solver ran past its time limit of {time_limit_s:g} s "
                f"(+{grace_s:g} s grace) and was stopped"
            )
        try:
            result = receive.recv()
        except EOFError:
            raise SolverError(f"the {algorithm} solver process died") from None
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        receive.close()
    if result[0] == "ok":
        solution: Solution = result[1]
        return solution
    if result[0] == "no_solution":
        raise SolverNoSolution(str(result[1]))
    raise SolverError(str(result[1]))


# --- evaluation of placements on the live inputs -----------------------------------------


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


def plan_update(
    instance: Instance,
    solution: Solution,
    current: Placement,
    counts: list[int],
    min_gain: float,
) -> PlanDecision:
    """What to publish after a re-plan, given the spans servers hold now (``current``)."""
    concurrency = solution.concurrency
    fresh = list(solution.placement)
    fresh_objective = evaluate(instance, solution.placement, counts)
    if fresh_objective is None:  # cannot happen for a solver's output, but never publish it
        raise SolverError("the solver returned a placement that does not cover every block")
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
    moved = sum(
        1 for old, new in zip(current, candidate, strict=True) if old is not None and old != new
    )
    current_ok = any(s is not None for s in current) and has_capacity(
        instance, current, concurrency
    )
    current_objective = evaluate(instance, current, counts) if current_ok else None
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


def aligned_current(server_ids: tuple[str, ...], spans: dict[str, Span]) -> Placement:
    return tuple(spans.get(server_id) for server_id in server_ids)
