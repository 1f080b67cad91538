"""One style for the ``bprr`` commands: the version, fixed choices, and consoles.

* ``--version`` prints ``bprr <version>`` from the installed distribution's metadata.
* Fixed choices are ``StrEnum`` options: typer lists them in ``--help`` (``<a|b|c>``), and a
  bad value becomes one line, ``error: --option: 'x' is not one of a, b, c`` (exit status 2);
  any other bad value ``error: --option: what is wrong``.
* Results go to :func:`output_console`: a terminal gets rich's usual width, a file or a pipe
  gets lines as long as they need (never cut or wrapped at 80 columns).
* Progress goes to :func:`progress_console` (stderr): a live bar on a terminal, plain lines
  elsewhere (see app/simulation/studies.py).
"""

from __future__ import annotations

import enum
import re
from importlib import metadata

import typer
from rich.console import Console

DISTRIBUTION = "bprr"
# A file or a pipe has no width: tables take their natural width, text is not wrapped.
UNLIMITED_WIDTH = 100_000


class UserError(Exception):
    """A problem with the user's input: ``bprr`` reports it in one ``error:`` line, exit
    status 2. Here (not in app/cli.py) so that command modules can raise it without importing
    the CLI that imports them."""


def package_version() -> str:
    """The installed distribution's version (a source tree that was never installed: 'unknown')."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run `make` or `pip install -e .`)"


def print_version(value: bool) -> None:
    """Eager ``--version`` callback: print ``bprr <version>`` and stop."""
    if value:
        print(f"bprr {package_version()}")
        raise typer.Exit(0)


def output_console() -> Console:
    """A console on stdout, full width when stdout is not a terminal."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=UNLIMITED_WIDTH, soft_wrap=True)


def progress_console() -> Console:
    """A console on stderr for progress (plain lines when stderr is not a terminal)."""
    console = Console(stderr=True)
    if console.is_terminal:
        return console
    return Console(stderr=True, width=UNLIMITED_WIDTH, soft_wrap=True)


_NOT_ONE_OF = re.compile(r"'(.*)' is not one of ")


def bad_parameter_message(error: typer.BadParameter) -> str:
    """One line in the project's style, ``--option: what is wrong``. A value outside an enum's
    choices: ``--option: 'x' is not one of a, b, c`` (typer's own wording, without quotes around
    every choice and without pydantic's "Value error, " prefix)."""
    param = error.param
    if param is None or type(error) is not typer.BadParameter:  # e.g. a missing argument
        return error.format_message()
    long_names = [opt for opt in param.opts if opt.startswith("--")]
    name = long_names[0] if long_names else str(param.metavar or param.name or "").upper()
    descriptor = getattr(param, "type_descriptor", None)
    choices = getattr(descriptor, "annotation", None)
    found = _NOT_ONE_OF.search(error.message)
    if isinstance(choices, type) and issubclass(choices, enum.Enum) and found is not None:
        allowed = ", ".join(str(member.value) for member in choices)
        return f"{name}: {found.group(1)!r} is not one of {allowed}"
    detail = error.message.removeprefix("Value error, ")  # pydantic's prefix says nothing
    return f"{name}: {detail}"
