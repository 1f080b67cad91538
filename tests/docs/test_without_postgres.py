"""`make test` on a machine without PostgreSQL: one line says what is missing, and the
PostgreSQL tests are reported as skipped with that reason, never as errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nobody listens once the probe is closed


def test_without_postgres_the_tests_skip_with_the_reason() -> None:
    env = dict(os.environ, BPRR_TEST_PG=f"host=127.0.0.1 port={closed_port()} dbname=test")
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "tests/api/test_leases.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    tally = done.stdout.strip().splitlines()[-1]  # e.g. "1 passed, 2 skipped in 0.7s"
    assert "error" not in tally and "failed" not in tally, out[-3000:]
    assert " passed" in tally and " skipped" in tally, tally  # the SQLite half still runs
    assert "SKIPPED" in out and "PostgreSQL not reachable" in out, out[-3000:]


def test_the_make_step_says_in_one_line_what_is_missing() -> None:
    env = dict(os.environ, BPRR_TEST_PG=f"host=127.0.0.1 port={closed_port()} dbname=test")
    done = subprocess.run(
        ["bash", "scripts/postgres-up.sh", sys.executable],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no PostgreSQL" in lines[0], lines
    assert "tests marked postgres will be skipped" in lines[0]
