"""`bprr serve` in a child process, for the tests that need the real HTTP server (its
connection limits) or a real process to kill."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from tests.api.conftest import ADMIN, JOIN


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    base: str
    port: int
    process: subprocess.Popen[bytes]


@contextmanager
def bprr_serve(database_url: str, **env: str) -> Iterator[Served]:
    port = free_port()
    environment = dict(
        os.environ,
        BPRR_DATABASE_URL=database_url,
        BPRR_ADMIN_TOKEN=ADMIN,
        BPRR_JOIN_TOKEN=JOIN,
        BPRR_PLANNER_INTERVAL_S="0",
        **env,
    )
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
    process = subprocess.Popen([*command, "--port", str(port)], env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "bprr serve exited"
            assert time.monotonic() < deadline, "bprr serve did not start"
            time.sleep(0.2)
        yield Served(base, port, process)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
