"""The real-PETALS tests: the PETALS environment (built by petals/build-env.sh when missing
or stale) and drivers run in a network namespace that has only ``lo``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.petals.swarm import PETALS_PYTHON, ROOT


def in_namespace(module: str, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m MODULE OUT`` in a fresh network namespace with only ``lo`` up and
    return the facts it wrote."""
    command = f"ip link set lo up && exec {sys.executable} -m {module} {out}"
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0 or not out.exists():
        pytest.fail(f"{module} exited {done.returncode}: {done.stderr[-3000:]}")
    facts: dict[str, Any] = json.loads(out.read_text())
    if "error" in facts:
        logs = "\n".join(f"--- {k}\n{v}" for k, v in facts.get("logs", {}).items())
        pytest.fail(f"{module}: {facts['error']}\n{logs}")
    return facts


@pytest.fixture(scope="session")
def petals_python() -> Path:
    """The PETALS interpreter, its environment built first if missing or stale (a no-op
    when the stamp is current)."""
    built = subprocess.run(
        ["bash", str(ROOT / "petals/build-env.sh")], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return PETALS_PYTHON


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Network namespaces (``unshare -n``, root): CI has them; a machine that forbids them
    says so here."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces unavailable here: {probe.stderr.strip()}")
