"""WorkloadProfile: constructors, validation naming the field, JSON, sampling, traces."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.allocation.scenario import ScenarioError, load_scenario, parse_scenario
from app.allocation.workload import LengthStats, WorkloadProfile
from tests.scenarios import scenario_dict

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "app" / "data" / "azure_llm_inference_trace_2023_code.csv"


def test_from_samples_hand_computed() -> None:
    profile = WorkloadProfile.from_samples(2.0, [10, 20, 30, 40], [1, 1, 1, 5])
    assert profile.rate_per_s == 2.0
    assert profile.input_tokens.mean == 25.0
    assert profile.input_tokens.p50 == 25.0
    assert profile.input_tokens.max == 40.0
    assert profile.output_tokens.mean == 2.0
    assert profile.mean_tokens == 27.0
    assert profile.design_tokens() == 27


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"mean": -1, "p50": 1, "p90": 1, "p99": 1, "max": 1}, "input_tokens.mean"),
        ({"mean": math.nan, "p50": 1, "p90": 1, "p99": 1, "max": 1}, "input_tokens.mean"),
        ({"mean": 1, "p50": math.inf, "p90": 1, "p99": 1, "max": 1}, "input_tokens.p50"),
        ({"mean": 1, "p50": 1, "p90": 1, "p99": 1}, "input_tokens.max"),
        ({"mean": 1, "p50": 5, "p90": 1, "p99": 1, "max": 9}, "input_tokens"),
        ({"mean": 1, "p50": "x", "p90": 1, "p99": 1, "max": 9}, "input_tokens.p50"),
    ],
)
def test_bad_lengths_name_the_field(data: dict[str, object], field: str) -> None:
    good = {"mean": 1, "p50": 1, "p90": 1, "p99": 1, "max": 1}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        WorkloadProfile.from_json({"rate_per_s": 1, "input_tokens": data, "output_tokens": good})


def test_bad_rate_and_samples() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        WorkloadProfile.from_samples(-1.0, [1], [1])
    with pytest.raises(ValueError, match="input_tokens"):
        WorkloadProfile.from_samples(1.0, [1, math.nan], [1])
    with pytest.raises(ValueError, match="output_tokens"):
        WorkloadProfile.from_samples(1.0, [1], [-3])


def test_json_round_trip_and_scenario_fields() -> None:
    profile = WorkloadProfile.from_samples(0.5, [100, 200, 300], [10, 20, 90])
    data = profile.to_json()
    again = WorkloadProfile.from_json(json.loads(json.dumps(data)))
    assert again.input_tokens.mean == pytest.approx(profile.input_tokens.mean)
    assert again.output_tokens.p99 == pytest.approx(profile.output_tokens.p99)
    # The same fields are the optional scenario fields of a Poisson workload.
    raw = scenario_dict(input_tokens=1000, output_tokens=100)
    raw["workload"] = {"arrival": "poisson", "num_requests": 10, **data}
    scenario = parse_scenario(raw)
    from_scenario = WorkloadProfile.from_scenario(scenario)
    assert from_scenario.input_tokens.mean == pytest.approx(200.0)
    assert from_scenario.output_tokens.max == pytest.approx(90.0)


def test_scenario_rejects_bad_length_fields() -> None:
    raw = scenario_dict()
    bad = {"mean": -5, "p50": 1, "p90": 2, "p99": 3, "max": 4}
    raw["workload"] = {
        "arrival": "poisson",
        "rate_per_s": 1,
        "num_requests": 5,
        "output_tokens": bad,
    }
    with pytest.raises(ScenarioError, match=r"workload\.output_tokens\.mean"):
        parse_scenario(raw)


def test_poisson_without_lengths_uses_the_caps() -> None:
    raw = scenario_dict(input_tokens=30, output_tokens=7)
    raw["workload"] = {"arrival": "poisson", "rate_per_s": 2, "num_requests": 5}
    profile = WorkloadProfile.from_scenario(parse_scenario(raw))
    assert profile.input_tokens == LengthStats.constant(30)
    assert profile.output_tokens == LengthStats.constant(7)
    assert profile.rate_per_s == 2


def test_lengths_are_capped_at_the_caps() -> None:
    raw = scenario_dict(input_tokens=100, output_tokens=10)
    lengths = {"mean": 50, "p50": 40, "p90": 90, "p99": 150, "max": 400}
    raw["workload"] = {
        "arrival": "poisson",
        "rate_per_s": 1,
        "num_requests": 5,
        "input_tokens": lengths,
        "output_tokens": lengths,
    }
    profile = WorkloadProfile.from_scenario(parse_scenario(raw))
    assert profile.input_tokens.max == 100 and profile.input_tokens.mean == 50
    assert profile.output_tokens.mean == 10 and profile.output_tokens.p50 == 10


def test_quantile_function_matches_the_stats() -> None:
    stats = LengthStats(mean=2200, p50=1500, p90=4000, p99=7000, max=8000)
    knots = stats.knots()
    assert list(knots[1:]) == [1500, 4000, 7000, 8000]
    draws = stats.quantile(np.random.default_rng(1).random(200_000))
    assert float(np.median(draws)) == pytest.approx(1500, rel=0.02)
    assert float(np.percentile(draws, 90)) == pytest.approx(4000, rel=0.02)
    # The mean is reachable here (q0 within [0, p50]), so the draws keep it.
    assert float(draws.mean()) == pytest.approx(2200, rel=0.02)


def test_trace_profile_is_measured_and_capped() -> None:
    raw = scenario_dict(input_tokens=3712, output_tokens=256)
    raw["workload"] = {"trace": str(TRACE), "limit": 1000, "time_scale": 2.0}
    profile = WorkloadProfile.from_scenario(parse_scenario(raw))
    assert 1000 < profile.input_tokens.mean < 3712
    assert profile.input_tokens.max == 3712
    assert 1 <= profile.output_tokens.mean < 256
    assert profile.rate_per_s > 0


def test_bare_trace_name_resolves_to_the_shipped_copy(tmp_path: Path) -> None:
    raw = scenario_dict()
    raw["workload"] = {"trace": TRACE.name, "limit": 50}
    path = tmp_path / "elsewhere" / "scenario.json"
    path.parent.mkdir()
    path.write_text(json.dumps(raw), encoding="utf-8")
    scenario = load_scenario(path)
    assert Path(scenario.workload.trace) == TRACE  # type: ignore[union-attr]
    # A copy next to the scenario file wins over the shipped one.
    shutil.copy(TRACE, path.parent / TRACE.name)
    scenario = load_scenario(path)
    assert Path(scenario.workload.trace) == path.parent / TRACE.name  # type: ignore[union-attr]
