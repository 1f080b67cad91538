"""The ``bprr-agent`` command line, against the app in-process (through a transport)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from importlib import metadata

import httpx
import pytest
import typer
from bprr_client._cli_style import QUEUE_NOTICE_AFTER_S, exit_status
from bprr_client.cli import app, main
from fastapi.testclient import TestClient

from tests.api.conftest import JOIN
from tests.clients.conftest import BASE, Forward, make_agent, publish, put_model

ROUTE = ["--client-site", "east", "--input-tokens", "10", "--output-tokens", "5"]
RUN = ["run", "--site", "e", "--memory-gb", "8", "--decode-ms-per-block", "2", "--address", "h:1"]


def online_swarm(app: TestClient, forward: Forward) -> None:
    put_model(app)
    agents = [make_agent(forward, i) for i in range(3)]
    for agent in agents:
        agent.tick()
    publish(app)
    for agent in agents:
        agent.tick()
        agent.tick()


def run(
    capsys: pytest.CaptureFixture[str], forward: Forward | None, *argv: str, **hooks: object
) -> tuple[int, str, str]:
    code = main(["--coordinator", BASE, *argv], transport=forward, **hooks)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["route", "--client-site", "east", "--input-tokens", "-3", "--output-tokens", "1"],
            "--input-tokens: -3 must be >= 0",
        ),
        (
            ["route", "--client-site", "east", "--input-tokens", "1", "--output-tokens", "0"],
            "--output-tokens: 0 must be >= 1",
        ),
        (["book", "--client-site", "east"], "--input-tokens"),
        (["book", *ROUTE, "--wait-s", "-1"], "--wait-s: -1.0 must be >= 0"),
        (["--timeout", "nan", "servers"], "--timeout: nan must be > 0"),
        (["servers", "--timeout", "0"], "--timeout: 0.0 must be > 0"),
        (["servers", "--coordinator", "ftp://host"], "--coordinator: 'ftp://host' is not"),
        (["run", "--site", "east", "--memory-gb", "x"], "--memory-gb"),
        (["run", "--site", "bad site", *RUN[3:]], "--site"),
        ([*RUN, "--probe", "udp"], "--probe: 'udp' is not one of tcp, http"),
        ([*RUN, "--site-target", "nohost"], "--site-target: 'nohost' is not SITE=HOST:PORT"),
        ([*RUN, "--site-target", "w=h"], "--site-target: w='h' is not HOST:PORT"),
        ([*RUN, "--site-target", "w=[::1]:0"], "port '0' is not 1..65535"),
        ([*RUN[:-1], "nocolon"], "--address: 'nocolon' is not HOST:PORT"),
        ([*RUN[:-1], ":80"], "--address: ':80' is not HOST:PORT (no host)"),
        ([*RUN[:-1], "h:65536"], "port '65536' is not 1..65535"),
        ([*RUN[:-1], "::1:80"], "an IPv6 host goes in brackets"),
        (["--timeout", "1e10", "servers"], "--timeout: 10000000000.0 must be <= 3600"),
        (["book", *ROUTE, "--wait-s", "500e10"], "--wait-s: 5000000000000.0 must be <= 3600"),
        ([*RUN, "--probe-interval", "1e308"], "--probe-interval: 1e+308 must be <= 86400"),
        ([*RUN, "--petals-ready-after", "1e9"], "--petals-ready-after: 1000000000.0 must be <="),
        (["run", "--site", "e", "--memory-gb", "1e300", *RUN[4:]], "--memory-gb: 1e+300 must"),
        ([*RUN, "--network-mbps", "1e13"], "--network-mbps: 10000000000000.0 must be <="),
        (["servers", "--coordinator", "localhost:99999"], "port 99999 is not 1..65535"),
        (["book", "--client-site", "bad site!", *ROUTE[2:]], "--client-site: string does not"),
        ([*RUN, "--", "--torch_dtype", "float16"], "--petals-model"),
        ([*RUN, "--petals-cli"], "--petals-cli: give --petals-model too"),
        ([*RUN, "--simulate-host", "--petals-model", "m"], "--simulate-host"),
        (["release", "s", "--", "x"], "unexpected"),
        (["nosuch"], "No such command"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = run(capsys, None, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bprr-agent: error:") and needle in err


def test_bracketed_ipv6_addresses_are_taken(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked, then refused further on for another reason: the address itself passed.
    code, _, err = run(capsys, None, *RUN[:-1], "[::1]:31337", "--petals-cli")
    assert code == 2 and "--address" not in err and "--petals-cli" in err


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert "Usage: bprr-agent" in out and "book" in out and err == ""


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"bprr-agent {metadata.version('bprr-client')}"


def test_every_option_of_every_command_has_help() -> None:
    group = typer.main.get_command(app)
    commands = getattr(group, "commands", {})
    assert set(commands) == {"run", "route", "book", "release", "servers"}
    missing = [
        f"{name} {param.name}"
        for name, command in [("bprr-agent", group), *commands.items()]
        for param in command.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert missing == []
    completion = {opt for param in group.params for opt in param.opts}
    assert {"--version", "--install-completion", "--show-completion"} <= completion


def test_every_command_takes_the_connection_options_after_it() -> None:
    # Declared once (with_connection_options), not per command.
    group = typer.main.get_command(app)
    for name, command in getattr(group, "commands", {}).items():
        names = {opt for param in command.params for opt in param.opts}
        assert {"--coordinator", "--timeout", "--verbose", "-v"} <= names, name


def test_shell_completion_script(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # typer's --show-completion: the script for the named shell, naming this program. With
    # shellingham installed typer would detect the shell from the process tree instead (and
    # find none under some parents): the named shell makes the test independent of that.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    with pytest.raises(SystemExit) as done:
        main(["--show-completion", "bash"])
    assert done.value.code == 0
    out, _ = capsys.readouterr()
    assert "_BPRR_AGENT_COMPLETE" in out and "complete" in out


@pytest.mark.parametrize(
    ("before", "after", "environment", "expected"),
    [
        ("before:1", None, None, "http://before:1/v1/servers"),
        (None, "127.0.0.1:8080", None, "http://127.0.0.1:8080/v1/servers"),
        ("before:1", "https://after:2/", None, "https://after:2/v1/servers"),
        (None, None, "from-env:3", "http://from-env:3/v1/servers"),
        ("before:1", None, "from-env:3", "http://before:1/v1/servers"),
    ],
)
def test_the_coordinator_option_goes_anywhere_and_defaults_to_http(
    app: TestClient,
    forward: Forward,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    before: str | None,
    after: str | None,
    environment: str | None,
    expected: str,
) -> None:
    if environment is None:
        monkeypatch.delenv("BPRR_COORDINATOR", raising=False)
    else:
        monkeypatch.setenv("BPRR_COORDINATOR", environment)
    argv = [*(["--coordinator", before] if before else []), "servers"]
    argv += ["--coordinator", after] if after else []
    code = main(argv, transport=forward)
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out) == []
    assert [str(request.url) for request in forward.requests] == [expected]


def test_route_book_release_and_servers(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    code, out, _ = run(capsys, forward, "route", *ROUTE)
    assert code == 0
    route = json.loads(out)
    assert route["hops"][0]["start"] == 0 and route["hops"][-1]["end"] == 8
    code, out, err = run(capsys, forward, "book", *ROUTE)
    assert code == 0 and err == ""  # booked at once: nothing said about waiting
    session = json.loads(out)
    held = {s["id"]: s["reserved_slots"] for s in app.get("/v1/servers").json()}
    assert sum(held.values()) > 0
    code, out, _ = run(capsys, forward, "servers")
    assert code == 0 and {s["id"] for s in json.loads(out)} == {"s0", "s1", "s2"}
    # The session's token (returned once) authorises its release: without it (401) or with
    # another (403) the request is wrong, exit 2.
    code, _, err = run(capsys, forward, "release", session["id"])
    assert code == 2 and err.startswith("bprr-agent: error: ") and "token" in err
    code, _, err = run(capsys, forward, "release", session["id"], "--token", "not-it")
    assert code == 2 and err.startswith("bprr-agent: error: ") and len(err.splitlines()) == 1
    release = ("release", session["id"], "--token", session["token"])
    code, out, _ = run(capsys, forward, *release)
    assert code == 0 and json.loads(out) == {"released": session["id"]}
    assert all(s["reserved_slots"] == 0 for s in app.get("/v1/servers").json())
    # Released twice: the coordinator's reason, not a guess.
    code, _, err = run(capsys, forward, *release)
    assert code == 2
    assert (
        err == f"bprr-agent: error: session {session['id']!r} does not exist (it ended: released)\n"
    )


def fill(app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]) -> int:
    """Book until the swarm refuses; the number booked."""
    for booked in range(1000):
        code, _, _ = run(capsys, forward, "book", *ROUTE, sleep=lambda _s: None)
        if code != 0:
            return booked
    raise AssertionError("the swarm never filled up")


def test_a_booking_that_waits_says_so(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    assert fill(app, forward, capsys) > 0
    pauses: list[float] = []
    code, out, err = run(capsys, forward, "book", *ROUTE, sleep=pauses.append)
    lines = err.strip().splitlines()
    # Every retry after the coordinator's 503 + Retry-After is one line, then the refusal.
    assert code == 1 and out == "" and pauses
    assert lines[:-1] == [
        f"bprr-agent: waiting for a free chain (retry in {pause:.1f} s)" for pause in pauses
    ]
    assert lines[-1].startswith("bprr-agent: error: ") and "full" in lines[-1]


class FiredAtOnce:
    """A timer that fires when it is started (each request a booking sends): no wall clock."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay_s: float, action: Callable[[], None]) -> FiredAtOnce:
        self.delays.append(delay_s)
        action()
        return self

    def cancel(self) -> None:
        return None


