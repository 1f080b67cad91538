"""The coordinator's measured workload: a rolling window of booking requests -> profile."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.allocation.scenario import parse_scenario
from app.allocation.workload import WorkloadProfile
from app.service.workload_window import WorkloadWindow
from tests.api.conftest import FakeClock
from tests.api.helpers import route_params, small_swarm


def test_rate_and_lengths_come_from_the_window() -> None:
    window = WorkloadWindow(window_s=100.0, min_samples=3)
    for i in range(50):  # one request every 2 s, inputs 0..49, outputs 10
        window.add(1000.0 + 2 * i, i, 10)
    profile = window.profile(1000.0 + 100.0)
    assert profile is not None
    # Requests at t in (1000, 1100]: i = 1..49 -> 49 samples over the 100 s window.
    assert profile.rate_per_s == pytest.approx(49 / 100.0)
    assert profile.input_tokens.max == 49 and profile.input_tokens.mean == pytest.approx(25.0)
    assert profile.output_tokens.p50 == 10


def test_old_samples_leave_the_window() -> None:
    window = WorkloadWindow(window_s=10.0, min_samples=2)
    for i in range(5):
        window.add(float(i), 100, 100)
    for i in range(5):
        window.add(20.0 + i, 1, 2)
    profile = window.profile(25.0)
    assert profile is not None
    assert profile.input_tokens.max == 1 and profile.output_tokens.max == 2
    assert profile.rate_per_s == pytest.approx(5 / 10.0)


def test_a_filling_window_uses_the_time_since_the_first_sample() -> None:
    window = WorkloadWindow(window_s=300.0, min_samples=2)
    for i in range(10):
        window.add(500.0 + i, 5, 5)
    profile = window.profile(510.0)
    assert profile is not None and profile.rate_per_s == pytest.approx(1.0)


def test_too_few_samples_give_no_profile() -> None:
    window = WorkloadWindow(window_s=10.0, min_samples=5)
    for i in range(4):
        window.add(float(i), 1, 1)
    assert window.profile(4.0) is None


def test_bounded_samples_estimate_the_rate_from_their_span() -> None:
    window = WorkloadWindow(window_s=1000.0, max_samples=100, min_samples=2)
    for i in range(1000):  # 10 per second
        window.add(i / 10.0, 1, 1)
    profile = window.profile(100.0)
    assert profile is not None
    assert profile.rate_per_s == pytest.approx(100 / (100.0 - 90.0), rel=0.02)


def test_bad_window_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="window_s"):
        WorkloadWindow(window_s=0)


def test_the_measured_profile_is_a_scenario_workload_that_parses(
    client: TestClient, clock: FakeClock
) -> None:
    """What the export puts in GET /v1/scenario's workload (engineer C's export calls
    SessionService.profile_workload): a Poisson workload with the measured lengths."""
    small_swarm(client)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    assert sessions.profile_workload() is None  # nothing seen yet
    for inputs in range(12):
        client.get("/v1/routes", params=route_params())  # routes are not bookings
        client.post("/v1/sessions", json=route_params(inputs=inputs, outputs=7))
        clock.advance(0.5)
    workload = sessions.profile_workload()
    assert workload is not None
    scenario = client.get("/v1/scenario").json()
    scenario["workload"] = workload
    parsed = parse_scenario(scenario)
    assert parsed.workload is not None
    profile = WorkloadProfile.from_scenario(parsed)
    assert profile.input_tokens.max == 11 and profile.output_tokens.p50 == 7
    assert profile.rate_per_s == pytest.approx(12 / 6.0)  # 12 requests in 6 s
