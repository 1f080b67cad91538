"""End to end: ``bprr serve`` as a subprocess on 127.0.0.1, two in-process agents and one
``bprr-agent run`` subprocess join, the coordinator places them by itself, a RouteClient
books and releases a session, and every agent leaves (the CLI one on SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
from bprr_client import PrefillSpeed, RouteClient, ServerAgent, ServerInfo

from tests.api.conftest import ADMIN, JOIN
from tests.clients.conftest import BIN, MODEL, wait_until


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
            "--simulate-host",  # nothing serves its blocks: a demo server
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
