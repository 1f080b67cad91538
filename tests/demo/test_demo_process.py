"""``bprr serve --demo`` end to end: the shipped example as a subprocess, time-compressed; the
public API shows a live swarm (every server online with its assigned span loaded, a placement
generation, sessions booked), then SIGTERM stops it cleanly (exit 0, every server left)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "paper-clustered-9.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(
    check: Callable[[], Any], what: str, process: subprocess.Popen[str], timeout_s: float
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the demo exited early ({process.returncode})"
        try:
            value = check()
        except (httpx.HTTPError, KeyError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_demo_shows_a_live_swarm_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPRR_")}
    output = tmp_path / "demo.log"
    started = time.monotonic()
    command = [sys.executable, "-m", "app.cli", "serve", "--demo", str(EXAMPLE)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--demo-speed", "20"]
    with output.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=5.0) as client:

                def swarm_online() -> list[dict[str, Any]] | None:
                    servers: list[dict[str, Any]] = client.get("/v1/servers").json()
                    ready = [
                        s
                        for s in servers
                        if s["state"] == "online"
                        and s["lease"] == "live"
                        and s["assigned_span"] is not None
                        and s["loaded_span"] == s["assigned_span"]
                    ]
                    return servers if len(servers) == 9 and len(ready) == 9 else None

                servers = wait_for(swarm_online, "9 servers online", process, 60.0)
                assert {s["id"] for s in servers} == {
                    "a100-0",
                    "a100-1",
                    *(f"mig-{i}" for i in range(7)),
                }
                placement = client.get("/v1/placements/current").json()
                assert placement["generation"] >= 1
                spans = {p["server_id"]: (p["start"], p["end"]) for p in placement["spans"]}
                for server in servers:
                    span = server["loaded_span"]
                    assert spans[server["id"]] == (span["start"], span["end"])
                # Every block is covered by the live spans.
                covered = set()
                for start, end in spans.values():
                    covered.update(range(start, end))
                assert covered == set(range(70))

                def booked() -> dict[str, Any] | None:
                    overview: dict[str, Any] = client.get("/v1/overview").json()
                    return overview if overview["sessions_booked"] >= 1 else None

                overview = wait_for(booked, "a booked session", process, 10.0)
                assert overview["generation"] >= 1
                assert overview["live_servers"] == 9
                assert overview["coverage"] == 1.0
                metrics = {
                    line.split()[0]: float(line.split()[1])
                    for line in client.get("/metrics").text.splitlines()
                    if line.startswith("bprr_") and len(line.split()) == 2
                }
                assert metrics["bprr_live_servers"] == 9
                assert metrics["bprr_placement_generation"] >= 1
                # The dashboard and the docs are where the log says to look.
                assert client.get("/").status_code == 200
                assert client.get("/docs").status_code == 200
            live_after = time.monotonic() - started
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
    stopped_in = time.monotonic() - started - live_after
    text = output.read_text()
    assert code == 0, text
    # a hang guard (agents leave, threads join), not a speed target: the machine may be busy
    assert stopped_in < 60, f"took {stopped_in:.1f} s to stop\n{text}"
    assert f"dashboard: {url}/" in text and f"{url}/docs" in text
    assert "admin token (generated for this run)" in text
    assert "fresh SQLite database" in text
    assert "SIGTERM: stopping" in text
    assert "9 of 9 servers left the swarm, 0 still registered" in text
    assert "Traceback" not in text