def test_a_booking_in_the_coordinators_queue_says_so_once(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    fill(app, forward, capsys)
    timer = FiredAtOnce()
    forward.requests.clear()
    code, _, err = run(
        capsys, forward, "book", *ROUTE, "--wait-s", "0.2", sleep=lambda _s: None, timer=timer
    )
    queued = [line for line in err.splitlines() if "in the coordinator's queue" in line]
    assert code == 1
    # The refusals were retried; once said, the notice is not started again.
    assert sum(request.method == "POST" for request in forward.requests) > 1
    assert timer.delays == [QUEUE_NOTICE_AFTER_S]
    assert queued == [
        "bprr-agent: waiting for a free chain (in the coordinator's queue, up to 0.2 s)"
    ]


def test_a_request_the_coordinator_rejects_is_exit_2(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    code, _, err = run(capsys, forward, "route", *ROUTE[:1], "mars", *ROUTE[2:])
    assert err == "bprr-agent: error: client_site: unknown site 'mars'\n" and code == 2


def test_the_coordinators_log_lines_are_kept_apart(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str], app_log: io.StringIO
) -> None:
    online_swarm(app, forward)  # the model change is audited: a structlog line
    code, out, err = run(capsys, forward, "servers")
    assert code == 0 and err == "" and len(json.loads(out)) == 3
    assert "audit" in app_log.getvalue() and "model_changed" in app_log.getvalue()


def test_a_url_that_is_not_a_bprr_coordinator_says_so(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    # The in-process app serves nothing under /elsewhere: FastAPI's bare 404 Not Found.
    code = main(["--coordinator", f"{BASE}/elsewhere", "servers"], transport=forward)
    _, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"bprr-agent: error: {BASE}/elsewhere answered 404 Not Found")
    assert "does not look like a bprr coordinator (check --coordinator)" in err


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["servers"], 2, "BPRR_COORDINATOR: 'ftp://nowhere' is not an http(s) URL"),
        (["servers", "--coordinator", BASE], 0, ""),
        (["--coordinator", BASE, "servers"], 0, ""),
        (["--help"], 0, ""),
        (["servers", "--help"], 0, ""),
    ],
)
def test_a_bad_coordinator_variable_spoils_only_what_uses_it(
    forward: Forward,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    code: int,
    said: str,
) -> None:
    monkeypatch.setenv("BPRR_COORDINATOR", "ftp://nowhere")
    assert main(argv, transport=forward) == code
    _, err = capsys.readouterr()
    assert err == (f"bprr-agent: error: {said} (e.g. 127.0.0.1:8080)\n" if said else "")


