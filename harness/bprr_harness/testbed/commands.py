"""``bprr testbed``: registered on the main CLI by ``register(cli)``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.allocation.scenario import ScenarioError, load_scenario


class TestbedUserError(ScenarioError):
    """A bad argument or a failed run: one ``error:`` line, exit status 2."""


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.1f} %"


def testbed_command(
    scenario_path: Annotated[
        Path | None, typer.Argument(metavar="SCENARIO", help="Scenario JSON file.")
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", "-p", help="cg, petals, or both (cg,petals).")
    ] = "cg",
    requests: Annotated[
        int | None, typer.Option("--requests", help="Requests to replay (the workload's first N).")
    ] = None,
    output_tokens: Annotated[
        int | None, typer.Option("--output-tokens", help="Output tokens per request.")
    ] = None,
    blocks: Annotated[
        int | None, typer.Option("--blocks", help="Scale the model to this many blocks.")
    ] = None,
    time_scale: Annotated[
        float, typer.Option("--time-scale", help="Multiply every time (RTT, speeds, overheads).")
    ] = 1.0,
    rate: Annotated[
        float | None, typer.Option("--rate", help="Arrival rate (req/s) after scaling.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Workload seed.")] = None,
    no_netns: Annotated[
        bool, typer.Option("--no-netns", help="Loopback only (same userspace delays).")
    ] = False,
    save_scenario: Annotated[
        Path | None,
        typer.Option("--save-scenario", help="Write the scaled scenario (for bprr simulate)."),
    ] = None,
    no_simulator: Annotated[
        bool, typer.Option("--no-simulator", help="Skip the simulator's run beside it.")
    ] = False,
    cleanup: Annotated[
        bool,
        typer.Option("--cleanup", help="Delete every leftover bprr-tb-* namespace and exit."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="emulated (random-weight block servers behind delaying relays) or petals "
            "(real PETALS 2.2 servers of a tiny model, steered by the coordinator; needs "
            "`make petals`).",
        ),
    ] = "emulated",
    petals_python: Annotated[
        Path | None,
        typer.Option("--petals-python", help="The PETALS interpreter (.venv-petals/bin/python)."),
    ] = None,
) -> None:
    """Run the scenario on an emulated geo-distributed testbed (one network namespace per
    site, delays on the path, real random-weight block servers, clients relaying activations)
    and compare every request's first-token and per-token time with the performance model."""
    from bprr_harness.testbed import netns

    if cleanup:
        reason = netns.unavailable_reason()
        deleted = [] if reason else netns.cleanup()
        print(json.dumps({"deleted": deleted}) if as_json else f"deleted: {deleted or 'nothing'}")
        return
    if scenario_path is None:
        raise TestbedUserError("SCENARIO: give a scenario file (or --cleanup)")
    policies = ("cg", "petals") if policy in ("both", "cg,petals") else (policy,)
    for p in policies:
        if p not in ("cg", "petals"):
            raise TestbedUserError(f"--policy: {policy!r} is not cg, petals or both")
    if requests is not None and requests < 1:
        raise TestbedUserError("--requests: must be at least 1")
    if rate is not None and not rate > 0:
        raise TestbedUserError("--rate: must be positive")
    from bprr_harness.testbed.report import policy_report, predictions, simulator_metrics
    from bprr_harness.testbed.runner import Testbed, TestbedError, TestbedOptions
    from bprr_harness.testbed.scale import scale_scenario

    scenario = scale_scenario(
        load_scenario(scenario_path),
        blocks=blocks,
        time_scale=time_scale,
        output_tokens=output_tokens,
        requests=requests,
        rate_per_s=rate,
        seed=seed,
    )
    if scenario.workload is None:
        raise TestbedUserError("workload: the scenario has none; give --rate to replay one")
    if save_scenario is not None:
        save_scenario.write_text(scenario.model_dump_json(indent=2, exclude_none=True))
    if backend not in ("emulated", "petals"):
        raise TestbedUserError(f"--backend: {backend!r} is not emulated or petals")
    if backend == "petals":
        _run_petals(scenario, policies, petals_python, seed, as_json)
        return
    options = TestbedOptions(policies=policies, use_netns=not no_netns, seed=seed)
    try:
        result = Testbed(scenario, options).run()
    except TestbedError as error:
        raise TestbedUserError(str(error)) from None
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "mode": result.mode,
        "mode_note": result.mode_note,
        "run_id": result.run_id,
        "measured_speeds": result.measured_speeds,
        "policies": {},
    }
    for run in result.runs:
        entry = policy_report(run.placement, predictions(result, run), run.errors)
        if not no_simulator:
            entry["simulator"] = simulator_metrics(scenario, run.policy, seed)
        report["policies"][run.policy] = entry
    if as_json:
        print(json.dumps(report))
        return
    print_report(report)


