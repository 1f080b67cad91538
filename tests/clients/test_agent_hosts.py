"""``bprr-agent run`` never reports blocks it does not host: without a host it says so and is
never routed through; ``--simulate-host`` (demos) loads each assigned span at once and says it
simulates. Its state changes are one line each on stderr without ``-v``."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from bprr_client import ServerAgent
from bprr_client._agent_cli import (
    NO_HOST_WARNING,
    SIMULATED_HOST_WARNING,
    RunOptions,
    build_agent,
)
from bprr_client.agent import NOTICE, NoHost
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, JOIN, admin
from tests.clients.conftest import (
    BASE,
    BIN,
    MODEL,
    Forward,
    make_agent,
    publish,
    put_model,
    wait_until,
)

ROUTE: dict[str, str | int] = {"client_site": "east", "input_tokens": 10, "output_tokens": 10}


def cli_agent(forward: Forward, server_id: str, **options: Any) -> ServerAgent:
    """The agent `bprr-agent run --id ID --memory-gb 40 ...` builds (one server fits the
    whole model), on the in-process coordinator."""
    run = RunOptions(
        coordinator=BASE,
        site="east",
        memory_gb=40.0,
        address="10.0.0.40:31337",
        decode_ms_per_block=2.0,
        id=server_id,
        join_token=JOIN,
        probe_peers=False,
        **options,
    )
    agent = build_agent(run, [], forward)
    epochs = iter(range(1_000, 2_000))
    agent._epoch_source = lambda: next(epochs)  # the coordinator runs on a fake clock (1970)
    return agent


def no_host_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() == NO_HOST_WARNING]


def test_an_agent_without_a_host_is_registered_but_never_routable(
    app: TestClient, forward: Forward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bprr_client")
    put_model(app)
    ghost = cli_agent(forward, "ghost")
    assert len(no_host_warnings(caplog)) == 1
    helpers = [make_agent(forward, i) for i in range(3)]
    for agent in [ghost, *helpers]:
        agent.tick()
    spans = publish(app)
    for _ in range(3):
        for agent in [ghost, *helpers]:
            agent.tick()
    assert "ghost" not in spans  # the planner places nothing on it
    server = app.get("/v1/servers/ghost").json()
    assert server["lease"] == "live"
    assert server["state"] == "draining"
    assert server["loaded_span"] is None and server["assigned_span"] is None
    assert ghost.loaded_span is None
    route = app.get("/v1/routes", params=ROUTE)
    assert route.status_code == 200, route.text
    assert "ghost" not in {hop["server_id"] for hop in route.json()["hops"]}
    ghost.stop()
    for agent in helpers:
        agent.stop()


def test_a_lone_agent_without_a_host_leaves_the_model_unroutable(
    app: TestClient, forward: Forward
) -> None:
    put_model(app)
    ghost = cli_agent(forward, "ghost")
    ghost.tick()
    placed = app.post("/v1/placements", json={"algorithm": "cg"}, headers=admin())
    for _ in range(3):
        ghost.tick()
    if placed.status_code == 201:
        assert "ghost" not in {span["server_id"] for span in placed.json()["spans"]}
    assert app.get("/v1/servers/ghost").json()["loaded_span"] is None
    assert app.get("/v1/routes", params=ROUTE).status_code == 503
    ghost.stop()


def test_a_simulated_host_loads_its_span_and_becomes_routable(
    app: TestClient, forward: Forward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bprr_client")
    put_model(app)
    demo = cli_agent(forward, "demo", simulate_host=True)
    assert [r.getMessage() for r in caplog.records] == [SIMULATED_HOST_WARNING]
    demo.tick()
    spans = publish(app)
    assert spans == {"demo": (0, MODEL["num_blocks"])}
    for _ in range(3):
        demo.tick()
    server = app.get("/v1/servers/demo").json()
    assert server["state"] == "online"
    assert server["loaded_span"] == server["assigned_span"] == {"start": 0, "end": 8}
    route = app.get("/v1/routes", params=ROUTE)
    assert route.status_code == 200, route.text
    assert [hop["server_id"] for hop in route.json()["hops"]] == ["demo"]
    demo.stop()


def start_cli_agent(
    coordinator: str, server_id: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`bprr-agent run` as a process, without -v, with --coordinator after the command and
    without a scheme."""
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                *(str(BIN / "bprr-agent"), "run", "--id", server_id, "--site", "east"),
                *("--memory-gb", "40", "--decode-ms-per-block", "3", "--address", "127.0.0.1:9"),
                *("--join-token", JOIN, "--no-peers"),
                *("--coordinator", coordinator.removeprefix("http://"), *extra),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def messages(log: Path) -> list[str]:
    """Each stderr line: ``bprr-agent: level: message``."""
    return log.read_text().splitlines()


