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
printed as JSON. Bad arguments or a request the coordinator rejects (4xx: invalid, unknown,
unauthorised, in conflict): one ``bprr-agent: error:`` line, exit 2; the coordinator
unreachable or unable to serve (5xx, over quota): exit 1. The coordinator's URL (and
BPRR_COORDINATOR) is checked when a command runs, so ``--help`` works with any.

This package must not import the coordinator (``app``): the style is copied, not shared. It
runs under PETALS' interpreter too (pydantic 1.10), hence typer 0.28 there (see pyproject).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Annotated, Any

import httpx
import typer

from bprr_client._agent_cli import RunOptions, SpeedsFile, read_speeds, run_command
from bprr_client._cli_style import (
    COORDINATOR_ENV,
    DEFAULT_COORDINATOR,
    MAX_TIMEOUT_S,
    MAX_WAIT_S,
    PROG,
    BookingNotices,
    Invocation,
    TimerFactory,
    UsageError,
    bad_parameter_message,
    bounded,
    count_at_least,
    exit_status,
    thread_timer,
    timeout_seconds,
    with_connection_options,
)
from bprr_client.http import CoordinatorError, CoordinatorUnreachable, raise_for_status
from bprr_client.models import Server, ValidationError, WireModel
from bprr_client.routes import RouteClient

__all__ = ["PROG", "RunOptions", "SpeedsFile", "UsageError", "app", "main", "read_speeds"]

DISTRIBUTION = "bprr-client"

app = typer.Typer(
    name=PROG,
    help="bprr's server agent and route client: run a GPU server's agent, or ask the "
    "coordinator for routes and sessions.",
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
            envvar=COORDINATOR_ENV,
            help="Coordinator URL; http:// is assumed without a scheme. "
            "May also follow the command.",
        ),
    ] = DEFAULT_COORDINATOR,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            callback=timeout_seconds,
            help=f"HTTP timeout in seconds (connecting: at most 3 s; at most {MAX_TIMEOUT_S:g}). "
            "May also follow the command.",
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
    source = ctx.get_parameter_source("coordinator")
    from_environment = source is not None and source.name == "ENVIRONMENT"
    invocation.coordinator_text = coordinator
    invocation.coordinator_source = COORDINATOR_ENV if from_environment else "--coordinator"
    invocation.timeout_s = timeout
    invocation.verbose = verbose


def _print(model: WireModel | list[Server]) -> None:
    if isinstance(model, list):
        print(json.dumps([m.to_json() for m in model], indent=2))
    else:
        print(model.dumps(indent=2))


app.command(
    "run",
    epilog="Arguments after `--` are passed to PETALS verbatim (with --petals-model).",
)(with_connection_options(run_command, takes_extra=True))


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


def _route_client(
    invocation: Invocation, http: httpx.Client, notices: BookingNotices
) -> RouteClient:
    """A RouteClient whose waits are said on stderr (``notices``)."""
    return RouteClient(http_client=http, timeout=invocation.timeout, sleep=notices.sleep)


def route_command(
    invocation: Invocation,
    client_site: ClientSite,
    input_tokens: InputTokens,
    output_tokens: OutputTokens,
) -> None:
    """The best route right now (nothing is reserved)."""
    notices = BookingNotices("waiting for a route", invocation.sleep)
    with invocation.http_client(notices) as http:
        _print(
            _route_client(invocation, http, notices).route(input_tokens, output_tokens, client_site)
        )


def book_command(
    invocation: Invocation,
    client_site: ClientSite,
    input_tokens: InputTokens,
    output_tokens: OutputTokens,
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait-s",
            callback=bounded(0.0, high=MAX_WAIT_S),
            help="Wait up to this long in the coordinator's queue when every chain is full "
            "(0: refused at once, then retried after the coordinator's Retry-After; at most "
            f"{MAX_WAIT_S:g}, or the coordinator's BPRR_QUEUE_MAX_WAIT_S).",
        ),
    ] = 0.0,
) -> None:
    """Book a session: the coordinator reserves cache on every hop of the route.

    A booking that waits (after a refusal, or in the coordinator's queue) says so on stderr."""
    notices = BookingNotices(
        "waiting for a free chain", invocation.sleep, queue_wait_s=wait_s, timer=invocation.timer
    )
    with invocation.http_client(notices) as http:
        client = _route_client(invocation, http, notices)
        try:
            _print(client.book(input_tokens, output_tokens, client_site, wait_s=wait_s))
        finally:
            notices.cancel()


def release_command(
    invocation: Invocation,
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
) -> None:
    """Release a session (its cache on every hop)."""
    notices = BookingNotices("coordinator busy", invocation.sleep)
    with invocation.http_client(notices) as http:
        # A session already gone is an error here, with the coordinator's reason.
        _route_client(invocation, http, notices).release(session_id, token=token, missing_ok=False)
    print(json.dumps({"released": session_id}))


def servers_command(invocation: Invocation) -> None:
    """List the registered servers."""
    with invocation.http_client() as http:
        try:
            response = http.get("/v1/servers")
        except httpx.TransportError as error:
            raise CoordinatorUnreachable(f"GET /v1/servers: {error}") from error
        raise_for_status(response)
        _print([Server.parse(item) for item in response.json()])


for _name, _command in (
    ("route", route_command),
    ("book", book_command),
    ("release", release_command),
    ("servers", servers_command),
):
    app.command(_name)(with_connection_options(_command))


# --- entry point -------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _coordinator_error(error: CoordinatorError, invocation: Invocation) -> str:
    """The coordinator's reason; a 404 without one (a path it does not serve) says the URL
    is probably not a bprr coordinator."""
    detail = _one_line(error.detail)
    if error.status_code == 404 and (detail in ("", "Not Found") or detail.startswith("<")):
        return (
            f"{invocation.coordinator} answered 404 Not Found: it does not look like a bprr "
            f"coordinator (check {invocation.coordinator_source})"
        )
    return detail


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
    timer: TimerFactory = thread_timer,
) -> int:
    """Entry point; ``transport`` lets tests talk to an in-process coordinator, ``sleep``
    replaces the pauses between retries, ``timer`` the one before a queue notice."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in arguments:  # PETALS' own arguments, passed through by `run`
        cut = arguments.index("--")
        arguments, extra = arguments[:cut], arguments[cut + 1 :]
    invocation = Invocation(extra=extra, transport=transport, sleep=sleep, timer=timer)
    command = typer.main.get_command(app)
    no_command = not arguments and not extra
    try:
        result: Any = command.main(
            args=arguments or ["--help"], prog_name=PROG, standalone_mode=False, obj=invocation
        )
    except typer.Exit as done:
        return 2 if no_command else int(done.exit_code)
    except typer.Abort:
        _error("aborted")
        return 130
    except typer.BadParameter as error:
        _error(bad_parameter_message(error))
        return 2
    except typer.TyperException as error:
        _error(getattr(error, "format_message", error.__str__)())
        return 2
    except UsageError as error:
        _error(str(error))
        return 2
    except ValidationError as error:  # a value the wire models refuse
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]).replace("_", "-")
        _error(f"--{where}: {first['msg']}")
        return 2
    except CoordinatorError as error:
        _error(_coordinator_error(error, invocation))
        return exit_status(error.status_code)
    except CoordinatorUnreachable as error:
        _error(f"coordinator unreachable: {_one_line(str(error))}")
        return 1
    if no_command:
        return 2  # the help, as `bprr` prints it
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
