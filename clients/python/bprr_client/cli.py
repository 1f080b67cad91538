"""``bprr-agent``: run a server agent, or query routes and sessions.

    bprr-agent [--coordinator URL] run --site S --memory-gb G --decode-ms-per-block D \\
        --address HOST:PORT [--site-target SITE=HOST:PORT ...] [-- PETALS ARGS]
        [--petals-model DIR --petals-python .venv-petals/bin/python --petals-port P
         --petals-dht-prefix NAME (--petals-new-swarm | --petals-initial-peer MADDR ...)]
    bprr-agent run ... --speeds-file PROFILE.json   (``bprr profile --json`` output)
    bprr-agent route --client-site S --input-tokens N --output-tokens N
    bprr-agent book  --client-site S --input-tokens N --output-tokens N [--wait-s W]
    bprr-agent release SESSION_ID [--token SESSION_TOKEN]
    bprr-agent servers

The same style as ``bprr`` (typer): ``--version``, shell completion, help on every option,
fixed choices as enums. ``--coordinator`` (or BPRR_COORDINATOR), ``--timeout`` and ``-v`` go
before or after the command; a URL without a scheme is taken as ``http://``. Replies are
printed as JSON. Bad arguments or a request the coordinator rejects as invalid: one ``error:``
line, exit 2; the coordinator unreachable or unable to serve: exit 1.

This package must not import the coordinator (``app``): the style is copied, not shared. It
runs under PETALS' interpreter too (pydantic 1.10), hence typer 0.28 there (see pyproject).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Annotated, Any

import httpx
import typer

from bprr_client._agent_cli import RunOptions, SpeedsFile, read_speeds, run_command
from bprr_client._cli_style import (
    DEFAULT_COORDINATOR,
    PROG,
    BookingNotices,
    CoordinatorOption,
    Invocation,
    TimeoutOption,
    UsageError,
    VerboseOption,
    bad_parameter_message,
    coordinator_url,
    count_at_least,
    invocation_of,
    non_negative,
    positive,
)
from bprr_client.http import CoordinatorError, CoordinatorUnreachable, raise_for_status
from bprr_client.models import Server, WireModel
from bprr_client.routes import RouteClient

__all__ = ["PROG", "RunOptions", "SpeedsFile", "UsageError", "app", "main", "read_speeds"]

DISTRIBUTION = "bprr-client"

app = typer.Typer(
    name=PROG,
    help="bprr's server agent and route client: run a GPU server's agent, or ask the "
    "coordinator for routes and sessions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _print_version(value: bool) -> None:
    if value:
        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            version = "unknown (not installed; run `make` or `pip install -e clients/python`)"
        print(f"{PROG} {version}")
        raise typer.Exit(0)


@app.callback()
def _group(
    ctx: typer.Context,
    coordinator: Annotated[
        str,
        typer.Option(
            "--coordinator",
            metavar="URL",
            envvar="BPRR_COORDINATOR",
            help="Coordinator URL; http:// is assumed without a scheme. "
            "May also follow the command.",
        ),
    ] = DEFAULT_COORDINATOR,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            callback=positive,
            help="HTTP timeout in seconds (connecting: at most 3 s). May also follow the command.",
        ),
    ] = 10.0,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Log details at INFO level. May also follow the command."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the version of bprr-agent and exit.",
        ),
    ] = False,
) -> None:
    """bprr's server agent and route client."""
    invocation = ctx.ensure_object(Invocation)
    invocation.coordinator = coordinator_url(coordinator, "--coordinator")
    invocation.timeout_s = timeout
    invocation.verbose = verbose


def _no_extra(invocation: Invocation) -> None:
    if invocation.extra:
        raise UsageError(f"unexpected arguments after --: {' '.join(invocation.extra)}")


def _timeout(invocation: Invocation) -> httpx.Timeout:
    return httpx.Timeout(invocation.timeout_s, connect=min(invocation.timeout_s, 3.0))


def _print(model: WireModel | list[Server]) -> None:
    if isinstance(model, list):
        print(json.dumps([m.to_json() for m in model], indent=2))
    else:
        print(model.dumps(indent=2))


app.command(
    "run",
    epilog="Arguments after `--` are passed to PETALS verbatim (with --petals-model).",
)(run_command)


# --- route, book, release, servers ----------------------------------------------------------

ClientSite = Annotated[
    str, typer.Option("--client-site", help="The client's site (where the request comes from).")
]
InputTokens = Annotated[
    int,
    typer.Option(
        "--input-tokens", callback=count_at_least(0), help="Prompt length in tokens (>= 0)."
    ),
]
OutputTokens = Annotated[
    int,
    typer.Option("--output-tokens", callback=count_at_least(1), help="Tokens to generate (>= 1)."),
]


