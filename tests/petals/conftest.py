"""The real-PETALS tests: the PETALS environment (built by petals/build-env.sh when missing
or stale) and drivers run in a network namespace that has only ``lo``."""

from __future__ import annotations

import fcntl
import json
import os
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
    return load_facts(module, out)


def load_facts(module: str, out: Path) -> dict[str, Any]:
    facts: dict[str, Any] = json.loads(out.read_text())
    if "error" in facts:
        logs = "\n".join(f"--- {k}\n{v}" for k, v in facts.get("logs", {}).items())
        pytest.fail(f"{module}: {facts['error']}\n{logs}")
    return facts


def once_per_session(
    tmp_path_factory: pytest.TempPathFactory, name: str, module: str, timeout_s: float
) -> dict[str, Any]:
    """The facts of one run of ``module`` for the whole test session, also under
    pytest-xdist: the first worker runs it (under a file lock in the directory the workers
    share), the others read what it wrote."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / f"{name}.json"
    with (shared / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            try:
                return in_namespace(module, out, timeout_s)
            finally:
                if not out.exists():  # failed without facts: say so to the other workers
                    out.write_text(json.dumps({"error": f"{module} did not run"}))
    return load_facts(module, out)


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
