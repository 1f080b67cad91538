"""ServerAgent against the real coordinator app in-process (httpx transport, injected
clock, no sleeping: the tests call tick() and probe() themselves)."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from bprr_client import AgentError, Span, Speed
from fastapi.testclient import TestClient

from tests.clients.conftest import (
    FakeClock,
    Forward,
    admin,
    make_agent,
    make_app,
    publish,
    put_model,
)


def settle(*agents: object) -> None:
    """Tick every agent until each has nothing new to report (tick() returns > 0)."""
    for agent in agents:
        for _ in range(5):
            if agent.tick() > 0:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("the agent never settled")


def test_registers_follows_its_span_and_goes_online(app: TestClient, forward: Forward) -> None:
    put_model(app)
    changes: list[tuple[Span | None, Span | None]] = []
    agents = [
        make_agent(forward, i, on_span_change=lambda old, new: changes.append((old, new)))
        for i in range(3)
    ]
    for agent in agents:
        delay = agent.tick()
        # The lease's pace: heartbeat_interval 5 s (less up to 10 % jitter), lease 15 s.
        assert 4.5 <= delay <= 5.0
        assert agent.registration is not None and agent.state == "joining"
    assert app.get("/v1/servers/s0").json()["state"] == "joining"
    spans = publish(app)
    settle(*agents)
    assert len(changes) == len(spans)
    for agent in agents:
        expected = spans.get(agent.server_id or "")
        got = agent.assigned_span
        assert (None if got is None else (got.start, got.end)) == expected
        server = app.get(f"/v1/servers/{agent.server_id}").json()
        if expected is not None:
            assert agent.state == "online"
            assert server["state"] == "online"
            assert (server["loaded_span"]["start"], server["loaded_span"]["end"]) == expected
    route = app.get(
        "/v1/routes", params={"client_site": "east", "input_tokens": 10, "output_tokens": 10}
    )
    assert route.status_code == 200, route.text


def test_rtts_are_smoothed_and_reported(app: TestClient, forward: Forward) -> None:
    put_model(app)
    samples = {"probe.east:7": [10.0, 20.0], "10.0.0.1:31337": [4.0, 4.0]}

    def prober(address: str) -> float | None:
        return samples[address].pop(0)

    agent = make_agent(
        forward, 0, prober=prober, site_targets={"east": "probe.east:7"}, probe_peers=True
    )
    peer = make_agent(forward, 1)
    peer.tick()
    agent.tick()
    assert agent.probe() == {"east": 10.0, "s1": 4.0}
    # EWMA (alpha 0.3): 0.3 * 20 + 0.7 * 10 = 13
    assert agent.probe() == pytest.approx({"east": 13.0, "s1": 4.0})
    agent.tick()
    sent = [r for r in forward.requests if r.url.path.endswith("/heartbeat")][-1]
    assert b'"rtts":{"east":13.0,"s1":4.0}' in sent.content.replace(b" ", b"")
    scenario = app.get("/v1/scenario").json()
    assert scenario["rtt_ms"]["client-east"]["s0"] == pytest.approx(13.0)
    assert scenario["rtt_ms"]["s0"]["s1"] == pytest.approx(4.0)
    # Reported once: the next heartbeat carries no RTTs until the next probe round.
    agent.tick()
    last = [r for r in forward.requests if r.url.path.endswith("/heartbeat")][-1]
    assert b"rtts" not in last.content


def test_an_rtt_target_the_coordinator_does_not_know_is_dropped(
    app: TestClient, forward: Forward
) -> None:
    put_model(app)
    agent = make_agent(forward, 0, prober=lambda _a: 5.0, site_targets={"mars": "m:1"})
    agent.tick()
    agent.probe()
    assert agent.tick() == 0.0  # 422 naming rtts.mars: dropped, heartbeat again at once
    assert agent.tick() > 1.0
    assert "mars" not in agent.rtts
    assert app.get("/v1/servers/s0").json()["lease"] == "live"


def test_speed_measurements_are_reported(app: TestClient, forward: Forward) -> None:
    put_model(app)
    agent = make_agent(forward, 0, speed=lambda: Speed(decode_ms_per_block=12.0))
    agent.tick()
    agent.probe()
    agent.tick()
    # The coordinator smooths it too: 0.3 * 12 + 0.7 * 2 = 5
    assert app.get("/v1/servers/s0").json()["decode_ms_per_block"] == pytest.approx(5.0)


def test_registers_again_when_the_registration_is_lost(app: TestClient, forward: Forward) -> None:
    put_model(app)
    agent = make_agent(forward, 0)
    agent.tick()
    first_epoch = agent.boot_epoch
    assert app.delete("/v1/servers/s0", headers=admin()).status_code == 204
    assert agent.tick() == 0.0  # 404: lost, register at once
    assert agent.registration is None
    agent.tick()
    assert agent.registrations == 2 and agent.server_id == "s0"
    assert agent.boot_epoch > first_epoch
    server = app.get("/v1/servers/s0").json()
    assert server["boot_epoch"] == agent.boot_epoch and server["lease"] == "live"


def test_backs_off_with_jitter_and_honours_retry_after(app: TestClient, forward: Forward) -> None:
    agent = make_agent(forward, 0)
    agent.tick()
    forward.fail = [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        (502, {}),
        (503, {"Retry-After": "7"}),
    ]
    delays = [agent.tick() for _ in range(4)]
    policy = agent.backoff
    for retry, delay in enumerate(delays[:3]):
        top = min(policy.max_s, policy.initial_s * policy.multiplier**retry)
        assert top * (1 - policy.jitter) <= delay <= top
    assert delays[0] < delays[2]
    assert delays[3] == 7.0
    assert agent.failures == 4
    assert agent.tick() > 4.0 and agent.failures == 0
    assert agent.registrations == 1


def test_survives_a_coordinator_restart(
    app: TestClient, forward: Forward, sqlite_url: str, clock: FakeClock
) -> None:
    put_model(app)
    agent = make_agent(forward, 0)
    agent.tick()
    app.__exit__(None, None, None)
    forward.fail = [httpx.ConnectError("down")]
    assert agent.tick() > 0  # backing off while the coordinator is down
    restarted = make_app(sqlite_url, clock)
    try:
        forward.client = restarted
        clock.advance(3)
        # the next heartbeat is paced by the lease already committed (a third of it),
        # not by a fresh 15 s lease: over 3 s, never the back-off's short retry
        assert agent.tick() > 3.0
        assert agent.registrations == 1  # the state (and the token) survived the restart
        assert restarted.get("/v1/servers/s0").json()["lease"] == "live"
    finally:
        restarted.__exit__(None, None, None)
        forward.client = app
        app.__enter__()


def test_another_process_cannot_take_a_live_server_id(app: TestClient, forward: Forward) -> None:
    """A second process under a live server's id (the join token, not the server's own
    token) is refused for good; the first keeps its registration."""
    agent = make_agent(forward, 0)
    agent.tick()
    newer = make_agent(forward, 0)  # same id; epochs from the same source: larger
    newer.boot_epoch = agent.boot_epoch
    with pytest.raises(AgentError, match="live lease"):
        newer.tick()
    agent.tick()
    assert agent.registrations == 1 and agent.error is None


def test_a_wrong_join_token_is_fatal(forward: Forward) -> None:
    agent = make_agent(forward, 0)
    assert agent._join_auth is not None
    agent._join_auth.token = "wrong"
    with pytest.raises(AgentError, match="join token"):
        agent.tick()


def test_stop_leaves_the_swarm(app: TestClient, forward: Forward) -> None:
    agent = make_agent(forward, 0)
    agent.tick()
    agent.stop()
    assert app.get("/v1/servers/s0").status_code == 404
    assert forward.requests[-1].method == "DELETE"
    assert forward.requests[-1].headers["Authorization"].startswith("Bearer ")


def test_sigterm_requests_a_graceful_stop(forward: Forward) -> None:
    agent = make_agent(forward, 0)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        agent.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert agent._stop.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
