"""The what-if round trip the README promises (issue 13 point 5):

    curl /v1/scenario > live.json && bprr solve live.json && bprr simulate live.json

A coordinator (in process, injected clock) loads the shipped 9-server example (with its
declared load of 0.5 req/s, as the demo does), clients book sessions with varied token counts
(24 bookings in 12 s: a measured 2 req/s), the coordinator re-plans, and its export is fed to
the real CLI. What must hold:
- the export carries the measured workload (rate and length distributions), not the caps;
- the export is exactly the scenario the planner solved (the generation's recorded inputs);
- ``bprr solve live.json`` (its default algorithm, as the coordinator's) gives the live
  generation: same algorithm, same design concurrency |R|, same spans, same chains, the same
  workload profile; ``bprr solve live.json -a cg`` gives a cg generation's spans and |R|;
- before any booking was measured, the export carries the load the planner planned for
  (the declared one), so the round trip holds from the first generation on;
- ``bprr simulate live.json`` runs the export's workload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.allocation import cg
from app.allocation.instance import Instance
from app.allocation.scenario import parse_scenario
from app.allocation.workload import LengthStats, WorkloadProfile
from app.api.app import create_app
from app.service.workload_window import DEFAULT_WINDOW_S
from app.settings import Settings
from app.store import repositories as repo
from tests.api.conftest import ROOT, FakeClock, admin, make_settings

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "paper-clustered-9.json"
DECLARED_RATE = 0.5  # the example's Poisson workload
# Varied lengths within the example's caps (20 input, 128 output tokens).
INPUTS = [2 + (7 * i) % 19 for i in range(24)]
OUTPUTS = [8 * (1 + (5 * i) % 16) for i in range(24)]
STEP_S = 0.5
MEASURED_RATE = len(INPUTS) / (len(INPUTS) * STEP_S)  # 2.0 req/s
CLI_TIMEOUT_S = 300


@dataclass
class Generation:
    """A published placement as GET /v1/placements/current shows it, with the chains and
    dispatcher stored beside it."""

    out: dict[str, Any]
    chains: list[dict[str, Any]] | None
    dispatcher: str | None

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        return {s["server_id"]: (s["start"], s["end"]) for s in self.out["spans"]}


@dataclass
class Live:
    folder: Path
    declared: Generation  # planned at the scenario load, before any booking
    declared_export: dict[str, Any]
    cg: Generation  # POST /v1/placements {"algorithm": "cg"} after the bookings
    generation: Generation  # POST /v1/placements with the coordinator's defaults, last
    export: dict[str, Any]  # GET /v1/scenario after it (same clock: the same load)
    cli_runs: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.folder / name
        path.write_text(json.dumps(data))
        return path

    def bprr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``bprr ARGS`` as a user runs it (a subprocess of the installed CLI), once."""
        if args not in self.cli_runs:
            self.cli_runs[args] = subprocess.run(
                [sys.executable, "-m", "app.cli", *args],
                cwd=self.folder,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
            )
        return self.cli_runs[args]

    def solve_json(self, scenario: Path, *args: str) -> dict[str, Any]:
        done = self.bprr("solve", str(scenario), "--json", *args)
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data


def current(client: TestClient) -> Generation:
    reply = client.get("/v1/placements/current")
    assert reply.status_code == 200, reply.text
    service = client.app.state.coordinator  # type: ignore[attr-defined]
    with service.core.read_tx() as db:
        row = repo.Placements(db).current()
        assert row is not None
        chains = json.loads(row.chains) if row.chains else None
        return Generation(reply.json(), chains, row.dispatcher)


def export(client: TestClient) -> dict[str, Any]:
    reply = client.get("/v1/scenario")
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


@contextmanager
def coordinator(folder: Path) -> Iterator[tuple[TestClient, FakeClock]]:
    """A coordinator on SQLite in ``folder`` with the example loaded (servers online)."""
    clock = FakeClock()
    # The product's default planner algorithm (tests/api's settings pin cg for older tests).
    default_algorithm = Settings.model_fields["planner_algorithm"].default
    settings = make_settings(f"sqlite:///{folder / 'bprr.db'}", planner_algorithm=default_algorithm)
    app = create_app(settings, clock=clock, background=False)
    with TestClient(app) as client:
        scenario = json.loads(EXAMPLE.read_text())
        assert scenario["workload"]["rate_per_s"] == DECLARED_RATE
        loaded = client.post(
            "/v1/scenario", json=scenario, params={"lease_s": 3600}, headers=admin()
        )
        assert loaded.status_code == 201, loaded.text
        yield client, clock


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("replay")
    with coordinator(folder) as (client, clock):
        declared, declared_export = current(client), export(client)
        for inputs, outputs in zip(INPUTS, OUTPUTS, strict=True):
            body = {"client_site": "cluster0", "input_tokens": inputs, "output_tokens": outputs}
            booked = client.post("/v1/sessions", json=body)
            assert booked.status_code == 201, booked.text
            clock.advance(STEP_S)
        placed = client.post("/v1/placements", json={"algorithm": "cg"}, headers=admin())
        assert placed.status_code == 201, placed.text
        cg_generation = current(client)
        placed = client.post("/v1/placements", headers=admin())
        assert placed.status_code == 201, placed.text
        yield Live(
            folder,
            declared,
            declared_export,
            cg_generation,
            current(client),
            export(client),
        )


def profile_json(profile: WorkloadProfile) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(profile.to_json()))
    return data


def assert_same_stats(exported: LengthStats, expected: LengthStats) -> None:
    for name in ("mean", "p50", "p90", "p99", "max"):
        assert getattr(exported, name) == pytest.approx(getattr(expected, name), abs=1e-5), name


