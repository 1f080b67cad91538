"""The ``bprr-agent`` command line, against the app in-process (through a transport)."""

from __future__ import annotations

import json
from importlib import metadata

import httpx
import pytest
import typer
from bprr_client.cli import app, main
from fastapi.testclient import TestClient

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


def test_shell_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    # typer's --show-completion: the script for the named shell, naming this program.
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
    # The session's token (returned once) authorises its release.
    code, _, err = run(capsys, forward, "release", session["id"])
    assert code == 1 and "token" in err
    release = ("release", session["id"], "--token", session["token"])
    code, out, _ = run(capsys, forward, *release)
    assert code == 0 and json.loads(out) == {"released": session["id"]}
    assert all(s["reserved_slots"] == 0 for s in app.get("/v1/servers").json())
    code, _, err = run(capsys, forward, *release)
    assert code == 1 and "does not exist" in err


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
    assert lines[-1].startswith("error: ") and "full" in lines[-1]


def test_a_booking_in_the_coordinators_queue_says_so_once(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    fill(app, forward, capsys)
    # The coordinator holds each attempt for --wait-s (1.5 s > the 1 s before the notice).
    code, _, err = run(capsys, forward, "book", *ROUTE, "--wait-s", "1.5", sleep=lambda _s: None)
    queued = [line for line in err.splitlines() if "in the coordinator's queue" in line]
    assert code == 1
    assert queued == [
        "bprr-agent: waiting for a free chain (in the coordinator's queue, up to 1.5 s)"
    ]


def test_a_request_the_coordinator_rejects_is_exit_2(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    code, _, err = run(capsys, forward, "route", *ROUTE[:1], "mars", *ROUTE[2:])
    assert code == 2 and err.startswith("error:") and "client_site" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_coordinator_is_exit_1(
    forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    forward.fail = [httpx.ConnectError("refused")] * 10
    code, _, err = run(capsys, forward, "servers")
    assert code == 1 and "unreachable" in err
    forward.fail = [httpx.ConnectError("refused")] * 10
    code, _, err = run(capsys, forward, "route", *ROUTE, sleep=lambda _s: None)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: coordinator unreachable")
    assert all(
        line.startswith("bprr-agent: coordinator unreachable (retry in") for line in lines[:-1]
    )
