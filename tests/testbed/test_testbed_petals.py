"""``bprr testbed --backend petals``: the scenario's servers as real PETALS servers steered by
the coordinator, measured against the performance model; and its argument errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

TINY = Path(__file__).with_name("tiny-2sites.json")
CLUSTERED = Path(__file__).parents[2] / "examples" / "paper-clustered-9.json"
ROOT = Path(__file__).parents[2]


def test_petals_backend_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", str(TINY), "--backend", "petals", "--petals-python", "/nonexistent/py"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no PETALS environment at /nonexistent/py" in err[0], err
    with pytest.raises(SystemExit):
        main(["testbed", str(CLUSTERED), "--backend", "petals", "--petals-python", sys.executable])
    assert "at most 4 servers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["testbed", str(TINY), "--backend", "gpu"])
    assert "--backend" in capsys.readouterr().err


@pytest.mark.petals
@pytest.mark.slow
@pytest.mark.xdist_group("petals")
def test_real_petals_run_reports_measured_against_predicted(
    petals_python: Path, namespaces: None
) -> None:
    command = (
        f"ip link set lo up && exec {sys.executable} -m app.cli testbed {TINY} "
        "--backend petals --policy cg --requests 3 --output-tokens 6 --json"
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["mode"] == "petals"
    entry = report["policies"]["cg"]
    assert len(entry["requests"]) == 3
    for server_id, speed in entry["measured_speeds"].items():
        assert speed["decode_ms_per_block"] > 0, server_id
        assert speed["transport_decode_ms"] >= 0, server_id
    for row in entry["requests"]:
        assert row["route"] and row["per_token_ms"] > 0 and row["predicted_per_token_ms"] > 0
        assert math.isfinite(row["first_token_error"]) and math.isfinite(row["per_token_error"])
    assert entry["errors"]["requests"] == 3
    leftover = subprocess.run(["pgrep", "-f", "bprr-tbp-"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # every PETALS process of the run is gone