def test_agent_processes_log_each_state_change_in_one_line(
    coordinator: str, tmp_path: Path
) -> None:
    put = httpx.put(
        f"{coordinator}/v1/model", json=MODEL, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert put.status_code == 200, put.text
    ghost_log, demo_log = tmp_path / "ghost.log", tmp_path / "demo.log"

    def servers() -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in httpx.get(f"{coordinator}/v1/servers").json()}

    def demo_routable() -> bool:
        route = httpx.get(f"{coordinator}/v1/routes", params=ROUTE)
        return route.status_code == 200

    ghost = start_cli_agent(coordinator, "ghost", ghost_log)
    demo: subprocess.Popen[bytes] | None = None
    try:
        wait_until(
            lambda: servers().get("ghost", {}).get("state") == "draining",
            "the agent without a host to register",
        )
        demo = start_cli_agent(coordinator, "demo", demo_log, "--simulate-host")
        wait_until(demo_routable, "the simulated host to be routable", timeout_s=60)
        # The planner placed the model with both live: on the demo server, nothing on the ghost.
        ghost_row = servers()["ghost"]
        assert ghost_row["lease"] == "live" and ghost_row["state"] == "draining"
        assert ghost_row["loaded_span"] is None and ghost_row["assigned_span"] is None
        hops = httpx.get(f"{coordinator}/v1/routes", params=ROUTE).json()["hops"]
        assert {hop["server_id"] for hop in hops} == {"demo"}
    finally:
        codes = [stop(process) for process in (ghost, demo) if process is not None]
    assert codes == [0, 0]
    ghost_lines, demo_lines = messages(ghost_log), messages(demo_log)
    assert not any(line.startswith("bprr-agent: info:") for line in ghost_lines + demo_lines)
    # Registered, then draining: in the order the coordinator hears it.
    assert ghost_lines == [
        f"bprr-agent: warning: {NO_HOST_WARNING}",
        ghost_lines[1],
        "bprr-agent: notice: draining: the coordinator re-plans without this server",
        "bprr-agent: notice: left the swarm as ghost",
    ]
    assert re.fullmatch(
        r"bprr-agent: notice: registered as ghost \(boot epoch \d+\)", ghost_lines[1]
    )
    notices = [line.removeprefix("bprr-agent: notice: ") for line in demo_lines[1:]]
    assert demo_lines[0] == f"bprr-agent: warning: {SIMULATED_HOST_WARNING}"
    assert re.fullmatch(r"registered as demo \(boot epoch \d+\)", notices[0])
    assert notices[1:] == [
        "assigned span 0:8",
        "loaded 0:8 (online)",
        "left the swarm as demo",
    ]


def test_each_state_change_is_one_notice_line(
    app: TestClient, forward: Forward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(NOTICE, logger="bprr_client.agent")
    put_model(app)
    agent, other = make_agent(forward, 0), make_agent(forward, 1, memory_gb=40.0)
    said: list[str] = []

    def step(action: Callable[[], object]) -> None:
        """Run one of the agent's steps and keep what it logged."""
        caplog.clear()
        action()
        said.extend(f"{r.levelname} {r.getMessage()}" for r in caplog.records)
        caplog.clear()

    step(agent.tick)
    other.tick()
    spans = publish(app)
    assert "s0" in spans
    step(agent.tick)
    step(agent.tick)
    assert app.delete("/v1/servers/s0", headers=admin()).status_code == 204
    for _ in range(3):  # 404: lease lost; registered again; the span reported loaded again
        step(agent.tick)
    step(agent.drain)
    step(agent.tick)
    other.tick()
    assert "s0" not in publish(app)  # a draining server is planned out
    step(agent.tick)  # unassigned
    step(agent.tick)  # the coordinator told nothing is loaded
    step(agent.stop)
    start, end = spans["s0"]
    epoch = re.compile(r"\(boot epoch \d+\)")
    assert [epoch.sub("(boot epoch N)", line) for line in said] == [
        "NOTICE registered as s0 (boot epoch N)",
        f"NOTICE assigned span {start}:{end}",
        f"NOTICE loaded {start}:{end} (online)",
        "WARNING lease lost (404: server 's0' is not registered); registering again",
        "NOTICE re-registered as s0 (boot epoch N)",
        f"NOTICE loaded {start}:{end} (online)",
        "NOTICE draining: the coordinator re-plans without this server",
        f"NOTICE unassigned (was {start}:{end})",
        f"NOTICE unloaded {start}:{end}",
        "NOTICE left the swarm as s0",
    ]
    other.stop()


def test_an_agent_without_a_host_is_draining_from_its_first_heartbeat(
    app: TestClient, forward: Forward, caplog: pytest.LogCaptureFixture
) -> None:
    """The registration itself says draining (the planner never places it, not even before
    the first heartbeat); the heartbeat in the same step says so again, and the notice
    follows the registration's."""
    caplog.set_level(NOTICE, logger="bprr_client.agent")
    put_model(app)
    ghost = make_agent(forward, 0, host=NoHost(), draining=True)
    assert caplog.records == []  # nothing said before the coordinator is told
    ghost.tick()
    sent = [(request.method, request.url.path) for request in forward.requests]
    assert sent == [("POST", "/v1/servers"), ("POST", "/v1/servers/s0/heartbeat")]
    assert json.loads(forward.requests[0].content)["state"] == "draining"
    assert json.loads(forward.requests[1].content)["state"] == "draining"
    said = [record.getMessage() for record in caplog.records]
    assert re.fullmatch(r"registered as s0 \(boot epoch \d+\)", said[0])
    assert said[1:] == ["draining: the coordinator re-plans without this server"]
    assert app.get("/v1/servers/s0").json()["state"] == "draining"
    registration = {"site": "east", "memory_gb": 40, "decode_ms_per_block": 2.0}
    with_host = app.post(
        "/v1/servers",
        json={**registration, "id": "s9", "address": "10.0.0.9:1", "boot_epoch": 1},
        headers={"Authorization": f"Bearer {JOIN}"},
    )
    assert with_host.status_code == 201 and app.get("/v1/servers/s9").json()["state"] == "joining"
    ghost.drain()  # said once
    assert len(caplog.records) == 2
    ghost.stop()
