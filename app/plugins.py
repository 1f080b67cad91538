"""What other distributions add to ``bprr``, found through entry points and imported only when
used, so that the coordinator imports cleanly without them and never imports them back.

The harness (``harness/``, distribution ``bprr-harness``) registers:

* group ``bprr.commands``: ``testbed`` -> a ``register(cli: typer.Typer)`` adding
  ``bprr testbed``; ``PluginGroup`` (bprr's command group) loads it when the command is
  named, listed (``--help``) or completed;
* group ``bprr.demo``: ``demo`` -> the function ``bprr serve --demo`` calls
  (``load_hook``).

Without the harness, ``bprr testbed`` and ``bprr serve --demo`` say how to install it in one
``error:`` line (exit status 2).
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

from app.cli_style import UserError

if TYPE_CHECKING:  # typer 0.29 ships its own click; its types are named only there
    from typer._click.core import Command, Context

COMMANDS_GROUP = "bprr.commands"
DEMO_GROUP = "bprr.demo"
HARNESS = "the harness package bprr-harness: pip install -e harness"
CLIENT = "the client package bprr_client: pip install -e clients/python"
# The harness's commands, listed (with how to install it) even when it is not installed.
HARNESS_COMMANDS = ("testbed",)


def _entry_point(group: str, name: str) -> metadata.EntryPoint | None:
    return next(iter(metadata.entry_points(group=group, name=name)), None)


def _load(entry: metadata.EntryPoint, what: str) -> Any:
    try:
        return entry.load()
    except ImportError as error:
        if (error.name or "").startswith("bprr_client"):
            raise UserError(f"{what} needs {CLIENT}") from None
        raise UserError(f"{what}: {entry.value} cannot be imported ({error})") from None


def load_hook(group: str, name: str, what: str) -> Any:
    """The object that entry point ``name`` of ``group`` names, imported now. ``what`` (e.g.
    ``--demo``) heads the ``UserError`` when no installed distribution provides it or it
    cannot be imported."""
    entry = _entry_point(group, name)
    if entry is None:
        raise UserError(f"{what} needs {HARNESS}")
    return _load(entry, what)


def _unavailable(name: str, message: str) -> TyperCommand:
    """A command that takes any arguments and only says why it cannot run."""

    def fail() -> None:
        raise UserError(message)

    return TyperCommand(
        name,
        callback=fail,
        help=f"({message})",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


class PluginGroup(TyperGroup):
    """bprr's command group: its own commands, then those of entry-point group
    ``bprr.commands``, each imported the first time it is looked up."""

    def list_commands(self, ctx: Context) -> list[str]:
        names = list(super().list_commands(ctx))
        found = [entry.name for entry in metadata.entry_points(group=COMMANDS_GROUP)]
        for name in [*found, *HARNESS_COMMANDS]:
            if name not in names:
                names.append(name)
        return names

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        entry = _entry_point(COMMANDS_GROUP, cmd_name)
        if entry is None:
            if cmd_name not in HARNESS_COMMANDS:
                return None
            return _unavailable(cmd_name, f"bprr {cmd_name} needs {HARNESS}")
        plugin = typer.Typer()
        try:
            _load(entry, f"bprr {cmd_name}")(plugin)
        except UserError as error:
            return _unavailable(cmd_name, str(error))
        command = typer.main.get_command(plugin)
        command.name = cmd_name
        self.commands[cmd_name] = command
        return command
