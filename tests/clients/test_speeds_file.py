"""``bprr-agent run --speeds-file``: speeds measured by ``bprr profile --json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bprr_client._agent_cli import RunOptions, build_agent
from bprr_client.cli import SpeedsFile, main
from fastapi.testclient import TestClient

from tests.api.conftest import JOIN, admin
from tests.clients.conftest import BASE, Forward, put_model

RUN = ["run", "--site", "east", "--memory-gb", "6", "--address", "10.0.0.9:31337", "--id", "p1"]


def profile_report(decode: float, fixed: float, per_token: float) -> dict[str, object]:
    """The fields of a ``bprr profile --json`` report that the agent reads (and some others)."""
    return {
        "decode_ms_per_block": decode,
        "prefill_ms_per_block": {"fixed": fixed, "per_token": per_token},
        "architecture": {"name": "llama-2-70b"},
        "fit": {"decode": {"r2": 0.99}},
        "timings": [],
    }


def write(path: Path, report: dict[str, object], mtime_ns: int) -> None:
    path.write_text(json.dumps(report))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_registration_and_heartbeats_carry_the_profiled_speeds(
    app: TestClient, forward: Forward, tmp_path: Path
) -> None:
    put_model(app)
    speeds = tmp_path / "profile.json"
    write(speeds, profile_report(3.25, 31.5, 0.07), 1_000_000_000)
    options = RunOptions(
        coordinator=BASE,
        site="east",
        memory_gb=6,
        address="10.0.0.9:31337",
        id="p1",
        join_token=JOIN,
        probe_peers=False,
        speeds_file=speeds,
        simulate_host=True,
    )
    agent = build_agent(options, [], forward)
    agent._epoch_source = lambda: 1_000  # the coordinator runs on a fake clock (1970)
    agent.tick()
    server = app.get("/v1/servers/p1", headers=admin()).json()
    assert server["decode_ms_per_block"] == 3.25
    assert server["prefill_ms_per_block"] == {"fixed": 31.5, "per_token": 0.07}
    # Unchanged file: no fresh measurement. A new profile: sent with the next heartbeat.
    agent.probe()
    assert agent._pending_speed is None
    write(speeds, profile_report(2.5, 20.0, 0.05), 2_000_000_000)
    agent.probe()
    agent.tick()
    server = app.get("/v1/servers/p1", headers=admin()).json()
    # The coordinator smooths fresh measurements: the stored speed moves towards the new one.
    assert 2.5 <= server["decode_ms_per_block"] < 3.25
    assert 20.0 <= server["prefill_ms_per_block"]["fixed"] < 31.5
    agent.stop()


def test_a_broken_update_is_ignored(tmp_path: Path) -> None:
    speeds = tmp_path / "profile.json"
    write(speeds, profile_report(3.0, 1.0, 0.1), 1_000_000_000)
    hook = SpeedsFile(speeds)
    assert hook() is None
    write(speeds, {"decode_ms_per_block": -1}, 2_000_000_000)
    assert hook() is None
    write(speeds, profile_report(4.0, 1.0, 0.1), 3_000_000_000)
    fresh = hook()
    assert fresh is not None and fresh.decode_ms_per_block == 4.0


@pytest.mark.parametrize(
    ("report", "extra", "needle"),
    [
        (None, [], "--speeds-file: cannot read"),
        ("[1, 2]", [], "does not hold a JSON object"),
        ({"prefill_ms_per_block": {"fixed": 1}}, [], "--speeds-file: decode_ms_per_block"),
        ({"decode_ms_per_block": 0}, [], "--speeds-file: decode_ms_per_block"),
        (
            {"decode_ms_per_block": 2, "prefill_ms_per_block": {"fixed": -1, "per_token": 0}},
            [],
            "--speeds-file: prefill_ms_per_block.fixed",
        ),
        (profile_report(3, 1, 0.1), ["--decode-ms-per-block", "2"], "either a speeds file"),
    ],
)
def test_bad_speeds_files_are_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    report: object,
    extra: list[str],
    needle: str,
) -> None:
    speeds = tmp_path / "profile.json"
    if isinstance(report, str):
        speeds.write_text(report)
    elif report is not None:
        speeds.write_text(json.dumps(report))
    code = main(["--coordinator", BASE, *RUN, "--speeds-file", str(speeds), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bprr-agent: error:") and needle in err


def test_speeds_are_still_required_without_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--coordinator", BASE, *RUN])
    _, err = capsys.readouterr()
    assert code == 2 and "--decode-ms-per-block: required (or give --speeds-file)" in err
