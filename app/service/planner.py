"""Placement planning for the coordinator: the solver in a worker process, and hysteresis.

``run_solver`` runs ``app.allocation.solve.solve`` in a separate process (forkserver) and
kills it when the time limit plus a grace period passes, so that a slow MILP can neither block
the API nor outlive its budget. Its outcomes: a Solution; SolverNoSolution (the solver
stopped at its time limit without a placement: a longer limit may find one); SolverTimeout
(the worker overran limit + grace and was killed); SolverError (the input was refused).

The re-plan decision itself (hysteresis, coverage lost, concurrency) is
app.allocation.replan's; ``aligned_current`` lines the published spans up with a scenario's
servers for it.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any

from app.allocation.instance import Placement, Span
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


def aligned_current(server_ids: tuple[str, ...], spans: dict[str, Span]) -> Placement:
    return tuple(spans.get(server_id) for server_id in server_ids)
