"""The demo's simulated servers: RTTs from the scenario, a span host that loads after a
delay, and the agents built from a scenario."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from bprr_client import Span
from bprr_harness.demo.swarm import (
    ScenarioProber,
    SimulatedHost,
    make_agents,
    server_address,
    site_address,
)

from app.allocation.scenario import load_scenario, parse_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json"


def test_the_prober_answers_the_scenarios_site_matrix() -> None:
    scenario = load_scenario(EXAMPLE)
    probe = ScenarioProber(scenario, "a100-0")  # cluster1
    assert probe(server_address("a100-1")) == 5  # same cluster
    assert probe(server_address("mig-3")) == 100  # cluster2
    assert probe(site_address("cluster0")) == 100
    assert probe(site_address("cluster1")) == 5
    assert probe("example.org:80") is None
    assert probe(site_address("nowhere")) is None


def test_the_prober_applies_pair_overrides_and_jitter() -> None:
    raw = load_scenario(EXAMPLE).model_dump(mode="json", exclude_none=True)
    raw["rtt_ms"] = {"a100-0": {"mig-0": 42.0}}
    scenario = parse_scenario(raw)
    assert ScenarioProber(scenario, "mig-0")(server_address("a100-0")) == 42.0
    assert ScenarioProber(scenario, "mig-1")(server_address("a100-0")) == 100
    jittery = ScenarioProber(scenario, "a100-0", jitter=0.1, rng=random.Random(1))
    samples = [jittery(server_address("mig-1")) for _ in range(200)]
    assert all(s is not None and 90 <= s <= 110 for s in samples)
    assert len({round(s or 0, 6) for s in samples}) > 100
    with pytest.raises(ValueError, match="own_id"):
        ScenarioProber(scenario, "nobody")


def test_the_host_loads_a_span_after_its_delay() -> None:
    now = [100.0]
    host = SimulatedHost(load_s_per_block=0.1, max_load_s=3.0, speed=2.0, clock=lambda: now[0])
    span = Span(start=0, end=10)
    assert host.load_time_s(span) == pytest.approx(0.5)  # 10 x 0.1 s, twice as fast
    assert host.load_time_s(Span(start=0, end=70)) == pytest.approx(1.5)  # capped at 3 s / 2
    host.apply(span)
    assert host.loaded_span() is None
    now[0] += 0.49
    assert host.loaded_span() is None
    now[0] += 0.02
    assert host.loaded_span() == span
    host.apply(Span(start=10, end=20))  # a reload: nothing is served meanwhile
    assert host.loaded_span() is None
    now[0] += 0.6
    assert host.loaded_span() == Span(start=10, end=20)
    host.apply(None)
    assert host.loaded_span() is None
    assert host.loads == 2
    host.close()
    assert host.closed


def test_one_agent_per_scenario_server_with_its_specs() -> None:
    scenario = load_scenario(EXAMPLE)
    agents = make_agents(scenario, "http://127.0.0.1:9", seed=3)
    try:
        assert [a.server.id for a in agents] == [s.id for s in scenario.servers]
        for agent, spec in zip(agents, scenario.servers, strict=True):
            assert agent.server.site == spec.site
            assert agent.server.memory_gb == spec.memory_gb
            assert agent.server.decode_ms_per_block == spec.decode_ms_per_block
            assert agent.server.prefill_ms_per_block.fixed == spec.prefill_ms_per_block.fixed
            assert agent.server.address == server_address(spec.id)
            assert agent.state == "joining"
        # The probe round (no peers before registration) measures every site from the matrix.
        rtts = agents[2].probe()  # mig-0 in cluster2
        assert rtts == {"cluster0": 100, "cluster1": 100, "cluster2": 5}
    finally:
        for agent in agents:
            agent.stop()
