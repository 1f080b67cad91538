"""``bprr serve --demo`` refuses bad input with one ``error:`` line (exit 2) before starting
anything, and says how to install the client package when it is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    code = done.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


def test_without_the_client_package_the_demo_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("bprr_harness.demo.runner", "bprr_harness.demo.swarm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "bprr_client", None)  # import bprr_client fails
    code, err = run(["serve", "--demo", EXAMPLE, "--port", "0"], capsys)
    assert code == 2
    assert err.strip() == (
        "error: --demo needs the client package bprr_client: pip install -e clients/python"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--demo-speed", "0"], "error: --demo-speed: must be a positive number, got 0.0"),
        (["--database-url", "sqlite:///x.db"], "error: --database-url: the demo runs on its own"),
        (["--workers", "2"], "error: --workers: the demo runs one coordinator process"),
        (["--port", "70000"], "error: --port: must be between 0 and 65535"),
    ],
)
def test_bad_demo_options_are_one_error_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["serve", "--demo", EXAMPLE, *extra], capsys)
    assert code == 2
    assert err.startswith(message)
    assert len(err.strip().splitlines()) == 1


def test_a_bad_scenario_is_one_error_line_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    code, err = run(["serve", "--demo", str(missing), "--port", "0"], capsys)
    assert code == 2 and "cannot read scenario file" in err
    bad = tmp_path / "bad.json"
    bad.write_text(Path(EXAMPLE).read_text().replace('"memory_gb": 9.1', '"memory_gb": -1', 1))
    code, err = run(["serve", "--demo", str(bad), "--port", "0"], capsys)
    assert code == 2
    assert err.startswith("error: ") and "servers[2].memory_gb" in err
    assert len(err.strip().splitlines()) == 1
