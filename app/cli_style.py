"""One style for the ``bprr`` commands: the version, fixed choices, and consoles.

* ``--version`` prints ``bprr <version>`` from the installed distribution's metadata.
* Fixed choices are ``StrEnum`` options: typer lists them in ``--help`` (``<a|b|c>``), and a
  bad value becomes one line, ``error: --option: unknown <noun> 'x' (choose from a, b, c)``,
  where the noun is the enum's class name in words (``ServiceModel`` -> "service model").
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


def enum_noun(choices: type[enum.Enum]) -> str:
    """``ServiceModel`` -> "service model": how an error names the enum's kind of value."""
    return " ".join(word.lower() for word in re.findall(r"[A-Z][a-z0-9]*", choices.__name__))


_NOT_ONE_OF = re.compile(r"'(.*)' is not one of ")


def bad_parameter_message(error: typer.BadParameter) -> str:
    """One line in the project's style, ``--option: what is wrong``. A value outside an enum's
    choices: ``--option: unknown <noun> 'x' (choose from a, b, c)``."""
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
        return f"{name}: unknown {enum_noun(choices)} {found.group(1)!r} (choose from {allowed})"
    detail = error.message.removeprefix("Value error, ")  # pydantic's prefix says nothing
    return f"{name}: {detail}"
