"""``bprr testbed`` and ``bprr serve --demo`` come from the harness through entry points
(app/plugins.py): found when it is installed, one ``error:`` line saying how to install it
when it is not, or when the client package it needs is missing."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import typer

from app import plugins
from app.cli import cli, main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json")
NO_HARNESS = "needs the harness package bprr-harness: pip install -e harness"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    code = done.value.code
    assert isinstance(code, int)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def without_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    def none_installed(**_selection: Any) -> metadata.EntryPoints:
        return metadata.EntryPoints(())

    monkeypatch.setattr(plugins.metadata, "entry_points", none_installed)


def test_the_harness_registers_both_entry_points() -> None:
    (command,) = metadata.entry_points(group=plugins.COMMANDS_GROUP, name="testbed")
    (demo,) = metadata.entry_points(group=plugins.DEMO_GROUP, name="demo")
    assert command.value.startswith("bprr_harness.") and demo.value.startswith("bprr_harness.")
    assert callable(plugins.load_hook(plugins.DEMO_GROUP, "demo", "--demo"))


def test_the_testbed_command_is_the_harness_s(capsys: pytest.CaptureFixture[str]) -> None:
    group = typer.main.get_command(cli)
    assert "testbed" in group.list_commands(typer.Context(group))  # type: ignore[attr-defined]
    code, _, err = run(["testbed", "/nonexistent/scenario.json"], capsys)
    assert code == 2 and err.startswith("error: /nonexistent/scenario.json: cannot read")


def test_without_the_harness_testbed_is_one_error_line(
    without_harness: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["testbed", "x.json", "--backend", "petals", "-p", "cg"], capsys)
    assert code == 2
    assert err == f"error: bprr testbed {NO_HARNESS}\n"
    main(["--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert "testbed" in listed and "the harness package bprr-harness" in listed  # and why


def test_without_the_harness_the_demo_is_one_error_line(
    without_harness: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["serve", "--demo", EXAMPLE, "--port", "0"], capsys)
    assert code == 2
    assert err == f"error: --demo {NO_HARNESS}\n"
