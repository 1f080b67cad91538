"""``bprr testbed --backend petals``: the scenario's servers as real PETALS servers steered by
the coordinator, measured against the performance model; and its argument errors."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bprr_harness.testbed.petals_backend import PetalsResult, PetalsRun, petals_predictions
from bprr_harness.testbed.petals_replay import HopDelays

from app.allocation.scenario import load_scenario
from app.cli import main

TINY = Path(__file__).with_name("tiny-2sites.json")
CLUSTERED = Path(__file__).parents[2] / "examples" / "paper-clustered-9.json"
ROOT = Path(__file__).parents[2]


def leftover_processes(settle_s: float = 30.0) -> str:
    """The processes still running in a PETALS testbed's work folder (``bprr-tbp-*``), after
    letting them settle: a process killed (SIGKILL to its group) at the run's end may still
    be scheduled to die on a loaded machine. Their pids and command lines, or ''."""
    deadline = time.monotonic() + settle_s
    while True:
        found = subprocess.run(["pgrep", "-af", "bprr-tbp-"], capture_output=True, text=True)
        if not found.stdout.strip() or time.monotonic() > deadline:
            return found.stdout.strip()
        time.sleep(0.5)


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


def test_an_agent_that_exits_stops_the_run_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """An interpreter without PETALS: the first agent exits (status 2) and the run says so
    at once, with the agent's own error line, instead of waiting for its server."""
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", str(TINY), "--backend", "petals", "--petals-python", sys.executable])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "the first PETALS server: e0 exited with status 2" in err[0]
    assert "PETALS is not installed" in err[0]
    assert leftover_processes() == ""


def test_hop_delays_are_half_the_client_server_rtt_each_way() -> None:
    rtt = {"ce": {"e0": 4.0, "w0": 30.0}, "cw": {"e0": 30.0, "w0": 4.0}}
    delays = HopDelays(rtt, {"e0": "PeerE0", "w0": "PeerW0"})
    assert delays.one_way_s == {}  # no client yet (the calibration): nothing delayed
    delays.use("cw")
    assert delays.one_way_s == {"PeerE0": pytest.approx(0.015), "PeerW0": pytest.approx(0.002)}
    delays.use(None)
    assert delays.one_way_s == {}


def test_hop_delays_count_the_exchanges_they_delay_and_the_time_slept() -> None:
    delays = HopDelays({"cw": {"e0": 30.0, "w0": 4.0}}, {"e0": "PeerE0", "w0": "PeerW0"})
    order: list[str] = []

    async def send() -> str:
        order.append("sent")
        return "reply"

    async def steps() -> None:
        # no client (the calibration): passed through, counted, not delayed
        assert await delays.exchange("PeerE0", True, send) == "reply"
        assert delays.take() == {
            "exchanges": 1,
            "delayed_exchanges": 0,
            "delayed_prefills": 0,
            "slept_ms": 0.0,
        }
        delays.use("cw")
        assert await delays.exchange("PeerE0", True, send) == "reply"  # a prefill, 30 ms
        assert await delays.exchange("PeerW0", False, send) == "reply"  # a decode step, 4 ms
        assert await delays.exchange("PeerElse", False, send) == "reply"  # no RTT known

    asyncio.run(steps())
    counts = delays.take()
    assert counts["exchanges"] == 3 and counts["delayed_exchanges"] == 2
    assert counts["delayed_prefills"] == 1
    assert counts["slept_ms"] >= 34.0 * 0.99  # slept, not assumed: a sleep is never shorter
    assert order == ["sent"] * 4
    assert delays.take()["exchanges"] == 0  # take() starts new counts


