"""``bprr simulate`` and ``bprr experiment``: registered on the main CLI by ``register(cli)``."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.allocation.cg import InfeasibleError
from app.allocation.chains import ChainsInfeasible
from app.allocation.scenario import ScenarioError, load_scenario
from app.cli_style import output_console, progress_console
from app.simulation.engine import SimulationError
from app.simulation.workload import WorkloadError

JSON_DIGITS = 6


class Policy(enum.StrEnum):
    """``bprr simulate --policy``: the values of app.simulation.policies.POLICIES."""

    auto = "auto"
    chains = "chains"
    cg_wsrr_profile = "cg-wsrr-profile"
    petals = "petals"
    cg_sp = "cg-sp"
    cg_wsrr = "cg-wsrr"
    milp_wsrr = "milp-wsrr"
    petals_order = "petals-order"
    petals_number = "petals-number"
    petals_rr = "petals-rr"


class ServiceModel(enum.StrEnum):
    """``--service-model``: the values of app.simulation.service.SERVICE_MODELS."""

    paper = "paper"
    batched = "batched"


class StudyName(enum.StrEnum):
    """``bprr experiment NAME``: the keys of app.simulation.studies.STUDIES."""

    clustered = "clustered"
    rate = "rate"
    servers = "servers"
    a100 = "a100"
    lmax = "lmax"
    geo = "geo"
    scale = "scale"
    table1 = "table1"


class SimulateUserError(ScenarioError):
    """A bad argument: the CLI reports it as one ``error:`` line, exit status 2."""


def _fail(message: str) -> None:
    raise SimulateUserError(message)


def _rounded(summary: dict[str, object]) -> dict[str, object]:
    return {k: round(v, JSON_DIGITS) if isinstance(v, float) else v for k, v in summary.items()}


def simulate_command(
    scenario_path: Annotated[Path, typer.Argument(metavar="SCENARIO", help="Scenario JSON file.")],
    policy: Annotated[
        Policy,
        typer.Option(
            "--policy",
            "-p",
            help="Placement and dispatch policy: auto (best candidate for the workload), chains "
            "(GBP-CR + GCA + JFFC), cg-sp / cg-wsrr / milp-wsrr (the paper's), petals and its "
            "ablations.",
        ),
    ] = Policy.auto,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Override the workload's seed.")
    ] = None,
    service_model: Annotated[
        ServiceModel,
        typer.Option(
            "--service-model",
            help="paper (per-token time independent of concurrency) or batched (decode slowed "
            "by the batch size, from the shipped decode profile).",
        ),
    ] = ServiceModel.paper,
    time_limit: Annotated[
        float, typer.Option("--time-limit", help="MILP time limit (milp-wsrr), seconds.")
    ] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Simulate the scenario's workload under one policy and summarise the requests' times."""
    from app.simulation.run import simulate

    if time_limit <= 0:
        _fail("--time-limit: must be positive")
    scenario = load_scenario(scenario_path)
    for warning in scenario.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    try:
        result = simulate(
            scenario,
            policy.value,
            seed,
            service_model=service_model.value,
            milp_time_limit_s=time_limit,
        )
    except (WorkloadError, SimulationError, ChainsInfeasible, InfeasibleError) as error:
        raise SimulateUserError(str(error)) from None
    summary = result.summary()
    if as_json:
        print(json.dumps(_rounded(summary)))
        return
    console = output_console()
    table = Table(title=f"{scenario.name}: {policy.value} ({summary['workload']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("policy", "scenario", "workload") or isinstance(value, dict):
            continue
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def experiment_command(
    name: Annotated[
        StudyName | None, typer.Argument(metavar="NAME", help="Study name (see --list).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default ./out/NAME).")
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Few requests, one seed: a smoke run (its plot says so; not a result)."
        ),
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option("--seeds", help="Seeds per point (default: the study's; 1 with --quick)."),
    ] = None,
    list_studies: Annotated[
        bool, typer.Option("--list", help="List the studies and exit.")
    ] = False,
) -> None:
    """Run a named study over policies and seeds; write a CSV, PNG plots and print a table."""
    from app.simulation.studies import STUDIES, run_study

    if list_studies or name is None:
        for study in STUDIES.values():
            print(f"{study.name:12s} {study.description}")
        return
    if seeds is not None and seeds < 1:
        _fail("--seeds: must be at least 1")
    folder = out if out is not None else Path("out") / name.value
    try:
        run_study(
            STUDIES[name.value],
            folder,
            quick=quick,
            seeds=seeds,
            console=output_console(),
            progress_console=progress_console(),
        )
    except (WorkloadError, SimulationError, InfeasibleError, ChainsInfeasible) as error:
        raise SimulateUserError(str(error)) from None


def register(cli: typer.Typer) -> None:
    cli.command("simulate")(simulate_command)
    cli.command("experiment")(experiment_command)
