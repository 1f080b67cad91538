"""``bprr simulate`` and ``bprr experiment``: registered on the main CLI by ``register(cli)``."""

from __future__ import annotations

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
from app.simulation.engine import SimulationError
from app.simulation.policies import POLICIES
from app.simulation.service import SERVICE_MODELS
from app.simulation.workload import WorkloadError

JSON_DIGITS = 6


class SimulateUserError(ScenarioError):
    """A bad argument: the CLI reports it as one ``error:`` line, exit status 2."""


def _fail(message: str) -> None:
    raise SimulateUserError(message)


def _rounded(summary: dict[str, object]) -> dict[str, object]:
    return {k: round(v, JSON_DIGITS) if isinstance(v, float) else v for k, v in summary.items()}


def simulate_command(
    scenario_path: Annotated[Path, typer.Argument(metavar="SCENARIO", help="Scenario JSON file.")],
    policy: Annotated[
        str, typer.Option("--policy", "-p", help=f"One of: {', '.join(POLICIES)}.")
    ] = "auto",
    seed: Annotated[
        int | None, typer.Option("--seed", help="Override the workload's seed.")
    ] = None,
    service_model: Annotated[
        str,
        typer.Option("--service-model", help="paper (concurrency-independent) or batched."),
    ] = "paper",
    time_limit: Annotated[
        float, typer.Option("--time-limit", help="MILP time limit (milp-wsrr), seconds.")
    ] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Simulate the scenario's workload under one policy and summarise the requests' times."""
    from app.simulation.run import simulate

    if policy not in POLICIES:
        _fail(f"--policy: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if service_model not in SERVICE_MODELS:
        _fail(
            f"--service-model: unknown model {service_model!r} "
            f"(choose from {', '.join(SERVICE_MODELS)})"
        )
    if time_limit <= 0:
        _fail("--time-limit: must be positive")
    scenario = load_scenario(scenario_path)
    for warning in scenario.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        result = simulate(
            scenario, policy, seed, service_model=service_model, milp_time_limit_s=time_limit
        )
    except (WorkloadError, SimulationError, ChainsInfeasible, InfeasibleError) as error:
        raise SimulateUserError(str(error)) from None
    summary = result.summary()
    if as_json:
        print(json.dumps(_rounded(summary)))
        return
    console = Console()
    table = Table(title=f"{scenario.name}: {policy} ({summary['workload']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("policy", "scenario", "workload") or isinstance(value, dict):
            continue
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def experiment_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Study name (see --list).")] = "",
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default ./out/NAME).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few requests and seeds: a smoke run.")
    ] = False,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per point.")] = None,
    list_studies: Annotated[bool, typer.Option("--list", help="List the studies.")] = False,
) -> None:
    """Run a named study over policies and seeds; write a CSV, PNG plots and print a table."""
    from app.simulation.studies import STUDIES, run_study

    if list_studies or not name:
        for study in STUDIES.values():
            print(f"{study.name:12s} {study.description}")
        return
    if name not in STUDIES:
        _fail(f"NAME: unknown study {name!r} (choose from {', '.join(STUDIES)})")
    if seeds is not None and seeds < 1:
        _fail("--seeds: must be at least 1")
    folder = out if out is not None else Path("out") / name
    try:
        run_study(STUDIES[name], folder, quick=quick, seeds=seeds, console=Console(width=160))
    except (WorkloadError, SimulationError, InfeasibleError, ChainsInfeasible) as error:
        raise SimulateUserError(str(error)) from None


def register(cli: typer.Typer) -> None:
    cli.command("simulate")(simulate_command)
    cli.command("experiment")(experiment_command)
