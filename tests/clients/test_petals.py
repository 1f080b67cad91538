"""The PETALS command line and its supervision, with a stand-in process for PETALS."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from bprr_client import PetalsOptions, ProcessSupervisor, RetryPolicy, Span, petals_command
from bprr_client.petals import HostFailed, LauncherOptions, PetalsHost
from fastapi.testclient import TestClient

from tests.clients.conftest import FakeClock, Forward, make_agent, publish, put_model


def test_petals_command_line() -> None:
    options = PetalsOptions(
        model="bigscience/bloom-560m",
        python="/usr/bin/python3",
        initial_peers=("/ip4/10.0.0.1/tcp/31337/p2p/Qm1", "/ip4/10.0.0.2/tcp/31337/p2p/Qm2"),
        port=31330,
        public_ip="203.0.113.7",
        throughput=12.5,
        extra_args=("--torch_dtype", "float16"),
    )
    assert petals_command(options, Span(start=3, end=11)) == [
        "/usr/bin/python3",
        "-m",
        "petals.cli.run_server",
        "bigscience/bloom-560m",
        "--block_indices",
        "3:11",
        "--initial_peers",
        "/ip4/10.0.0.1/tcp/31337/p2p/Qm1",
        "/ip4/10.0.0.2/tcp/31337/p2p/Qm2",
        "--port",
        "31330",
        "--public_ip",
        "203.0.113.7",
        "--throughput",
        "12.5",
        "--torch_dtype",
        "float16",
    ]
    minimal = petals_command(PetalsOptions(model="m", new_swarm=True), Span(start=0, end=1))
    assert minimal[1:] == [
        "-m",
        "petals.cli.run_server",
        "m",
        "--block_indices",
        "0:1",
        "--new_swarm",
    ]


def test_petals_options_are_checked() -> None:
    with pytest.raises(ValueError, match="model"):
        PetalsOptions(model=" ")
    with pytest.raises(ValueError, match="port"):
        PetalsOptions(model="m", port=70000)
    with pytest.raises(ValueError, match="new_swarm"):
        PetalsOptions(model="m", new_swarm=True, initial_peers=("/ip4/1.2.3.4/tcp/1",))


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that records its argv (one JSON line per start) and sleeps: PETALS'
    stand-in, started as ``stand_in -m petals.cli.run_server MODEL --block_indices ...``."""
    log = tmp_path / "starts.jsonl"
    script = tmp_path / "fake-python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        f"with open({str(log)!r}, 'a') as f: f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "time.sleep(60)\n"
    )
    script.chmod(0o755)
    return script, log


def wait_for_lines(log: Path, count: int) -> list[list[str]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists():
            lines = [json.loads(x) for x in log.read_text().splitlines()]
            if len(lines) >= count:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"expected {count} starts in {log}")


def test_supervisor_restarts_on_span_change_and_after_a_crash(
    stand_in: tuple[Path, Path],
) -> None:
    script, log = stand_in
    clock = FakeClock(0.0)
    options = PetalsOptions(model="m", python=str(script))
    supervisor = ProcessSupervisor(
        lambda span: petals_command(options, span),
        ready_after_s=30,
        stop_timeout_s=5,
        restart=RetryPolicy(initial_s=2.0, jitter=0.0),
        quiet=True,
        clock=clock,
    )
    try:
        supervisor.apply(Span(start=0, end=4))
        wait_for_lines(log, 1)
        first = supervisor.process
        assert first is not None and supervisor.loaded_span() is None  # still loading
        clock.advance(30)
        assert supervisor.loaded_span() == Span(start=0, end=4)
        supervisor.apply(Span(start=0, end=4))  # same span: nothing restarts
        assert supervisor.process is first and supervisor.starts == 1

        supervisor.apply(Span(start=4, end=8))
        assert first.poll() is not None  # the old server was stopped
        second = supervisor.process
        assert second is not None and second.poll() is None
        assert supervisor.loaded_span() is None
        starts = wait_for_lines(log, 2)
        assert starts[0][starts[0].index("--block_indices") + 1] == "0:4"
        assert starts[1][:5] == ["-m", "petals.cli.run_server", "m", "--block_indices", "4:8"]

        second.kill()
        second.wait()
        supervisor.poll()  # crash noticed: restart in 2 s
        assert supervisor.crashes == 1 and supervisor.process is second
        clock.advance(1)
        supervisor.poll()
        assert supervisor.process is second
        clock.advance(1)
        supervisor.poll()
        assert supervisor.process is not second and supervisor.starts == 3
        assert wait_for_lines(log, 3)[2][4] == "4:8"
    finally:
        supervisor.close()
    assert supervisor.process is None and supervisor.loaded_span() is None


def test_agent_runs_petals_for_its_assigned_span(
    app: TestClient, forward: Forward, stand_in: tuple[Path, Path]
) -> None:
    script, log = stand_in
    put_model(app)
    options = PetalsOptions(model="tiny", python=str(script), extra_args=("--port", "31337"))
    supervisor = ProcessSupervisor(lambda span: petals_command(options, span), quiet=True)
    agent = make_agent(forward, 0, host=supervisor, memory_gb=24.0)
    try:
        agent.tick()
        assert supervisor.process is None  # nothing assigned yet
        spans = publish(app)
        agent.tick()
        agent.tick()
        start, end = spans["s0"]
        argv = wait_for_lines(log, 1)[0]
        assert argv[argv.index("--block_indices") + 1] == f"{start}:{end}"
        assert app.get("/v1/servers/s0").json()["state"] == "online"
        pid = supervisor.process.pid if supervisor.process else -1
    finally:
        agent.stop()
    assert app.get("/v1/servers/s0").status_code == 404
    with pytest.raises(ProcessLookupError):  # the PETALS stand-in is gone too
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_a_launcher_without_petals_stops_the_agent_without_a_crash_loop(tmp_path: Path) -> None:
    """The launcher under an interpreter that lacks PETALS exits with its error line; the
    host raises HostFailed (the agent stops) instead of restarting it."""
    options = LauncherOptions(
        model="tiny",
        python=sys.executable,
        dht_prefix="tiny",
        host_maddrs=("/ip4/127.0.0.1/tcp/1",),
    )
    host = PetalsHost(options, state_dir=tmp_path / "state")
    try:
        host.apply(Span(start=0, end=2))
        process = host.supervisor.process
        assert process is not None
        process.wait(timeout=60)
        with pytest.raises(HostFailed, match="PETALS is not importable"):
            host.poll()
        assert host.supervisor.starts == 1 and host.loaded_span() is None
    finally:
        host.close()
