import json
from pathlib import Path

import pytest

from app.cli import main
from tests.scenarios import CLUSTERED, scenario_dict


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_solve_json_is_exactly_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["solve", str(CLUSTERED), "-a", "cg", "--json", "-R", "10"], capsys)
    assert code == 0
    result = json.loads(out)
    assert set(result) == {
        "warnings",
        "algorithm",
        "concurrency",
        "placement",
        "objective_ms_per_token",
        "bound_ms_per_token",
        "optimal",
        "solve_seconds",
    }
    assert result["algorithm"] == "cg" and result["concurrency"] == 10
    assert result["optimal"] is None
    # m = floor(86.13 / (1.3234 + 10 x 57344 x 148 / 1e9)) = 61 blocks on the first A100
    assert result["placement"][0] == {"server": "a100-0", "start": 0, "end": 61}
    assert result["objective_ms_per_token"] == pytest.approx(400 + 70 * 3.2197)
    assert result["bound_ms_per_token"] >= result["objective_ms_per_token"] - 1e-9


def test_solve_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["solve", str(CLUSTERED), "-a", "cg", "-R", "5"], capsys)
    assert code == 0
    assert "a100-0" in out and "mean per-token time 625.379 ms" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["solve", "missing.json"], "cannot read scenario file"),
        (
            ["solve", str(CLUSTERED), "--algorithm", "magic"],
            "--algorithm: 'magic' is not one of auto,",
        ),
        (["solve", str(CLUSTERED), "--concurrency", "0"], "--concurrency: must be at least 1"),
        (["solve", str(CLUSTERED), "--concurrency", "x"], "--concurrency"),
        (["solve", str(CLUSTERED), "--time-limit", "-1"], "--time-limit"),
        (["solve", str(CLUSTERED), "-a", "cg", "-R", "5000"], "GB more GPU memory is missing"),
        (["solve"], "Missing argument"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_invalid_scenario_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = scenario_dict()
    data["servers"][1]["site"] = "nowhere"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code, _, err = run(["solve", str(path)], capsys)
    assert code == 2 and "servers[1].site" in err


def test_milp_without_a_solution_in_time_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.allocation import milp

    def no_solution(*args: object, **kwargs: object) -> None:
        raise milp.MilpNoSolutionError("no solution within the 0.1 s time limit")

    monkeypatch.setattr(milp, "solve_milp", no_solution)
    code, _, err = run(["solve", str(CLUSTERED), "-a", "milp", "--time-limit", "0.1"], capsys)
    assert code == 2
    assert err == "error: no solution within the 0.1 s time limit\n"


def test_solve_defaults_to_auto_and_explains_the_choice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["solve", str(CLUSTERED), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["algorithm"] == "auto" and result["dispatcher"] == "jffc"
    names = [c["name"] for c in result["candidates"]]
    assert result["candidate"] in names and "chains" in names and "petals" in names
    winner = next(c for c in result["candidates"] if c["name"] == result["candidate"])
    scores = [c["score_s"] for c in result["candidates"] if c["score_s"] is not None]
    assert winner["score_s"] == min(scores)
    assert result["chains"][0]["capacity"] >= 1 and result["chains"][0]["rate_per_s"] > 0


def test_solve_chains_prints_chains_rates_and_the_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["solve", str(CLUSTERED), "-a", "chains"], capsys)
    assert code == 0
    assert "chains (JFFC, fastest first)" in out
    assert "a100-0[0," in out and "cache reservation c =" in out
    assert "Theorem 4: mean response between" in out


def test_small_server_is_a_warning_not_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = scenario_dict()
    data["servers"].append({**data["servers"][0], "id": "tiny", "memory_gb": 1.05})
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    code, out, err = run(["solve", str(path), "--json"], capsys)
    assert code == 0
    assert err.startswith("warning: servers[2] (tiny)") and "left idle" in err
    assert "tiny" not in [p["server"] for p in json.loads(out)["placement"]]


@pytest.mark.parametrize(
    ("lengths", "field"),
    [
        ({"mean": -1, "p50": 1, "p90": 1, "p99": 1, "max": 1}, "workload.input_tokens.mean"),
        ({"mean": "nan", "p50": 1, "p90": 1, "p99": 1, "max": 1}, "workload.input_tokens.mean"),
        ({"mean": 1, "p50": 3, "p90": 2, "p99": 2, "max": 2}, "workload.input_tokens"),
    ],
)
def test_bad_profile_lengths_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lengths: dict[str, object], field: str
) -> None:
    data = scenario_dict()
    data["workload"] = {
        "arrival": "poisson",
        "rate_per_s": 1,
        "num_requests": 5,
        "input_tokens": lengths,
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data).replace('"nan"', "NaN"))
    for command in (["solve", str(path)], ["simulate", str(path)]):
        code, _, err = run(command, capsys)
        assert code == 2
        assert err.startswith("error: ") and field in err and err.count("\n") == 1


def test_shipped_table1_example_runs_with_its_bare_trace_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "table1-mig-9-code-trace.json"
    assert '"trace": "azure_llm_inference_trace_2023_code.csv"' in example.read_text()
    code, out, _ = run(["simulate", str(example), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["policy"] == "auto" and summary["requests"] == 1000
