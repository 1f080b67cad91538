"""``bprr-agent`` under PETALS' interpreter (.venv-petals: pydantic 1.10, typer 0.28), where the
PETALS harness runs the agent: the same options, errors, version and a working agent."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ADMIN, JOIN
from tests.clients.conftest import MODEL, wait_until
from tests.petals.swarm import PETALS_PYTHON, ROOT

pytestmark = [pytest.mark.petals]

RUN = ["run", "--site", "east", "--memory-gb", "40", "--decode-ms-per-block", "2"]


def agent_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PETALS_PYTHON), "-m", "bprr_client.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module", autouse=True)
def petals_env() -> None:
    if not PETALS_PYTHON.exists():
        pytest.fail(f"{PETALS_PYTHON} is missing: run `make petals`")
    versions = agent_cli("--version")
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.startswith("bprr-agent ")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([*RUN, "--address", "h:1", "--probe", "udp"], "--probe: 'udp' is not one of tcp, http"),
        ([*RUN, "--address", "h:1", "--timeout", "nan"], "--timeout: nan must be > 0"),
        (["book", "--client-site", "e"], "Missing option '--input-tokens'"),
    ],
)
def test_bad_arguments_are_one_error_line(argv: list[str], needle: str) -> None:
    done = agent_cli(*argv)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bprr-agent: error:") and needle in lines[0]


def test_a_simulated_host_joins_and_logs_its_state_changes(
    coordinator: str, tmp_path: Path
) -> None:
    put = httpx.put(
        f"{coordinator}/v1/model", json=MODEL, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert put.status_code == 200, put.text
    log = tmp_path / "agent.log"
    with log.open("w") as stderr:
        agent = subprocess.Popen(
            [
                *(str(PETALS_PYTHON), "-m", "bprr_client.cli", *RUN, "--address", "127.0.0.1:9"),
                *("--id", "p0", "--join-token", JOIN, "--no-peers", "--simulate-host"),
                *("--coordinator", coordinator.removeprefix("http://")),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        route: dict[str, str | int] = {"client_site": "east", "input_tokens": 5, "output_tokens": 5}
        wait_until(
            lambda: httpx.get(f"{coordinator}/v1/routes", params=route).status_code == 200,
            "the agent's span to be routable",
            timeout_s=60,
        )
        booked = agent_cli(
            "book", "--client-site", "east", "--input-tokens", "5", "--output-tokens", "5",
            "--coordinator", coordinator,
        )  # fmt: skip
        assert booked.returncode == 0, booked.stderr
        assert '"server_id": "p0"' in booked.stdout
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
    assert code == 0
    text = log.read_text()
    for notice in ("registered as p0", "assigned span 0:8", "loaded 0:8", "left the swarm as p0"):
        assert f"bprr-agent: notice: {notice}" in text
