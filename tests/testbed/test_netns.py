"""Namespaces per site on a bridge: set-up, a delayed TCP exchange across the bridge through
the relay, and tear-down (also after an exception, and of leftovers by run id)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from bprr_harness.testbed import netns
from bprr_harness.testbed.netns import SiteNetwork

pytestmark = pytest.mark.usefixtures("namespaces")

ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7001)); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""

CLIENT = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(5):
    t = time.perf_counter(); s.sendall(b"x" * 100); got = b""
    while len(got) < 100:
        got += s.recv(100)
    times.append((time.perf_counter() - t) * 1000)
print(sorted(times)[2])
"""


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", line


def test_sites_on_a_bridge_with_relay_delay_then_everything_gone() -> None:
    network = SiteNetwork(["east", "west"])
    network.up()
    processes: list[subprocess.Popen[str]] = []
    try:
        listed = netns.list_namespaces()
        assert set(network.namespaces) <= set(listed)
        assert all(ns.startswith(f"bprr-tb-{network.run_id}-") for ns in network.namespaces)
        assert network.bridge in _links()
        west = network.address("west")
        for code in (ECHO,):
            processes.append(
                subprocess.Popen(
                    [*network.exec_prefix("west"), sys.executable, "-c", code],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        _wait_ready(processes[-1])
        relay = [
            *network.exec_prefix("west"),
            sys.executable,
            "-m",
            "bprr_harness.testbed.relay",
            f"{west}:7002=127.0.0.1:7001@20",
            f"{west}:7003=127.0.0.1:7001@0",
        ]
        processes.append(subprocess.Popen(relay, stdout=subprocess.PIPE, text=True))
        _wait_ready(processes[-1])

        def rtt(port: int) -> float:
            out = subprocess.run(
                [*network.exec_prefix("east"), sys.executable, "-c", CLIENT, west, str(port)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            return float(out.stdout)

        delayed, direct = rtt(7002), rtt(7003)
        # east -> bridge -> west through the relay: 2 x 20 ms added (a floor; no upper bound,
        # a busy machine may add any amount on top), and the relay is what adds it
        assert delayed >= 40.0, delayed
        assert delayed - direct >= 35.0, (delayed, direct)
        # the root namespace does not reach the site's loopback-only echo server directly
        probe = subprocess.run(
            [sys.executable, "-c", f"import socket; socket.create_connection(('{west}', 7001), 2)"],
            capture_output=True,
        )
        assert probe.returncode != 0
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
        deleted = network.down()
    assert set(network.namespaces) <= set(deleted)
    assert not set(network.namespaces) & set(netns.list_namespaces())
    assert network.bridge not in _links()
    assert f"bt{network.run_id}h" not in _links()


def test_teardown_after_an_exception_and_cleanup_of_leftovers() -> None:
    holder: list[SiteNetwork] = []
    with pytest.raises(RuntimeError, match="boom"), SiteNetwork(["a", "b", "c"]) as network:
        holder.append(network)
        assert set(network.namespaces) <= set(netns.list_namespaces())
        raise RuntimeError("boom")
    assert not set(holder[0].namespaces) & set(netns.list_namespaces())
    assert holder[0].bridge not in _links()

    leftover = SiteNetwork(["x"])
    leftover.up()  # a crashed run's namespace, bridge and veth
    try:
        time.sleep(0.05)
        deleted = netns.cleanup(leftover.run_id)
        assert leftover.namespace("x") in deleted and leftover.bridge in deleted
        assert leftover.namespace("x") not in netns.list_namespaces()
        assert leftover.bridge not in _links()
    finally:
        leftover.down()
    with pytest.raises(ValueError, match="run id"):
        netns.cleanup("../etc")


def test_failed_setup_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    network = SiteNetwork(["a", "b"])
    real = netns._run

    def failing(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if args[:3] == ["ip", "netns", "add"] and args[3].endswith("-s1"):
            raise netns.NetnsError("injected failure")
        return real(args, check)

    monkeypatch.setattr(netns, "_run", failing)
    with pytest.raises(netns.NetnsError, match="injected"):
        network.up()
    monkeypatch.undo()
    assert not [n for n in netns.list_namespaces() if n.startswith(f"bprr-tb-{network.run_id}")]
    assert network.bridge not in _links()