def _run_petals(
    scenario: Any, policies: tuple[str, ...], python: Path | None, seed: int | None, as_json: bool
) -> None:
    from bprr_harness.testbed.petals_backend import (
        DEFAULT_PETALS_PYTHON,
        PetalsTestbed,
        PetalsTestbedError,
        petals_predictions,
    )
    from bprr_harness.testbed.report import policy_report

    try:
        testbed = PetalsTestbed(scenario, policies, python or DEFAULT_PETALS_PYTHON, seed or 0)
        result = testbed.run()
    except PetalsTestbedError as error:
        raise TestbedUserError(str(error)) from None
    report: dict[str, Any] = {
        "scenario": scenario.name,
        "mode": "petals",
        "mode_note": "real PETALS 2.2 servers on 127.0.0.1; each hop's traffic delayed by the "
        "client-server RTT in the PETALS client; requests one at a time",
        "timings_s": result.timings_s,
        "policies": {},
    }
    for run in result.runs:
        entry = policy_report(run.placement, petals_predictions(result, run), [])
        report["policies"][run.policy] = {**entry, "measured_speeds": run.speeds}
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)


def print_report(report: dict[str, Any]) -> None:
    console = Console()
    console.print(f"mode: {report['mode']} ({report['mode_note']})")
    table = Table(title=f"{report['scenario']}: measured vs predicted (perf.request_timing)")
    for column in (
        "policy",
        "requests",
        "first token ms (pred)",
        "err mean",
        "err worst",
        "per token ms (pred)",
        "err mean",
        "err worst",
    ):
        table.add_column(column, justify="right")
    for name, entry in report["policies"].items():
        e = entry["errors"]
        if not e:
            table.add_row(name, "0", "-", "-", "-", "-", "-", "-")
            continue
        table.add_row(
            name,
            str(int(e["requests"])),
            f"{e['mean_first_token_ms']:.1f} ({e['mean_predicted_first_token_ms']:.1f})",
            _pct(e["first_token_mean_abs_error"]),
            _pct(e["first_token_worst_abs_error"]),
            f"{e['mean_per_token_ms']:.2f} ({e['mean_predicted_per_token_ms']:.2f})",
            _pct(e["per_token_mean_abs_error"]),
            _pct(e["per_token_worst_abs_error"]),
        )
    console.print(table)
    side = Table(title="testbed vs simulator (same scenario, same workload), ms")
    for column in ("policy", "metric", "testbed", "simulator"):
        side.add_column(column, justify="right")
    for name, entry in report["policies"].items():
        sim = entry.get("simulator", {})
        for metric, value in entry["testbed"].items():
            shown = sim.get(metric)
            side.add_row(name, metric, f"{value:.2f}", "-" if shown is None else f"{shown:.2f}")
    console.print(side)
    for name, entry in report["policies"].items():
        for failure in entry["failed_requests"]:
            console.print(f"{name}: failed: {failure}")


def register(cli: typer.Typer) -> None:
    cli.command("testbed")(testbed_command)
