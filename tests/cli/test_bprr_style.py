"""One style for ``bprr``: --version, shell completion, choices as enums with one error line,
help on every option, and result tables at full width in files and pipes."""

from __future__ import annotations

import enum
import json
from importlib import metadata

import pytest
import typer
import typer.completion

from app.allocation.solve import ALGORITHMS
from app.cli import Algorithm, cli, main
from app.cli_style import bad_parameter_message
from app.profiler.arch import PRESETS, ArchError, custom_arch
from app.profiler.commands import BYTES, QUANT_BYTES, BlockStyle, Dtype, Preset, Quantization
from app.simulation.commands import Policy, ServiceModel, StudyName
from app.simulation.policies import POLICIES
from app.simulation.service import SERVICE_MODELS
from app.simulation.studies import STUDIES
from tests.scenarios import CLUSTERED


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--version"], capsys)
    assert code == 0 and err == ""
    assert out == f"bprr {metadata.version('bprr')}\n"


def test_show_completion_prints_a_script_for_bprr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    code, out, _ = run(["--show-completion"], capsys)
    assert code == 0
    assert "_BPRR_COMPLETE=complete_bash" in out and "complete -o default" in out


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("bprr sim", {"simulate"}),
        ("bprr simulate x --policy cg-w", {"cg-wsrr", "cg-wsrr-profile"}),
        ("bprr solve x --algorithm c", {"chains", "cg"}),
        ("bprr experiment l", {"lmax"}),
    ],
)
def test_completion_offers_commands_and_choices(
    words: str,
    expected: set[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("_BPRR_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - 1))
    code, out, _ = run([], capsys)
    assert code == 0
    assert set(out.split()) == expected


@pytest.mark.parametrize(
    ("choices", "values"),
    [
        (Algorithm, ALGORITHMS),
        (Policy, POLICIES),
        (ServiceModel, SERVICE_MODELS),
        (StudyName, tuple(STUDIES)),
        (Preset, tuple(PRESETS)),
        (Quantization, ("none", *QUANT_BYTES)),
        (Dtype, tuple(BYTES)),
    ],
)
def test_choice_enums_match_what_the_domain_accepts(
    choices: type[enum.Enum], values: tuple[str, ...]
) -> None:
    assert sorted(member.value for member in choices) == sorted(values)


def test_block_styles_are_the_ones_the_profiler_builds() -> None:
    for style in BlockStyle:
        assert custom_arch(None, hidden=64, heads=2, style=style.value).hidden == 64
    with pytest.raises(ArchError):
        custom_arch(None, hidden=64, heads=2, style="gpt")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["simulate", str(CLUSTERED), "--policy", "nope"],
            "error: --policy: 'nope' is not one of "
            + ", ".join(member.value for member in Policy)
            + "\n",
        ),
        (
            ["simulate", str(CLUSTERED), "-p", "CG-WSRR"],
            "error: --policy: 'CG-WSRR' is not one of "
            + ", ".join(member.value for member in Policy)
            + "\n",
        ),
        (
            ["simulate", str(CLUSTERED), "--service-model", "vllm"],
            "error: --service-model: 'vllm' is not one of paper, batched\n",
        ),
        (
            ["solve", str(CLUSTERED), "-a", "magic"],
            "error: --algorithm: 'magic' is not one of auto, chains, cg, milp, petals\n",
        ),
        (
            ["experiment", "nope"],
            "error: NAME: 'nope' is not one of " + ", ".join(STUDIES) + "\n",
        ),
        (
            ["profile", "--hidden", "64", "--heads", "2", "--dtype", "fp8"],
            "error: --dtype: 'fp8' is not one of fp32, bf16, fp16\n",
        ),
    ],
)
def test_a_bad_choice_is_one_error_line_and_exit_2(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err == line


def test_other_bad_values_name_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["solve", str(CLUSTERED), "--concurrency", "many"], capsys)
    assert code == 2
    assert err.startswith("error: --concurrency: ") and err.count("\n") == 1
    assert "integer" in err and "Value error" not in err


def test_a_bad_parameter_without_a_parameter_keeps_its_message() -> None:
    assert bad_parameter_message(typer.BadParameter("no good")) == "Invalid value: no good"


def test_every_option_and_argument_has_help() -> None:
    group = typer.main.get_command(cli)
    assert {"version", "install_completion", "show_completion"} <= {p.name for p in group.params}
    missing = [
        f"{name} {param.name}"
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for param in command.params
        if not getattr(param, "help", None)
    ]
    assert missing == []


def test_help_lists_the_choices(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 250)  # no wrapping inside the metavar
    code, out, _ = run(["simulate", "--help"], capsys)
    assert code == 0
    assert "<" + "|".join(member.value for member in Policy) + ">" in out
    assert "<paper|batched>" in out


def test_tables_in_a_file_are_not_cut_at_80_columns(capsys: pytest.CaptureFixture[str]) -> None:
    # capsys is not a terminal: the chains table (long hop lists) keeps every hop on one line.
    code, out, _ = run(["solve", str(CLUSTERED), "-a", "chains"], capsys)
    assert code == 0
    assert "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│") and " -> " in line]
    assert rows and max(len(line) for line in rows) > 80
    blocks = json.loads(CLUSTERED.read_text(encoding="utf-8"))["model"]["num_blocks"]
    for line in rows:  # each hop list whole on its row: it ends at the model's last block
        assert line.rstrip(" │").endswith(f",{blocks})")