@contextmanager
def _route_client(invocation: Invocation, notices: BookingNotices) -> Iterator[RouteClient]:
    """A RouteClient whose waits are said on stderr (``notices``)."""
    with httpx.Client(
        base_url=invocation.coordinator,
        timeout=_timeout(invocation),
        transport=invocation.transport,
        event_hooks=notices.event_hooks(),
    ) as http:
        try:
            yield RouteClient(http_client=http, timeout=_timeout(invocation), sleep=notices.sleep)
        finally:
            notices.cancel()


@app.command("route")
def route_command(
    ctx: typer.Context,
    client_site: ClientSite,
    input_tokens: InputTokens,
    output_tokens: OutputTokens,
    coordinator: CoordinatorOption = None,
    timeout: TimeoutOption = None,
    verbose: VerboseOption = False,
) -> None:
    """The best route right now (nothing is reserved)."""
    invocation = invocation_of(ctx, coordinator, timeout, verbose)
    _no_extra(invocation)
    notices = BookingNotices("waiting for a route", invocation.sleep)
    with _route_client(invocation, notices) as client:
        _print(client.route(input_tokens, output_tokens, client_site))


@app.command("book")
def book_command(
    ctx: typer.Context,
    client_site: ClientSite,
    input_tokens: InputTokens,
    output_tokens: OutputTokens,
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait-s",
            callback=non_negative,
            help="Wait up to this long in the coordinator's queue when every chain is full "
            "(0: refused at once, then retried after the coordinator's Retry-After).",
        ),
    ] = 0.0,
    coordinator: CoordinatorOption = None,
    timeout: TimeoutOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Book a session: the coordinator reserves cache on every hop of the route.

    A booking that waits (after a refusal, or in the coordinator's queue) says so on stderr."""
    invocation = invocation_of(ctx, coordinator, timeout, verbose)
    _no_extra(invocation)
    notices = BookingNotices("waiting for a free chain", invocation.sleep, queue_wait_s=wait_s)
    with _route_client(invocation, notices) as client:
        _print(client.book(input_tokens, output_tokens, client_site, wait_s=wait_s))


@app.command("release")
def release_command(
    ctx: typer.Context,
    session_id: Annotated[
        str, typer.Argument(metavar="SESSION_ID", help="The session to release.")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="BPRR_SESSION_TOKEN",
            help="The session's token, from the booking's reply.",
            show_default=False,
        ),
    ] = None,
    coordinator: CoordinatorOption = None,
    timeout: TimeoutOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Release a session (its cache on every hop)."""
    invocation = invocation_of(ctx, coordinator, timeout, verbose)
    _no_extra(invocation)
    notices = BookingNotices("coordinator busy", invocation.sleep)
    with _route_client(invocation, notices) as client:
        if not client.release(session_id, token=token):
            print(f"error: session {session_id!r} does not exist", file=sys.stderr)
            raise typer.Exit(1)
    print(json.dumps({"released": session_id}))


@app.command("servers")
def servers_command(
    ctx: typer.Context,
    coordinator: CoordinatorOption = None,
    timeout: TimeoutOption = None,
    verbose: VerboseOption = False,
) -> None:
    """List the registered servers."""
    invocation = invocation_of(ctx, coordinator, timeout, verbose)
    _no_extra(invocation)
    with httpx.Client(
        base_url=invocation.coordinator,
        timeout=_timeout(invocation),
        transport=invocation.transport,
    ) as http:
        try:
            response = http.get("/v1/servers")
        except httpx.TransportError as error:
            raise CoordinatorUnreachable(f"GET /v1/servers: {error}") from error
        raise_for_status(response)
        _print([Server.parse(item) for item in response.json()])


# --- entry point -------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Entry point; ``transport`` lets tests talk to an in-process coordinator, ``sleep``
    replaces the pauses between retries."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in arguments:  # PETALS' own arguments, passed through by `run`
        cut = arguments.index("--")
        arguments, extra = arguments[:cut], arguments[cut + 1 :]
    invocation = Invocation(extra=extra, transport=transport, sleep=sleep)
    command = typer.main.get_command(app)
    try:
        result: Any = command.main(
            args=arguments, prog_name=PROG, standalone_mode=False, obj=invocation
        )
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except typer.BadParameter as error:
        print(f"{PROG}: error: {bad_parameter_message(error)}", file=sys.stderr)
        return 2
    except typer.TyperException as error:
        message = getattr(error, "format_message", error.__str__)()
        if type(error).__name__ == "NoArgsIsHelpError":
            print(message)  # the help, as `bprr` prints it
            return 2
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except CoordinatorError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 2 if error.status_code in (400, 404, 409, 422) else 1
    except CoordinatorUnreachable as error:
        print(f"error: coordinator unreachable: {error}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
