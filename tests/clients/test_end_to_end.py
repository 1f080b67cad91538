"""End to end: ``bprr serve`` as a subprocess on 127.0.0.1, two in-process agents and one
``bprr-agent run`` subprocess join, the coordinator places them by itself, a RouteClient
books and releases a session, and every agent leaves (the CLI one on SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from bprr_client import PrefillSpeed, RouteClient, ServerAgent, ServerInfo

from tests.api.conftest import ADMIN, JOIN
from tests.clients.conftest import MODEL

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "BPRR_DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}",
        "BPRR_ADMIN_TOKEN": ADMIN,
        "BPRR_JOIN_TOKEN": JOIN,
        "BPRR_HEARTBEAT_INTERVAL_S": "0.3",
        "BPRR_LEASE_TTL_S": "5",
        "BPRR_PLANNER_INTERVAL_S": "0.2",
    }
    log = (tmp_path / "coordinator.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "bprr"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is None and httpx.get(f"{url}/readyz").status_code == 200,
            "the coordinator's /readyz",
        )
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_agents_and_a_route_client_against_a_coordinator_process(
    coordinator: str, tmp_path: Path
) -> None:
    put = httpx.put(
        f"{coordinator}/v1/model", json=MODEL, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert put.status_code == 200, put.text
    agents = [
        ServerAgent(
            coordinator,
            ServerInfo(
                id=f"e{i}",
                site="east",
                memory_gb=6.0,
                decode_ms_per_block=2.0 + i,
                prefill_ms_per_block=PrefillSpeed(fixed=5.0, per_token=0.1),
                address=f"127.0.0.1:{40000 + i}",
            ),
            join_token=JOIN,
            prober=lambda _address: 1.5,
            probe_interval_s=0.5,
        )
        for i in range(2)
    ]
    cli_log = (tmp_path / "cli-agent.log").open("w")
    cli = subprocess.Popen(
        [
            str(BIN / "bprr-agent"),
            "--coordinator",
            coordinator,
            "run",
            "--id",
            "cli0",
            "--site",
            "east",
            "--memory-gb",
            "6",
            "--decode-ms-per-block",
            "3",
            "--address",
            "127.0.0.1:40009",
            "--join-token",
            JOIN,
            "--no-peers",
        ],
        stdout=cli_log,
        stderr=subprocess.STDOUT,
    )
    try:
        for agent in agents:
            agent.start()

        def all_online() -> bool:
            servers = httpx.get(f"{coordinator}/v1/servers").json()
            return (
                len(servers) == 3
                and all(
                    s["state"] == "online" and s["loaded_span"] == s["assigned_span"]
                    for s in servers
                    if s["assigned_span"] is not None
                )
                and any(s["assigned_span"] for s in servers)
            )

        wait_until(all_online, "the swarm to be placed and online")
        # 8 blocks do not fit on one 6 GB server: an in-process agent serves some of them.
        assert any(agent.state == "online" for agent in agents)
        wait_until(lambda: "e1" in agents[0].rtts, "a probe round")

        with RouteClient(coordinator, client_site="east") as routes:
            route = routes.route(input_tokens=20, output_tokens=10)
            assert route.hops[0].start == 0 and route.hops[-1].end == MODEL["num_blocks"]
            with routes.session(20, 10) as session:
                held = {
                    s["id"]: s["reserved_slots"]
                    for s in httpx.get(f"{coordinator}/v1/servers").json()
                }
                assert all(held[hop.server_id] > 0 for hop in session.route.hops)
            after = httpx.get(f"{coordinator}/v1/servers").json()
            assert all(s["reserved_slots"] == 0 for s in after)

        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=15) == 0
        ids = {s["id"] for s in httpx.get(f"{coordinator}/v1/servers").json()}
        assert ids == {"e0", "e1"}  # the CLI agent left on SIGTERM
    finally:
        for agent in agents:
            agent.stop()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        cli_log.close()
    assert all(agent.error is None for agent in agents)
    assert httpx.get(f"{coordinator}/v1/servers").json() == []
