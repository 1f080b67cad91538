"""The ``bprr-agent`` command line, against the app in-process (through a transport)."""

from __future__ import annotations

import json

import httpx
import pytest
from bprr_client.cli import main
from fastapi.testclient import TestClient

from tests.clients.conftest import BASE, Forward, make_agent, publish, put_model

ROUTE = ["--client-site", "east", "--input-tokens", "10", "--output-tokens", "5"]


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
    capsys: pytest.CaptureFixture[str], forward: Forward | None, *argv: str
) -> tuple[int, str, str]:
    code = main(["--coordinator", BASE, *argv], transport=forward)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "COMMAND"),
        (
            ["route", "--client-site", "east", "--input-tokens", "-3", "--output-tokens", "1"],
            "--input-tokens",
        ),
        (
            ["route", "--client-site", "east", "--input-tokens", "1", "--output-tokens", "0"],
            "--output-tokens",
        ),
        (["book", "--client-site", "east"], "--input-tokens"),
        (["--timeout", "nan", "servers"], "--timeout"),
        (["run", "--site", "east", "--memory-gb", "x"], "--memory-gb"),
        (
            [
                "run",
                "--site",
                "bad site",
                "--memory-gb",
                "8",
                "--decode-ms-per-block",
                "2",
                "--address",
                "h:1",
            ],
            "--site",
        ),
        (
            [
                "run",
                "--site",
                "e",
                "--memory-gb",
                "8",
                "--decode-ms-per-block",
                "2",
                "--address",
                "h:1",
                "--site-target",
                "nohost",
            ],
            "--site-target",
        ),
        (
            [
                "run",
                "--site",
                "e",
                "--memory-gb",
                "8",
                "--decode-ms-per-block",
                "2",
                "--address",
                "h:1",
                "--",
                "--torch_dtype",
                "float16",
            ],
            "--petals-model",
        ),
        (["release", "s", "--", "x"], "unexpected"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = run(capsys, None, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bprr-agent: error:") and needle in err


def test_route_book_release_and_servers(
    app: TestClient, forward: Forward, capsys: pytest.CaptureFixture[str]
) -> None:
    online_swarm(app, forward)
    code, out, _ = run(capsys, forward, "route", *ROUTE)
    assert code == 0
    route = json.loads(out)
    assert route["hops"][0]["start"] == 0 and route["hops"][-1]["end"] == 8
    code, out, _ = run(capsys, forward, "book", *ROUTE)
    assert code == 0
    session = json.loads(out)
    held = {s["id"]: s["reserved_slots"] for s in app.get("/v1/servers").json()}
    assert sum(held.values()) > 0
    code, out, _ = run(capsys, forward, "servers")
    assert code == 0 and {s["id"] for s in json.loads(out)} == {"s0", "s1", "s2"}
    if session.get("token"):  # the session's token (returned once) authorises its release
        code, _, err = run(capsys, forward, "release", session["id"])
        assert code == 1 and "token" in err
        release = ("release", session["id"], "--token", session["token"])
    else:
        release = ("release", session["id"])
    code, out, _ = run(capsys, forward, *release)
    assert code == 0 and json.loads(out) == {"released": session["id"]}
    assert all(s["reserved_slots"] == 0 for s in app.get("/v1/servers").json())
    code, _, err = run(capsys, forward, *release)
    assert code == 1 and "does not exist" in err


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
