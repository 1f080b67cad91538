import json
import math
from pathlib import Path

import pytest

from app.allocation.scenario import (
    ScenarioError,
    TraceWorkload,
    largest_remainder,
    load_scenario,
    parse_scenario,
)
from tests.scenarios import CLUSTERED, scenario_dict, server


def test_clustered_example_loads_with_paper_numbers() -> None:
    scenario = load_scenario(CLUSTERED)
    assert scenario.model.num_blocks == 70
    assert [s.memory_gb for s in scenario.servers].count(86.13) == 2
    assert [s.memory_gb for s in scenario.servers].count(9.1) == 7
    # s_c = 57344 bytes x (20 + 128) tokens
    assert scenario.cache_gb_per_block == pytest.approx(57344 * 148 / 1e9)
    assert scenario.overheads.per_request_ms == 70


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("servers.0.memory_gb", -5, "servers[0].memory_gb"),
        ("servers.1.site", "mars", "servers[1].site"),
        ("clients.0.site", "mars", "clients[0].site"),
        ("servers.0.decode_ms_per_block", 0, "servers[0].decode_ms_per_block"),
        ("model.num_blocks", 0, "model.num_blocks"),
        ("requests.max_output_tokens", 0, "requests.max_output_tokens"),
        ("clients.0.share", -1, "clients[0].share"),
        ("servers.1.id", "s0", "servers[1].id"),
        ("site_rtt_ms", [[1, 2], [3]], "site_rtt_ms[1]"),
        ("site_rtt_ms", [[1, 2]], "site_rtt_ms"),
        ("site_rtt_ms", [[1, -2], [2, 1]], "site_rtt_ms"),
        ("sites", ["a", "a"], "sites[1]"),
    ],
)
def test_bad_fields_are_named(path: str, value: object, field: str) -> None:
    from tests.scenarios import modified

    with pytest.raises(ScenarioError) as caught:
        parse_scenario(modified(scenario_dict(), path, value))
    assert field in str(caught.value)


def test_server_that_cannot_hold_one_block_is_accepted_with_a_warning() -> None:
    data = scenario_dict(servers=[server("s0", "a", memory=1.05, decode=1.0)])
    scenario = parse_scenario(data)  # a small GPU joining must never stop planning
    assert scenario.too_small_servers() == [0]
    (warning,) = scenario.warnings()
    assert "servers[0] (s0)" in warning and "1.1000 GB needed" in warning


def test_nan_rtt_is_rejected() -> None:
    data = scenario_dict(site_rtt=[[1.0, math.nan], [3.0, 1.0]])
    with pytest.raises(ScenarioError, match="site_rtt_ms"):
        parse_scenario(data)


def test_object_form_rtt_is_symmetric_and_diagonal_defaults_to_zero() -> None:
    data = scenario_dict(
        sites=["a", "b", "c"], site_rtt={"a": {"b": 12.5, "a": 1}, "c": {"a": 7, "b": 3}}
    )
    scenario = parse_scenario(data)
    assert scenario.site_matrix() == [[1.0, 12.5, 7.0], [12.5, 0.0, 3.0], [7.0, 3.0, 0.0]]


def test_object_form_missing_pair_is_named() -> None:
    data = scenario_dict(sites=["a", "b", "c"], site_rtt={"a": {"b": 12.5}})
    with pytest.raises(ScenarioError, match=r"site_rtt_ms\.a\.c: missing RTT"):
        parse_scenario(data)


def test_pair_override_by_id_wins_over_site_matrix() -> None:
    data = scenario_dict()
    data["rtt_ms"] = {"c0": {"s1": 3.5}}
    scenario = parse_scenario(data)
    assert scenario.client_server_rtt() == [[10.0, 3.5]]
    data["rtt_ms"] = {"s1": {"nobody": 3.5}}
    with pytest.raises(ScenarioError, match="unknown server or client id 'nobody'"):
        parse_scenario(data)


def test_workload_forms_and_relative_trace_path(tmp_path: Path) -> None:
    data = scenario_dict()
    data["workload"] = {"trace": "traces/t.csv", "time_scale": 2.0}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    scenario = load_scenario(path)
    assert isinstance(scenario.workload, TraceWorkload)
    assert scenario.workload.trace == str(tmp_path / "traces" / "t.csv")
    data["workload"] = {"arrival": "poisson", "rate_per_s": -1, "num_requests": 5}
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(data)
    # the Poisson form was meant: no complaint about the trace form's fields
    assert str(caught.value) == "workload.rate_per_s: Input should be greater than 0"
    data["site_rtt_ms"] = [[1, -2], [2, 1]]
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(data)
    assert "valid dictionary" not in str(caught.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ScenarioError, match="JSON object"):
        load_scenario(bad)


def test_largest_remainder_split() -> None:
    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]
    assert largest_remainder([1, 1, 1], 2) == [1, 1, 0]  # ties go to the earlier client
    assert sum(largest_remainder([0.1, 0.7, 0.2], 13)) == 13


def test_petals_defaults_follow_the_contract() -> None:
    scenario = load_scenario(CLUSTERED)
    assert scenario.model.effective_hidden_size == 14336
    assert scenario.model.effective_petals_cache_tokens == 4096
    gqa = scenario_dict()
    gqa["model"]["hidden_size"] = 8192
    gqa["model"]["kv_bytes_per_token_per_block"] = 4096
    assert parse_scenario(gqa).model.effective_petals_cache_tokens == 16384
