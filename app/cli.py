"""The ``bprr`` command line: offline solvers, the simulator and the coordinator.

Errors a person can fix (a bad file, a bad argument, an infeasible swarm) print one line
starting with ``error:`` and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.allocation.cg import InfeasibleError
from app.allocation.scenario import ScenarioError, load_scenario
from app.allocation.solve import ALGORITHMS, NoSolutionError, Solution, solve

cli = typer.Typer(
    name="bprr",
    help="Block placement and request routing for geo-distributed LLM inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class UserError(Exception):
    """A problem with the user's input: reported in one line, exit status 2."""


def fail(message: str) -> None:
    raise UserError(message)


def solution_json(solution: Solution, server_ids: tuple[str, ...]) -> dict[str, object]:
    return {
        "algorithm": solution.algorithm,
        "concurrency": solution.concurrency,
        "placement": [
            {"server": server_ids[j], "start": span.start, "end": span.end}
            for j, span in enumerate(solution.placement)
            if span is not None
        ],
        "objective_ms_per_token": round(solution.objective_ms_per_token, 6),
        "bound_ms_per_token": (
            None if solution.bound_ms_per_token is None else round(solution.bound_ms_per_token, 6)
        ),
        "optimal": solution.optimal,
        "solve_seconds": round(solution.solve_seconds, 6),
    }


@cli.command("solve")
def solve_command(
    scenario_path: Annotated[Path, typer.Argument(metavar="SCENARIO", help="Scenario JSON file.")],
    algorithm: Annotated[
        str, typer.Option("--algorithm", "-a", help="cg (CG-BPRR), milp (CP-SAT) or petals.")
    ] = "cg",
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-R", help="Design concurrency |R| (default: from the load)."
        ),
    ] = None,
    time_limit: Annotated[
        float, typer.Option("--time-limit", help="MILP time limit in seconds.")
    ] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Place blocks and route requests for a scenario, and report the predicted per-token time."""
    if algorithm not in ALGORITHMS:
        fail(f"--algorithm: unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if concurrency is not None and concurrency < 1:
        fail("--concurrency: must be at least 1")
    if time_limit <= 0:
        fail("--time-limit: must be positive")
    scenario = load_scenario(scenario_path)
    solution = solve(scenario, algorithm, concurrency, time_limit)  # type: ignore[arg-type]
    server_ids = tuple(s.id for s in scenario.servers)
    if as_json:
        print(json.dumps(solution_json(solution, server_ids)))
        return
    print_solution(scenario.name, solution, server_ids, [c.id for c in scenario.clients])


def print_solution(
    name: str, solution: Solution, server_ids: tuple[str, ...], client_ids: list[str]
) -> None:
    console = Console()
    table = Table(title=f"{name}: {solution.algorithm} placement for |R| = {solution.concurrency}")
    table.add_column("server")
    table.add_column("blocks", justify="right")
    table.add_column("span")
    for server, span in zip(server_ids, solution.placement, strict=True):
        if span is None:
            table.add_row(server, "0", "-")
        else:
            table.add_row(server, str(span.length), f"[{span.start}, {span.end})")
    console.print(table)
    for route in solution.routes:
        chain = " -> ".join(f"{server_ids[h.server]}[{h.start},{h.end})" for h in route.hops)
        console.print(f"client {client_ids[route.client]} ({route.requests} requests): {chain}")
    bound = (
        "n/a" if solution.bound_ms_per_token is None else f"{solution.bound_ms_per_token:.3f} ms"
    )
    optimal = {True: "yes", False: "no", None: "n/a"}[solution.optimal]
    console.print(
        f"mean per-token time {solution.objective_ms_per_token:.3f} ms, bound {bound}, "
        f"optimal {optimal}, status {solution.status}, solved in {solution.solve_seconds:.3f} s"
    )


@cli.callback()
def _group() -> None:
    """Block placement and request routing for geo-distributed LLM inference."""


from app.simulation.commands import register as register_simulation  # noqa: E402

register_simulation(cli)

from app.api.commands import register as register_coordinator  # noqa: E402

register_coordinator(cli)

from app.profiler.commands import register as register_profiler  # noqa: E402

register_profiler(cli)

from app.testbed.commands import register as register_testbed  # noqa: E402

register_testbed(cli)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(cli)
    try:
        command.main(args=argv, prog_name="bprr", standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            print(getattr(error, "format_message", error.__str__)())
            sys.exit(2)
        message = getattr(error, "format_message", error.__str__)()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except (UserError, ScenarioError, InfeasibleError, NoSolutionError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