def test_petals_prediction_uses_the_scenario_rtts_and_no_scenario_overheads() -> None:
    scenario = load_scenario(TINY)
    speed = {
        "decode_ms_per_block": 0.5,
        "prefill_fixed_ms": 1.0,
        "prefill_per_token_ms": 0.1,
        "transport_decode_ms": 3.0,
        "transport_prefill_ms": 7.0,
    }
    request = {
        "index": 0,
        "client": "cw",  # west, on two east servers: 30 ms RTT per hop
        "hops": [["e0", 0, 4], ["e1", 4, 6]],
        "input_tokens": 8,
        "output_tokens": 3,
        "booking_ms": 2.0,
        "first_token_ms": 100.0,
        "token_ms": [80.0, 84.0],
        "e2e_ms": 270.0,
        "attempts": 1,
        "delays": {
            "exchanges": 6,
            "delayed_exchanges": 6,
            "delayed_prefills": 2,
            "slept_ms": 181.0,
        },
    }
    run = PetalsRun("cg", {}, {"e0": speed, "e1": speed, "w0": speed}, [request])
    (row,) = petals_predictions(PetalsResult(scenario), run)
    assert row["rtt_ms_per_step"] == pytest.approx(60.0)
    # per hop: the RTT, its blocks' compute, PETALS' calibrated transport; nothing else
    assert row["predicted_per_token_ms"] == pytest.approx(60.0 + 6 * 0.5 + 2 * 3.0)
    prefill_blocks = 6 * (1.0 + 0.1 * 8)
    assert row["predicted_first_token_ms"] == pytest.approx(60.0 + prefill_blocks + 2 * 7.0)
    assert row["per_token_ms"] == pytest.approx(82.0)
    assert row["per_token_error"] == pytest.approx(82.0 / 69.0 - 1.0)
    assert row["wait_ms"] == 2.0 and row["route"] == ["e0[0,4)", "e1[4,6)"]
    assert (row["exchanges"], row["delayed_exchanges"], row["delayed_prefills"]) == (6, 6, 2)
    assert row["delay_slept_ms"] == 181.0 and row["attempts"] == 1


# RTTs x10 (40 ms within a site, 300 ms across): the floors below stand well above what a
# PETALS hop costs on loopback, so a run whose traffic crossed no delay would fall under them.
TIME_SCALE = 10


def rtt_floor_ms(scenario: dict[str, Any], client: str, route: list[str]) -> float:
    """The RTTs one step of ``route`` crosses for ``client``: one client-server exchange
    per hop (the scenario's site matrix, scaled), computed here from the scenario file."""
    sites = {name: i for i, name in enumerate(scenario["sites"])}
    client_site = next(c["site"] for c in scenario["clients"] if c["id"] == client)
    server_site = {s["id"]: s["site"] for s in scenario["servers"]}
    matrix = scenario["site_rtt_ms"]
    total = 0.0
    for hop in route:  # "e0[0,3)"
        server = hop.split("[", 1)[0]
        total += matrix[sites[client_site]][sites[server_site[server]]] * TIME_SCALE
    return total


@pytest.mark.petals
@pytest.mark.slow
def test_real_petals_run_with_the_scenario_delays(petals_python: Path, namespaces: None) -> None:
    command = (
        f"ip link set lo up && exec {sys.executable} -m app.cli testbed {TINY} "
        f"--backend petals --policy cg --requests 3 --output-tokens 6 --time-scale {TIME_SCALE} "
        "--json"
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
    scenario = json.loads(TINY.read_text())
    smallest_rtt = min(min(row) for row in scenario["site_rtt_ms"]) * TIME_SCALE
    for server_id, speed in entry["measured_speeds"].items():
        assert speed["decode_ms_per_block"] > 0, server_id
        # the calibration made exchanges with the server and the delays held none back: its
        # transport is PETALS' own (a leaked delay would add at least the smallest RTT to it)
        assert speed["calibration_exchanges"] > 0, (server_id, speed)
        assert speed["calibration_delayed_exchanges"] == 0, (server_id, speed)
        assert 0 <= speed["transport_decode_ms"] < smallest_rtt, (server_id, speed)
    for row in entry["requests"]:
        floor = rtt_floor_ms(scenario, row["client"], row["route"])
        assert floor >= 40.0, row
        # the delays are applied: each step (the prefill, then one per further token) is one
        # delayed exchange per hop, and each slept its hop's RTT (a sleep is never shorter)
        hops, steps = len(row["route"]), row["output_tokens"]
        assert row["attempts"] == 1, row
        assert row["exchanges"] == row["delayed_exchanges"] == hops * steps, row
        assert row["delayed_prefills"] == hops, row
        assert row["delay_slept_ms"] >= floor * steps * 0.99, (floor, row)
        # ...so every step of the request crossed its route's RTTs...
        assert row["first_token_ms"] >= floor, (floor, row)
        assert row["per_token_ms"] >= floor, (floor, row)
        # ...and the model predicts with them (no RTT zeroed)
        assert row["rtt_ms_per_step"] == pytest.approx(floor), row
        assert row["predicted_per_token_ms"] > floor and row["predicted_first_token_ms"] > floor
        assert math.isfinite(row["first_token_error"]) and math.isfinite(row["per_token_error"])
    assert entry["errors"]["requests"] == 3
    assert leftover_processes() == ""  # every PETALS process of the run is gone
