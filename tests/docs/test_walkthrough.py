"""docs/walkthrough.sh, the README's curl walk-through as a script, kept true: it is run as a
subprocess (a real ``bprr serve`` on a free port, SQLite in a temporary directory) and its
printed calls, HTTP statuses and replies are checked step by step, with the numbers the
README quotes (the spans, the predicted times as the API returns them, rounded to 0.1 ms).
Then: the script leaves nothing behind, on success and when stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "walkthrough.sh"
# A coordinator's start (imports, migrations) takes ~30 s on a busy 2-core machine.
TIMEOUT_S = 300

pytestmark = pytest.mark.slow

STEP = re.compile(r"^## (\d+)\. (.*)$")
CALL = re.compile(r"^\$ curl -X ([A-Z]+) (\S+)$")
STATUS = re.compile(r"^-> HTTP (\d{3})$")
DATABASE = re.compile(r"sqlite:///(\S+)/walkthrough\.db")
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:(\d+)) \(pid (\d+)\)")


@dataclass
class Call:
    method: str
    path: str
    status: int = 0
    reply: Any = None


@dataclass
class Step:
    number: int
    title: str
    calls: list[Call] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    steps: dict[int, Step]

    def statuses(self) -> list[tuple[str, int]]:
        return [(c.method, c.status) for s in self.steps.values() for c in s.calls]


def parse(stdout: str) -> dict[int, Step]:
    steps: dict[int, Step] = {}
    step: Step | None = None
    call: Call | None = None
    for line in stdout.splitlines():
        if match := STEP.match(line):
            step = steps.setdefault(int(match[1]), Step(int(match[1]), match[2]))
            call = None
        elif step is None:
            continue
        elif match := CALL.match(line):
            call = Call(match[1], match[2])
            step.calls.append(call)
        elif (match := STATUS.match(line)) and call is not None:
            call.status = int(match[1])
        elif line.startswith(("{", "[")) and call is not None and call.reply is None:
            call.reply = json.loads(line)
        else:
            step.lines.append(line)
    return steps


def script_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPRR_") and k != "PORT"}
    env["TMPDIR"] = str(tmp)
    env["BPRR_BIN"] = str(Path(sys.executable).parent / "bprr")
    env.update(extra)
    return env


def temp_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("bprr-walkthrough.*"))


def port_closed(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie waiting for its parent's wait() counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] == "Z"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("walkthrough")
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=tmp,  # the script finds the repository from its own path, not the working directory
        env=script_env(tmp),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return Run(done.returncode, done.stdout, done.stderr, parse(done.stdout))


def replies(run: Run, number: int) -> list[Any]:
    return [c.reply for c in run.steps[number].calls]


def test_the_script_runs_to_the_end(run: Run) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stderr
    assert run.stdout.rstrip().endswith("walk-through done")
    assert sorted(run.steps) == list(range(10))


def test_every_call_answers_the_status_the_readme_shows(run: Run) -> None:
    assert run.statuses() == [
        ("PUT", 200),  # 1. model
        ("POST", 201),  # 2. registrations
        ("POST", 201),
        ("PUT", 200),  # 3. RTTs
        ("POST", 201),  # 4. placement
        ("POST", 200),  # 5. heartbeats with each server's own token
        ("POST", 200),
        ("POST", 403),  #    and with the other server's token
        ("GET", 200),  # 6. route
        ("POST", 201),  #    booking
        ("DELETE", 401),  # 7. release without the session's token
        ("DELETE", 204),  #    with it
        ("GET", 200),  #    the ended session
        ("GET", 200),  # 8. the scenario export
        ("POST", 409),  # 9. older boot epoch
        ("POST", 422),  #    bad field
        ("PUT", 401),  #    admin route, no token, bad body
        ("GET", 200),  #    the model, unchanged
        ("GET", 200),  #    the server, unchanged
    ]


def test_model_registrations_and_rtts(run: Run) -> None:
    (model,) = replies(run, 1)
    assert model["name"] == "bloom-176b" and model["num_blocks"] == 70
    assert (model["max_input_tokens"], model["max_output_tokens"]) == (20, 128)
    first, second = replies(run, 2)
    assert (first["id"], second["id"]) == ("a100-0", "a100-1")
    assert first["token"] and second["token"] and first["token"] != second["token"]
    # A lease long enough for a person running the calls by hand.
    assert first["lease_ttl_s"] == second["lease_ttl_s"] == 3600.0
    assert replies(run, 3) == [{"updated": 3}]


def test_the_placement_and_its_predicted_times(run: Run) -> None:
    (placement,) = replies(run, 4)
    assert placement["generation"] == 1
    assert (placement["algorithm"], placement["concurrency"]) == ("cg", 8)
    spans = {s["server_id"]: (s["start"], s["end"]) for s in placement["spans"]}
    assert spans == {"a100-0": (0, 61), "a100-1": (9, 70)}
    assert round(placement["objective_ms_per_token"], 1) == 520.4
    assert round(placement["bound_ms_per_token"], 1) == 605.4
    summary = " ".join(run.steps[4].lines)
    assert "spans a100-0 [0, 61), a100-1 [9, 70)" in summary


def test_heartbeats_repeat_the_assigned_spans(run: Run) -> None:
    own0, own1, foreign = replies(run, 5)
    assert own0["assigned_span"] == {"start": 0, "end": 61} and own0["generation"] == 1
    assert own1["assigned_span"] == {"start": 9, "end": 70}
    assert own0["lease_expires_in_s"] == pytest.approx(3600.0, abs=60)
    assert "a100-1" in foreign["detail"]


def test_route_and_booking(run: Run) -> None:
    route, booking = replies(run, 6)
    for reply in (route, booking["route"]):
        hops = [(h["server_id"], h["start"], h["end"]) for h in reply["hops"]]
        assert hops == [("a100-0", 0, 61), ("a100-1", 61, 70)]
        assert reply["generation"] == 1 and reply["client_site"] == "eu"
        assert round(reply["first_token_ms"], 1) == 2198.3
        assert round(reply["per_token_ms"], 1) == 520.4
        assert round(reply["total_ms"], 1) == 34983.5
        assert reply["wait_ms"] == 0
    # Released at the predicted completion (35.0 s) plus the 30 s grace period.
    assert 60.0 < booking["expires_in_s"] <= 65.0
    assert booking["token"] and booking["id"]
    assert f"session {booking['id']}, its token {booking['token']}" in " ".join(run.steps[6].lines)


def test_release_needs_the_session_token(run: Run) -> None:
    (_, booking) = replies(run, 6)
    anonymous, released, status = replies(run, 7)
    assert "token" in anonymous["detail"]
    assert released is None  # 204, no body
    assert status["id"] == booking["id"]
    assert (status["state"], status["end_reason"]) == ("ended", "released")
    assert {c.path for c in run.steps[7].calls} == {f"/v1/sessions/{booking['id']}"}


def test_bad_calls_say_why(run: Run) -> None:
    epoch, field_error, no_token, model, server = replies(run, 9)
    assert "boot_epoch" in epoch["detail"]
    assert field_error["detail"][0]["loc"] == ["body", "input_tokens"]
    assert "token" in no_token["detail"]
    # Nothing was written: the model is step 1's, the server keeps its epoch, state and span.
    assert model == replies(run, 1)[0]
    assert (server["boot_epoch"], server["state"], server["lease"]) == (1, "online", "live")
    assert server["loaded_span"] == {"start": 0, "end": 61}


def test_the_what_if_replays_the_measured_load(run: Run) -> None:
    """Step 8: 12 more bookings, GET /v1/scenario, then bprr solve and bprr simulate on it."""
    assert "12 more bookings from site us, varied lengths:" + " 201" * 12 in run.stdout
    (scenario,) = replies(run, 8)
    assert [s["id"] for s in scenario["servers"]] == ["a100-0", "a100-1"]
    workload = scenario.get("workload")
    assert workload is not None, "the export carries no measured workload"
    # The 13 bookings the coordinator saw: step 6's and the 12 of step 8.
    inputs = [20] + [2 + 7 * i % 19 for i in range(1, 13)]
    outputs = [64] + [8 * (1 + 5 * i % 16) for i in range(1, 13)]
    assert workload["arrival"] == "poisson" and workload["rate_per_s"] > 0
    assert workload["input_tokens"]["mean"] == pytest.approx(sum(inputs) / 13, abs=1e-5)
    assert workload["output_tokens"]["mean"] == pytest.approx(sum(outputs) / 13, abs=1e-5)
    assert workload["input_tokens"]["max"] == 20 and workload["output_tokens"]["max"] == 128
    what_if = "\n".join(run.steps[8].lines)
    solve = what_if[what_if.index("$ bprr solve live.json") : what_if.index("$ bprr simulate")]
    assert "live: auto placement" in solve and "auto chose:" in solve
    assert re.search(r"a100-0 .* \[\d+, 70\)|a100-1 .* \[\d+, 70\)", solve)
    simulate = what_if[what_if.index("$ bprr simulate live.json") :]
    requests = re.search(r"requests\s*│\s*(\d+)", simulate)
    assert requests is not None and int(requests[1]) == workload["num_requests"]
    assert "mean_e2e_ms" in simulate


def test_reply_times_are_rounded_to_a_tenth_of_a_millisecond(run: Run) -> None:
    """Issue 13 point 4: replies carried 2198.2799999999997 ms; the README shows 2198.3."""
    (placement,) = replies(run, 4)
    route, booking = replies(run, 6)
    times = {
        "objective_ms_per_token": placement["objective_ms_per_token"],
        "bound_ms_per_token": placement["bound_ms_per_token"],
    }
    for name, reply in (("route", route), ("booking", booking["route"])):
        for key in ("first_token_ms", "per_token_ms", "total_ms", "wait_ms"):
            times[f"{name}.{key}"] = reply[key]
    unrounded = {k: v for k, v in times.items() if round(v, 1) != v}
    assert not unrounded, f"not rounded to 0.1 ms: {unrounded}"


def test_nothing_is_left_behind(run: Run) -> None:
    database = DATABASE.search(run.stdout)
    listening = LISTENING.search(run.stdout)
    assert database is not None and listening is not None
    assert not Path(database[1]).exists()
    assert port_closed(int(listening[2]))
    assert process_gone(int(listening[3]))


def test_sigterm_stops_the_coordinator_and_removes_the_directory(tmp_path: Path) -> None:
    """KEEP_RUNNING=1 leaves the coordinator up for more curl; stopping the script (Ctrl-C,
    SIGTERM) still removes everything."""
    output = tmp_path / "out.log"
    with output.open("w") as log:
        script = subprocess.Popen(
            ["bash", str(SCRIPT)],
            cwd=tmp_path,
            env=script_env(tmp_path, KEEP_RUNNING="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while "the coordinator stays up" not in output.read_text():
                assert script.poll() is None, output.read_text()[-3000:]
                assert time.monotonic() < deadline, "the walk-through did not finish"
                time.sleep(0.2)
            listening = LISTENING.search(output.read_text())
            assert listening is not None
            assert not port_closed(int(listening[2]))
            assert len(temp_dirs(tmp_path)) == 1
            script.send_signal(signal.SIGTERM)
            assert script.wait(timeout=60) == 143
        finally:
            if script.poll() is None:
                script.kill()
                script.wait()
    assert temp_dirs(tmp_path) == []
    assert port_closed(int(listening[2]))
    assert process_gone(int(listening[3]))


def test_without_bprr_it_says_so_in_one_line(tmp_path: Path) -> None:
    env = script_env(tmp_path, BPRR_BIN=str(tmp_path / "no-such-bprr"))
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert "BPRR_BIN" in done.stderr
    assert temp_dirs(tmp_path) == []