def test_an_unreachable_coordinator_is_exit_1(
    forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    forward.fail = [httpx.ConnectError("refused")] * 10
    code, _, err = run(capsys, forward, "servers")
    assert code == 1 and "unreachable" in err
    forward.fail = [httpx.ConnectError("refused")] * 10
    code, _, err = run(capsys, forward, "route", *ROUTE, sleep=lambda _s: None)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("bprr-agent: error: coordinator unreachable")
    assert all(
        line.startswith("bprr-agent: coordinator unreachable (retry in") for line in lines[:-1]
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--join-token", "wrong"], "registration refused (join token?): "),
        (["--id", "bad id!!", "--join-token", JOIN], "registration refused (422): id: "),
    ],
)
def test_a_registration_the_coordinator_refuses_is_one_error_line_and_exit_2(
    app: TestClient,
    forward: Forward,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    said: str,
) -> None:
    code, out, err = run(capsys, forward, *RUN, "--no-peers", "--simulate-host", *argv)
    lines = err.splitlines()
    assert code == 2 and out == ""
    # The simulated host's warning, then the refusal said once (not logged, then printed).
    assert len(lines) == 2 and lines[0].startswith("bprr-agent: warning: --simulate-host")
    assert lines[1].startswith(f"bprr-agent: error: agent stopped: {said}"), lines


def test_a_registration_is_retried_after_a_500_then_refused(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    forward.fail = [(500, {})]
    code, _, err = run(
        capsys, forward, *RUN, "--no-peers", "--simulate-host", "--join-token", "wrong"
    )
    lines = err.splitlines()
    assert code == 2 and lines[1] == "bprr-agent: warning: coordinator unavailable: 500: injected"
    assert lines[2].startswith("bprr-agent: error: agent stopped: registration refused")


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, 2), (401, 2), (403, 2), (404, 2), (409, 2), (422, 2), (408, 1), (429, 1), (500, 1)],
)
def test_exit_status_of_a_coordinator_answer(status: int, code: int) -> None:
    # 4xx: the request (the options) is wrong; 5xx, over quota, timed out: try later.
    assert exit_status(status) == code


def test_a_wait_over_the_coordinators_limit_is_its_422(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    # The client allows the coordinator's hard ceiling (3600 s); this one is set to 300.
    online_swarm(app, forward)
    code, out, err = run(capsys, forward, "book", *ROUTE, "--wait-s", "500")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("bprr-agent: error: wait_s: ") and "300" in err
