"""``bprr-agent run --petals-model`` with an interpreter that has no PETALS: one clear error
line and a non-zero exit at once, no process started, no crash loop."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.petals.swarm import ROOT

pytestmark = [pytest.mark.petals]


def test_agent_without_petals_says_so_once_and_exits() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bprr_client.cli", "--coordinator", "http://127.0.0.1:9"),
            *("run", "--site", "east", "--memory-gb", "8", "--decode-ms-per-block", "5"),
            *("--address", "127.0.0.1:31337", "--petals-model", "tiny"),
            *("--petals-python", sys.executable, "--petals-new-swarm"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bprr-agent: error: --petals-python: PETALS is not installed")
    assert "make petals" in lines[0]
    assert time.monotonic() - started < 120  # it did not retry (timeout above would fire)
