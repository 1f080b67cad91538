"""The labelled metrics at /metrics: per server (cache units, state), per client site (bookings
by outcome, queue waits), the queue depth, re-plans with their reason and the per-generation
predicted / measured times (app.service.telemetry)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.service import telemetry
from tests.api.conftest import FakeClock, admin, example_scenario

BOOKING = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 64}


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_per_server_cache_units_and_state(client: TestClient, clock: FakeClock) -> None:
    assert client.post("/v1/scenario", json=example_scenario(), headers=admin()).status_code == 201
    before = samples(client)
    listed = client.get("/v1/servers").json()
    servers = {s["id"] for s in listed}
    placed = {s["id"] for s in listed if s["assigned_span"] is not None}
    assert len(servers) == 9 and placed
    for server in servers:
        # Servers the placement leaves out are idle: registered, online, no span, no cache.
        state = "routable" if server in placed else "idle"
        assert value(before, "bprr_server_state", server=server, state=state) == 1.0, server
        states = [
            value(before, "bprr_server_state", server=server, state=other)
            for other in telemetry.SERVER_STATES
        ]
        assert sum(states) == 1.0
        total = ("bprr_server_cache_units", (("kind", "total"), ("server", server)))
        assert (total in before) == (server in placed)
        if server in placed:
            assert value(before, "bprr_server_cache_units", server=server, kind="used") == 0.0
            assert before[total] > 0
    session = client.post("/v1/sessions", json=BOOKING)
    assert session.status_code == 201, session.text
    after = samples(client)
    used = {
        server: value(after, "bprr_server_cache_units", server=server, kind="used")
        for server in servers
    }
    hops = session.json()["route"]["hops"]
    assert {hop["server_id"] for hop in hops} == {s for s, units in used.items() if units > 0}
    assert sum(used.values()) == value(after, "bprr_reserved_cache_slots")
    # The bottleneck, as the dashboard names it.
    neck = client.get("/v1/overview").json()["bottleneck"]
    assert value(after, "bprr_bottleneck_live_copies") == neck["live_copies"] >= 1
    named = sum(end - start for start, end in neck["blocks"])
    assert value(after, "bprr_bottleneck_blocks") == named
    assert neck["cache_used"] > 0
    assert value(after, "bprr_bottleneck_cache_used") == pytest.approx(neck["cache_used"])
    clock.advance(20)  # every lease runs out
    expired = samples(client)
    assert value(expired, "bprr_bottleneck_live_copies") == 0
    assert value(expired, "bprr_bottleneck_blocks") == 70
    assert ("bprr_bottleneck_cache_used", ()) not in expired
    for server in placed:
        assert value(expired, "bprr_server_state", server=server, state="expired") == 1.0
        assert value(expired, "bprr_server_state", server=server, state="routable") == 0.0


def test_booking_outcomes_and_waits_per_client_site(client: TestClient) -> None:
    start = samples(client)
    telemetry.record_booking("site-a", "booked", 0.0)
    telemetry.record_booking("site-a", "booked", 2.0)
    telemetry.record_booking("site-a", "queue_timeout", 30.0)
    telemetry.record_booking("site-b", "refused", 0.0)
    telemetry.set_queue_depth(3)
    end = samples(client)

    def delta(name: str, **labels: str) -> float:
        return value(end, name, **labels) - value(start, name, **labels)

    assert delta("bprr_bookings_total", client_site="site-a", outcome="booked") == 2
    assert delta("bprr_bookings_total", client_site="site-a", outcome="queue_timeout") == 1
    assert delta("bprr_bookings_total", client_site="site-b", outcome="refused") == 1
    # Waits are observed for bookings that queued (or could have): not for refusals.
    assert delta("bprr_queue_wait_seconds_count", client_site="site-a") == 3
    assert delta("bprr_queue_wait_seconds_sum", client_site="site-a") == 32.0
    assert delta("bprr_queue_wait_seconds_bucket", client_site="site-a", le="2.5") == 2
    assert delta("bprr_queue_wait_seconds_count", client_site="site-b") == 0
    assert value(end, "bprr_queue_depth") == 3
    telemetry.set_queue_depth(0)
    with pytest.raises(ValueError, match="outcome"):
        telemetry.record_booking("site-a", "lost", 0.0)
    with pytest.raises(ValueError, match="queue depth"):
        telemetry.set_queue_depth(-1)


def test_replans_and_generation_times(client: TestClient) -> None:
    start = samples(client)
    telemetry.record_replan(41, "coverage_lost")
    telemetry.record_prediction(41, 12.5)
    telemetry.record_measurement(41, 13.0)
    telemetry.record_measurement(41, 15.0)  # the gauge is the mean of the reports
    telemetry.record_prediction(42, 11.0)
    end = samples(client)
    assert (
        value(end, "bprr_replans_total", reason="coverage_lost")
        - value(start, "bprr_replans_total", reason="coverage_lost")
        == 1
    )
    assert value(end, "bprr_replan_generation", reason="coverage_lost") == 41
    assert telemetry.replan_reason(41) == "coverage_lost"
    assert telemetry.replan_reason(-5) is None
    assert value(end, "bprr_generation_per_token_ms", generation="41", kind="predicted") == 12.5
    assert value(end, "bprr_generation_per_token_ms", generation="41", kind="measured") == 14.0
    # Not measured yet: no sample at all rather than a made-up one.
    assert ("bprr_generation_per_token_ms", (("generation", "42"), ("kind", "measured"))) not in end
    with pytest.raises(ValueError, match="per_token_ms"):
        telemetry.record_measurement(41, float("nan"))
    # Old generations are dropped so the label set stays bounded.
    for generation in range(100, 100 + telemetry.KEPT_GENERATIONS):
        telemetry.record_prediction(generation, 1.0)
    kept = telemetry.generation_times()
    assert 41 not in kept and len(kept) == telemetry.KEPT_GENERATIONS
