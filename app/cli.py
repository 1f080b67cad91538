"""The ``bprr`` command line: offline solvers, the simulator and the coordinator.

Errors a person can fix (a bad file, a bad argument, an infeasible swarm) print one line
starting with ``error:`` and exit with status 2; they never print a traceback.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.allocation.cg import InfeasibleError
from app.allocation.chains import ChainsInfeasible
from app.allocation.scenario import ScenarioError, load_scenario
from app.allocation.solve import NoSolutionError, Solution, solve
from app.allocation.traces import WorkloadError
from app.allocation.workload import WorkloadProfile
from app.cli_style import UserError as UserError  # re-exported: app/api/commands.py raises it
from app.cli_style import bad_parameter_message, output_console, print_version
from app.plugins import PluginGroup

cli = typer.Typer(
    cls=PluginGroup,  # adds the harness's commands (app.plugins), imported only when used
    name="bprr",
    help="Block placement and request routing for geo-distributed LLM inference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


class Algorithm(enum.StrEnum):
    """``bprr solve --algorithm``: the values of app.allocation.solve.ALGORITHMS."""

    auto = "auto"
    chains = "chains"
    cg = "cg"
    milp = "milp"
    petals = "petals"


def fail(message: str) -> None:
    raise UserError(message)


def solution_json(solution: Solution, server_ids: tuple[str, ...]) -> dict[str, object]:
    data = _solution_core(solution, server_ids)
    if solution.chains:
        details = solution.details
        data["dispatcher"] = solution.dispatcher
        data["chains"] = [
            {**chain.to_json(server_ids), "rate_per_s": round(chain.rate_per_s, 6)}
            for chain in solution.chains
        ]
        for key in ("c", "candidate", "candidates", "profile", "stable", "slots"):
            if key in details:
                data[key] = details[key]
        for key in ("lower_bound_s", "upper_bound_s", "service_rate_per_s"):
            value = details.get(key)
            data[key] = round(value, 6) if isinstance(value, float) and value < 1e300 else None
    data["warnings"] = solution.warnings
    return data


def _solution_core(solution: Solution, server_ids: tuple[str, ...]) -> dict[str, object]:
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
        Algorithm,
        typer.Option(
            "--algorithm",
            "-a",
            help="auto (best candidate for the workload), chains (GBP-CR + GCA + JFFC), "
            "cg (CG-BPRR), milp (CP-SAT) or petals.",
        ),
    ] = Algorithm.auto,
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
    if concurrency is not None and concurrency < 1:
        fail("--concurrency: must be at least 1")
    if time_limit <= 0:
        fail("--time-limit: must be positive")
    scenario = load_scenario(scenario_path)
    try:
        profile = WorkloadProfile.from_scenario(scenario)
    except (ValueError, WorkloadError) as error:
        raise UserError(str(error)) from None
    solution = solve(scenario, algorithm.value, concurrency, time_limit, profile)
    server_ids = tuple(s.id for s in scenario.servers)
    for warning in solution.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if as_json:
        print(json.dumps(solution_json(solution, server_ids)))
        return
    print_solution(scenario.name, solution, server_ids, [c.id for c in scenario.clients])


def print_solution(
    name: str, solution: Solution, server_ids: tuple[str, ...], client_ids: list[str]
) -> None:
    console = output_console()
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
    if solution.chains:
        print_chains(console, solution, server_ids)
    bound = (
        "n/a" if solution.bound_ms_per_token is None else f"{solution.bound_ms_per_token:.3f} ms"
    )
    optimal = {True: "yes", False: "no", None: "n/a"}[solution.optimal]
    console.print(
        f"mean per-token time {solution.objective_ms_per_token:.3f} ms, bound {bound}, "
        f"optimal {optimal}, status {solution.status}, solved in {solution.solve_seconds:.3f} s"
    )


def print_chains(console: Console, solution: Solution, server_ids: tuple[str, ...]) -> None:
    details = solution.details
    table = Table(title=f"{len(solution.chains)} chains (JFFC, fastest first)")
    table.add_column("#", justify="right")
    table.add_column("capacity", justify="right")
    table.add_column("rate (jobs/s per slot)", justify="right")
    table.add_column("service (ms)", justify="right")
    table.add_column("hops")
    for k, chain in enumerate(solution.chains):
        hops = " -> ".join(f"{server_ids[h.server]}[{h.start},{h.end})" for h in chain.hops)
        table.add_row(
            str(k),
            str(chain.capacity),
            f"{chain.rate_per_s:.4f}",
            f"{chain.service_ms:.1f}",
            hops,
        )
    console.print(table)
    for candidate in details.get("candidates", []) or []:  # type: ignore[attr-defined]
        console.print(
            f"candidate {candidate['name']}: predicted mean response "
            f"{_seconds(candidate['score_s'])}, {candidate['chains']} chains"
        )
    if "candidate" in details:
        console.print(f"auto chose: {details['candidate']}")
    if "c" in details:
        console.print(f"cache reservation c = {details['c']}")
    console.print(
        f"Theorem 4: mean response between {_seconds(details.get('lower_bound_s'))} and "
        f"{_seconds(details.get('upper_bound_s'))} (service rate "
        f"{float(details.get('service_rate_per_s', 0.0)):.3f} jobs/s, "  # type: ignore[arg-type]
        f"{details.get('slots')} slots)"
    )


def _seconds(value: object) -> str:
    if not isinstance(value, int | float) or value != value or value > 1e300:
        return "unbounded (unstable)"
    return f"{value:.3f} s"


@cli.callback()
def _group(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=print_version,
            help="Print the version of bprr and exit.",
        ),
    ] = False,
) -> None:
    """Block placement and request routing for geo-distributed LLM inference."""


from app.simulation.commands import register as register_simulation  # noqa: E402

register_simulation(cli)

from app.api.commands import register as register_coordinator  # noqa: E402

register_coordinator(cli)

from app.profiler.commands import register as register_profiler  # noqa: E402

register_profiler(cli)

# `bprr testbed` comes from the harness (entry-point group bprr.commands), loaded when used:
# app.plugins.PluginGroup


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(cli)
    try:
        command.main(args=argv, prog_name="bprr", standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.BadParameter as error:
        message = bad_parameter_message(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except typer.TyperException as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            print(getattr(error, "format_message", error.__str__)())
            sys.exit(2)
        message = getattr(error, "format_message", error.__str__)()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except (
        UserError,
        ScenarioError,
        InfeasibleError,
        NoSolutionError,
        ChainsInfeasible,
        WorkloadError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
