"""Workloads (Poisson, Azure trace replay), the batching-aware model and the CLI commands."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from app.allocation.instance import Instance
from app.cli import main
from app.simulation import generators
from app.simulation.run import simulate
from app.simulation.service import BatchedServiceModel, load_decode_slowdown
from app.simulation.workload import (
    DATA_DIR,
    WorkloadError,
    poisson_workload,
    read_trace,
    scenario_workload,
    trace_workload,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json"
CODE_TRACE = DATA_DIR / "azure_llm_inference_trace_2023_code.csv"


def test_poisson_is_seeded_and_has_the_rate() -> None:
    scenario = generators.clustered()
    a = poisson_workload(scenario, 2.0, 4000, seed=3)
    b = poisson_workload(scenario, 2.0, 4000, seed=3)
    c = poisson_workload(scenario, 2.0, 4000, seed=4)
    assert a.arrival_ms.tobytes() == b.arrival_ms.tobytes()
    assert a.arrival_ms.tobytes() != c.arrival_ms.tobytes()
    assert (np.diff(a.arrival_ms) > 0).all()
    assert a.rate_per_s == pytest.approx(2.0, rel=0.06)
    assert set(a.output_tokens.tolist()) == {128}


def test_clients_drawn_by_share() -> None:
    scenario = generators.geo(num_clients=4)
    data = scenario.model_dump(exclude_none=True)
    data["clients"][0]["share"] = 5.0  # 5 / 8 of the requests
    from app.allocation.scenario import parse_scenario

    workload = poisson_workload(parse_scenario(data), 1.0, 8000, seed=1)
    assert (workload.client == 0).mean() == pytest.approx(5 / 8, abs=0.03)


def test_azure_trace_replay_caps_tokens_and_scales_time() -> None:
    arrival, inputs, outputs = read_trace(CODE_TRACE, limit=50)
    assert arrival[0] == 0.0 and (np.diff(arrival) >= 0).all() and arrival.size == 50
    assert inputs[0] == 4808 and outputs[0] == 10  # first row of the shipped trace
    scenario = generators.clustered()  # l_in <= 20, l_max <= 128
    workload = trace_workload(scenario, CODE_TRACE, time_scale=10.0, limit=50)
    assert workload.input_tokens.max() <= 20 and workload.output_tokens.max() <= 128
    assert workload.output_tokens.min() >= 1
    assert np.allclose(workload.arrival_ms, arrival * 10.0)


def test_trace_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"workload\.trace"):
        read_trace(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n1,2\n", encoding="utf-8")
    with pytest.raises(WorkloadError, match="GeneratedTokens"):
        read_trace(bad)


def test_trace_scenario_simulates_with_request_specific_lengths() -> None:
    data = generators.clustered().model_dump(exclude_none=True)
    data["workload"] = {"trace": CODE_TRACE.name, "time_scale": 20.0, "limit": 60}
    from app.allocation.scenario import parse_scenario

    scenario = parse_scenario(data)
    workload = scenario_workload(scenario)
    result = simulate(scenario, "cg-wsrr", workload=workload)
    assert result.requests == 60
    per_request = result.end_ms - result.start_ms
    # Shorter answers finish sooner: service time grows with the output tokens.
    order = np.argsort(workload.output_tokens)
    assert per_request[order[0]] < per_request[order[-1]]


def test_batched_model_slows_decode_with_the_batch() -> None:
    sizes, slowdown = load_decode_slowdown()
    assert slowdown[0] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(slowdown))
    model = BatchedServiceModel(Instance.from_scenario(generators.clustered()), sizes, slowdown)
    assert model.factor(1) == pytest.approx(1.0) and model.factor(100) > 1.5
    scenario = generators.clustered(64, 0.5, 80, 1)
    paper = simulate(scenario, "cg-wsrr").summary()
    batched = simulate(scenario, "cg-wsrr", service_model="batched").summary()
    assert float(batched["mean_ms_per_token"]) > float(paper["mean_ms_per_token"])


def test_cli_simulate_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["simulate", str(EXAMPLE), "--policy", "cg-wsrr", "--seed", "3", "--json"])
    first = json.loads(capsys.readouterr().out)
    for key in [
        "policy",
        "requests",
        "mean_ms_per_token",
        "mean_ttft_ms",
        "mean_e2e_ms",
        "p50_e2e_ms",
        "p95_e2e_ms",
        "p99_e2e_ms",
        "mean_wait_ms",
        "throughput_rps",
        "wall_seconds",
        "events",
    ]:
        assert key in first
    assert first["policy"] == "cg-wsrr" and first["requests"] == 100
    main(["simulate", str(EXAMPLE), "--policy", "cg-wsrr", "--seed", "3", "--json"])
    again = json.loads(capsys.readouterr().out)
    assert again["mean_ms_per_token"] == first["mean_ms_per_token"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", str(EXAMPLE), "--policy", "nope"], "--policy: 'nope' is not one of auto,"),
        (
            ["simulate", str(EXAMPLE), "--service-model", "x"],
            "--service-model: 'x' is not one of paper, batched",
        ),
        (["simulate", "/no/such.json"], "cannot read"),
        (["experiment", "nope"], "NAME: 'nope' is not one of clustered,"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_cli_experiment_quick_writes_csv_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["experiment", "lmax", "--quick", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "auto / petals" in out
    # Not a terminal: the table at full width (the header row whole on one line) ...
    header = next(line for line in out.splitlines() if "l_max (output tokens)" in line)
    assert "petals-rr" in header and "auto / petals" in header and len(header) > 80
    # ... and progress as one plain line per run on stderr, not a live bar drawn nowhere.
    progress = err.splitlines()
    assert len(progress) == 4 * 6
    assert progress[0].startswith("lmax [1/24] lmax=32 seed 1 petals (")
    assert progress[-1].startswith("lmax [24/24] lmax=256 seed 1 petals-rr (")
    with (tmp_path / "runs.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    policies = {"petals", "cg-sp", "cg-wsrr", "chains", "auto", "petals-rr"}
    assert len(rows) == 4 * len(policies)  # 4 l_max values x the policies x 1 seed
    assert {r["policy"] for r in rows} == policies
    assert all(float(r["mean_ms_per_token"]) > 0 for r in rows)
    png = (tmp_path / "lmax.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(list((tmp_path / "scenarios").glob("*.json"))) == 4


def test_cli_simulate_defaults_to_auto(capsys: pytest.CaptureFixture[str]) -> None:
    main(["simulate", str(EXAMPLE), "--seed", "3", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == "auto"
    assert summary["candidate"] in summary["candidate_scores"]
    assert summary["lower_bound_ms"] <= summary["upper_bound_ms"]
