"""The ``bprr`` command line's style, for ``bprr-agent``: option checks that fail in one
``--option: what is wrong`` line, the coordinator URL, logging, and what a waiting command says.

Copied from app/cli_style.py in spirit (this package never imports ``app``), and kept working
on typer 0.28 (PETALS' interpreter, pydantic 1.10) as on 0.29.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import typer

from bprr_client.agent import NOTICE

PROG = "bprr-agent"
DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
# A booking that waits in the coordinator's queue says so once it has waited this long.
QUEUE_NOTICE_AFTER_S = 1.0

_NOT_ONE_OF = re.compile(r"'(.*)' is not one of ")


class UsageError(Exception):
    """Bad command-line input: one ``bprr-agent: error:`` line, exit status 2."""


def bad_parameter_message(error: typer.BadParameter) -> str:
    """One line, ``--option: what is wrong``; a value outside an enum's choices:
    ``--option: 'x' is not one of a, b``."""
    param = error.param
    if param is None or type(error) is not typer.BadParameter:  # e.g. a missing argument
        return str(error.format_message())
    long_names = [opt for opt in param.opts if opt.startswith("--")]
    name = long_names[0] if long_names else str(param.metavar or param.name or "").upper()
    found = _NOT_ONE_OF.search(error.message)
    choices = _choices(param)
    if found is not None and choices:
        return f"{name}: {found.group(1)!r} is not one of {', '.join(choices)}"
    return f"{name}: {error.message.removeprefix('Value error, ')}"


def _choices(param: Any) -> list[str]:
    """An option's fixed choices: from its enum (typer 0.29) or its click Choice (0.28)."""
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return [str(choice) for choice in getattr(getattr(param, "type", None), "choices", None) or ()]


def coordinator_url(text: str, option: str) -> str:
    """The coordinator's base URL; ``http://`` when ``text`` has no scheme."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"{option}: {text!r} is not an http(s) URL (e.g. 127.0.0.1:8080)")
    return url


def _bounded(low: float, strict: bool) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise typer.BadParameter(f"{value!r} must be {'>' if strict else '>='} {low:g}")
        return value

    return check


positive = _bounded(0.0, strict=True)
non_negative = _bounded(0.0, strict=False)


def count_at_least(low: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise typer.BadParameter(f"{value} must be >= {low}")
        return value

    return check


def site_target(values: list[str] | None) -> list[str] | None:
    """``--site-target SITE=HOST:PORT`` (repeatable)."""
    for text in values or ():
        name, sep, address = text.partition("=")
        if not sep or not name or not address:
            raise typer.BadParameter(f"{text!r} is not SITE=HOST:PORT")
    return values


def configure_logging(verbose: bool) -> None:
    """State changes (NOTICE) without ``-v``, every detail (INFO) with it; on stderr."""
    logging.basicConfig(
        level=logging.INFO if verbose else NOTICE,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


class BookingNotices:
    """What a route-client command says on stderr while it waits, instead of blocking
    silently: one line per retry after a refusal (``waiting``, with the coordinator's
    Retry-After) or a lost connection, and one line once a request has waited
    ``QUEUE_NOTICE_AFTER_S`` in the coordinator's queue (``queue_wait_s`` > 0).

    ``event_hooks()`` go on the httpx client (they see each answer's status); ``sleep``
    replaces the pause between retries."""

    def __init__(
        self, waiting: str, sleep: Callable[[float], None], queue_wait_s: float = 0.0
    ) -> None:
        self.waiting = waiting
        self._sleep = sleep
        self._queue_wait_s = queue_wait_s
        self._status: int | None = None
        self._timer: threading.Timer | None = None
        self._queue_said = False

    def event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return {"request": [self._sent], "response": [self._answered]}

    def _sent(self, _request: httpx.Request) -> None:
        self._status = None
        if self._queue_wait_s > 0 and not self._queue_said:
            self._timer = threading.Timer(QUEUE_NOTICE_AFTER_S, self._queued)
            self._timer.daemon = True
            self._timer.start()

    def _queued(self) -> None:
        self._queue_said = True
        say(f"{self.waiting} (in the coordinator's queue, up to {self._queue_wait_s:g} s)")

    def _answered(self, response: httpx.Response) -> None:
        self._status = response.status_code
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sleep(self, seconds: float) -> None:
        self.cancel()
        status = self._status
        if status == 503:
            say(f"{self.waiting} (retry in {seconds:.1f} s)")
        elif status == 429:
            say(f"refused: over this client's booking rate or quota (retry in {seconds:.1f} s)")
        elif status is None:
            say(f"coordinator unreachable (retry in {seconds:.1f} s)")
        else:
            say(f"coordinator unavailable (HTTP {status}; retry in {seconds:.1f} s)")
        self._sleep(seconds)


class Probe(enum.StrEnum):
    """``bprr-agent run --probe``: how RTTs are measured."""

    tcp = "tcp"
    http = "http"


@dataclass
class Invocation:
    """What ``main`` hands the commands (``ctx.obj``), and the group's connection options."""

    extra: list[str] = field(default_factory=list)
    transport: httpx.BaseTransport | None = None
    sleep: Callable[[float], None] = time.sleep
    coordinator: str = DEFAULT_COORDINATOR
    timeout_s: float = 10.0
    verbose: bool = False


# --- options that go before or after the command ------------------------------------------------

_COORDINATOR_HELP = (
    "Coordinator URL; http:// is assumed without a scheme. Also BPRR_COORDINATOR. "
    f"Default {DEFAULT_COORDINATOR}."
)
_TIMEOUT_HELP = "HTTP timeout in seconds (connecting: at most 3 s). Default 10."
_VERBOSE_HELP = "Log details at INFO level (state changes are logged without it)."
CoordinatorOption = Annotated[
    str | None,
    typer.Option("--coordinator", metavar="URL", help=_COORDINATOR_HELP, show_default=False),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout", metavar="SECONDS", callback=positive, help=_TIMEOUT_HELP, show_default=False
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP)]


def invocation_of(
    ctx: typer.Context, coordinator: str | None, timeout: float | None, verbose: bool
) -> Invocation:
    """The group's options, overridden by those given after the command."""
    invocation = ctx.ensure_object(Invocation)
    if coordinator is not None:
        invocation.coordinator = coordinator_url(coordinator, "--coordinator")
    if timeout is not None:
        invocation.timeout_s = timeout
    invocation.verbose = invocation.verbose or verbose
    configure_logging(invocation.verbose)
    return invocation