def test_the_export_carries_the_measured_workload(live: Live) -> None:
    workload = live.export.get("workload")
    assert workload is not None, "GET /v1/scenario has no workload: bprr solve plans |R| = 1"
    assert workload["arrival"] == "poisson"
    assert workload["rate_per_s"] == pytest.approx(MEASURED_RATE)
    assert workload["num_requests"] == round(MEASURED_RATE * DEFAULT_WINDOW_S)
    profile = WorkloadProfile.from_scenario(parse_scenario(live.export))
    expected = WorkloadProfile.from_samples(MEASURED_RATE, INPUTS, OUTPUTS)
    assert profile.rate_per_s == pytest.approx(MEASURED_RATE)
    assert_same_stats(profile.input_tokens, expected.input_tokens)
    assert_same_stats(profile.output_tokens, expected.output_tokens)
    # The lengths are the bookings', not the caps (20 in, 128 out).
    assert profile.input_tokens.mean < 20 and profile.output_tokens.mean < 128


def test_the_export_is_the_scenario_the_planner_solved(live: Live) -> None:
    assert live.generation.out["reason"] == "requested by the operator"
    planned = parse_scenario(live.generation.out["inputs"])
    assert parse_scenario(live.export) == planned


def test_solve_on_the_export_gives_the_live_generation(live: Live) -> None:
    solved = live.solve_json(live.write("live.json", live.export))
    generation = live.generation
    assert solved["algorithm"] == generation.out["algorithm"]
    spans = {p["server"]: (p["start"], p["end"]) for p in solved["placement"]}
    assert spans == generation.spans
    # A chain plan: the same chains (fastest first) and dispatcher as the coordinator stored.
    assert solved.get("dispatcher", "wsrr") == (generation.dispatcher or "wsrr")
    solved_chains = [(c["hops"], c["capacity"]) for c in solved.get("chains", [])]
    stored_chains = [(c["hops"], c["capacity"]) for c in generation.chains or []]
    assert solved_chains == stored_chains
    # Planned for the exported (measured) profile, the one the coordinator planned for.
    if "profile" in solved:
        measured = WorkloadProfile.from_scenario(parse_scenario(live.export))
        assert solved["profile"] == profile_json(measured)


def test_solve_plans_for_the_measured_concurrency(live: Live) -> None:
    """|R| from the measured rate, as the export says; not 1 (the caps and no workload), and
    the same |R| the coordinator planned the live generation for."""
    solved = live.solve_json(live.write("live.json", live.export))
    instance = Instance.from_scenario(parse_scenario(live.export))
    expected = cg.design_concurrency(instance, MEASURED_RATE)
    assert expected > 1
    assert solved["concurrency"] == expected
    assert live.generation.out["concurrency"] == expected


def test_solve_with_cg_gives_the_cg_generation(live: Live) -> None:
    """The same load exported (the clock did not move) gives a cg generation's spans back."""
    solved = live.solve_json(live.write("live.json", live.export), "--algorithm", "cg")
    assert solved["algorithm"] == live.cg.out["algorithm"] == "cg"
    assert solved["concurrency"] == live.cg.out["concurrency"]
    spans = {p["server"]: (p["start"], p["end"]) for p in solved["placement"]}
    assert spans == live.cg.spans


def test_before_any_booking_the_export_carries_the_load_planned_for(live: Live) -> None:
    """At the scenario load the planner planned for the declared 0.5 req/s; an export taken
    then must say so, or ``bprr solve`` plans for a different load than the live one."""
    workload = live.declared_export.get("workload")
    assert workload is not None, "the export drops the declared load the planner used"
    assert workload["rate_per_s"] == pytest.approx(DECLARED_RATE)
    solved = live.solve_json(live.write("declared.json", live.declared_export))
    assert solved["algorithm"] == live.declared.out["algorithm"]
    assert solved["concurrency"] == live.declared.out["concurrency"]
    spans = {p["server"]: (p["start"], p["end"]) for p in solved["placement"]}
    assert spans == live.declared.spans


def test_with_nothing_measured_a_replan_keeps_the_declared_load(tmp_path: Path) -> None:
    """The coordinator itself: a re-plan before any booking plans for the same declared
    0.5 req/s as the scenario load did (not for the caps at 1 req/s), so it finds the same
    placement."""
    with coordinator(tmp_path) as (client, _):
        declared = current(client)
        placed = client.post("/v1/placements", headers=admin())
        assert placed.status_code == 201, placed.text
        replan = current(client)
    assert replan.out["generation"] == declared.out["generation"] + 1
    assert replan.out["algorithm"] == declared.out["algorithm"]
    assert replan.out["concurrency"] == declared.out["concurrency"]
    assert replan.spans == declared.spans
    planned = parse_scenario(replan.out["inputs"])
    assert WorkloadProfile.from_scenario(planned).rate_per_s == pytest.approx(DECLARED_RATE)


def test_simulate_runs_the_exported_workload(live: Live) -> None:
    path = live.write("live.json", live.export)
    done = live.bprr("simulate", str(path), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    requests = round(MEASURED_RATE * DEFAULT_WINDOW_S)
    assert summary["scenario"] == "live"
    assert summary["requests"] == requests
    assert summary["workload"].startswith(f"poisson rate {MEASURED_RATE:g}/s, {requests} requests")
    assert summary["policy"] == "auto"
    for key in ("mean_e2e_ms", "mean_ttft_ms", "mean_ms_per_token", "throughput_rps"):
        assert summary[key] > 0, key
