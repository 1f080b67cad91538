"""The ``bprr`` command line's style, for ``bprr-agent``: option checks that fail in one
``--option: what is wrong`` line, the coordinator URL, logging, and what a waiting command says.

Every line ``bprr-agent`` writes on stderr starts with ``bprr-agent: ``: its errors
(``bprr-agent: error: ...``), what a waiting command says, and the agent's log records
(``bprr-agent: notice: registered as s0 ...``).

Copied from app/cli_style.py in spirit (this package never imports ``app``), and kept working
on typer 0.28 (PETALS' interpreter, pydantic 1.10) as on 0.29.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

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


_PORT = re.compile(r"^[0-9]{1,5}$")


def coordinator_url(text: str, option: str) -> str:
    """The coordinator's base URL; ``http://`` when ``text`` has no scheme. ``option`` names
    where the value came from (``--coordinator`` or ``BPRR_COORDINATOR``)."""
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"{option}: {text!r} is not an http(s) URL (e.g. 127.0.0.1:8080)")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UsageError(f"{option}: {text!r}: port {parsed.port} is not 1..65535")
    return url


def exit_status(status_code: int) -> int:
    """2 when the coordinator refused the request as wrong (4xx: invalid, unknown,
    unauthorised, in conflict), 1 when it could not serve it (5xx, 429 over quota, 408)."""
    return 2 if 400 <= status_code < 500 and status_code not in (408, 429) else 1


def host_port_problem(text: str) -> str | None:
    """Why ``text`` is not ``HOST:PORT`` (an IPv6 host in brackets), or None."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not rest.startswith(":"):
            return f"{text!r} is not HOST:PORT ([IPv6]:PORT)"
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon or ":" in host:
            return f"{text!r} is not HOST:PORT (an IPv6 host goes in brackets)"
    if not host.strip() or any(c.isspace() for c in text):
        return f"{text!r} is not HOST:PORT (no host)"
    if not _PORT.match(port) or not 0 < int(port) < 65536:
        return f"{text!r} is not HOST:PORT (port {port!r} is not 1..65535)"
    return None


def host_port(value: str | None) -> str | None:
    """``--address HOST:PORT``."""
    if value is not None:
        problem = host_port_problem(value)
        if problem is not None:
            raise typer.BadParameter(problem)
    return value


def bounded(
    low: float, *, strict: bool = False, high: float
) -> Callable[[float | None], float | None]:
    """A float option's check: finite, above ``low`` (``strict``: not equal to it) and at
    most ``high``, else one ``--option: ...`` line."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise typer.BadParameter(f"{value!r} must be {'>' if strict else '>='} {low:g}")
        if value > high:
            raise typer.BadParameter(f"{value!r} must be <= {high:g}")
        return value

    return check


# Upper bounds of the float options: past them a value is a typo, and some (a timeout, a
# sleep) overflow the standard library's timers.
MAX_TIMEOUT_S = 3600.0
MAX_WAIT_S = 3600.0  # the coordinator's hard ceiling of a booking's wait_s
MAX_INTERVAL_S = 86_400.0  # a probe interval, PETALS' loading time
MAX_MEASURE = 1e12  # memory (GB), speeds (ms), bandwidth (Mbit/s): the coordinator's ceiling
timeout_seconds = bounded(0.0, strict=True, high=MAX_TIMEOUT_S)


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
        problem = host_port_problem(address)
        if problem is not None:
            raise typer.BadParameter(f"{name}={problem}")
    return values


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is at each record (a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Lines(logging.Formatter):
    """``bprr-agent: notice: message``: the style of the command's own lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{PROG}: {record.levelname.lower()}: {text}"


def configure_logging(verbose: bool) -> None:
    """The package's records on stderr, one ``bprr-agent: LEVEL: message`` line each: state
    changes (NOTICE) and troubles without ``-v``, every detail (INFO, httpx's requests too)
    with it. Configured again on each call (tests run many commands in one process)."""
    level = logging.INFO if verbose else NOTICE
    for name in ("bprr_client", "httpx"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderr)]:
            logger.removeHandler(handler)
        if name == "httpx" and not verbose:
            continue
        handler = _CurrentStderr()
        handler.setFormatter(_Lines("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


def say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# (delay in seconds, what to call then) -> a started timer; tests fire it at once.
TimerFactory = Callable[[float, Callable[[], None]], Cancellable]


def thread_timer(delay_s: float, action: Callable[[], None]) -> Cancellable:
    timer = threading.Timer(delay_s, action)
    timer.daemon = True
    timer.start()
    return timer


class BookingNotices:
    """What a route-client command says on stderr while it waits, instead of blocking
    silently: one line per retry after a refusal (``waiting``, with the coordinator's
    Retry-After) or a lost connection, and one line once a request has waited
    ``QUEUE_NOTICE_AFTER_S`` in the coordinator's queue (``queue_wait_s`` > 0).

    ``event_hooks()`` go on the httpx client (they see each answer's status); ``sleep``
    replaces the pause between retries."""

    def __init__(
        self,
        waiting: str,
        sleep: Callable[[float], None],
        queue_wait_s: float = 0.0,
        timer: TimerFactory = thread_timer,
    ) -> None:
        self.waiting = waiting
        self._sleep = sleep
        self._queue_wait_s = queue_wait_s
        self._status: int | None = None
        self._start_timer = timer
        self._timer: Cancellable | None = None
        self._queue_said = False

    def event_hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return {"request": [self._sent], "response": [self._answered]}

    def _sent(self, _request: httpx.Request) -> None:
        self._status = None
        if self._queue_wait_s > 0 and not self._queue_said:
            self._timer = self._start_timer(QUEUE_NOTICE_AFTER_S, self._queued)

    def _queued(self) -> None:
        if self._queue_said:
            return
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
    """What ``main`` hands the commands (``ctx.obj``), and the connection options given
    before the command (the group's), then after it."""

    extra: list[str] = field(default_factory=list)
    transport: httpx.BaseTransport | None = None
    sleep: Callable[[float], None] = time.sleep
    timer: TimerFactory = thread_timer
    coordinator_text: str = DEFAULT_COORDINATOR
    # Where the coordinator's URL came from, for its error: --coordinator or the variable.
    coordinator_source: str = "--coordinator"
    coordinator: str = DEFAULT_COORDINATOR  # the checked URL
    timeout_s: float = 10.0
    verbose: bool = False

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 3.0))

    def http_client(self, notices: BookingNotices | None = None) -> httpx.Client:
        """A client of the coordinator; ``notices`` watch its answers."""
        return httpx.Client(
            base_url=self.coordinator,
            timeout=self.timeout,
            transport=self.transport,
            event_hooks=None if notices is None else notices.event_hooks(),
        )


# --- options that go before or after the command ------------------------------------------------

COORDINATOR_ENV = "BPRR_COORDINATOR"
_COORDINATOR_HELP = (
    f"Coordinator URL; http:// is assumed without a scheme. Also {COORDINATOR_ENV}. "
    f"Default {DEFAULT_COORDINATOR}."
)
_TIMEOUT_HELP = (
    f"HTTP timeout in seconds (connecting: at most 3 s; at most {MAX_TIMEOUT_S:g}). Default 10."
)
_VERBOSE_HELP = "Log details at INFO level (state changes are logged without it)."
CoordinatorOption = Annotated[
    str | None,
    typer.Option("--coordinator", metavar="URL", help=_COORDINATOR_HELP, show_default=False),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        callback=timeout_seconds,
        help=_TIMEOUT_HELP,
        show_default=False,
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help=_VERBOSE_HELP)]


def invocation_of(
    ctx: typer.Context, coordinator: str | None, timeout: float | None, verbose: bool
) -> Invocation:
    """The group's options, overridden by those given after the command; the coordinator's
    URL is checked here, once both are known (so a bad BPRR_COORDINATOR spoils neither
    ``--help`` nor a good ``--coordinator`` after the command)."""
    invocation = ctx.ensure_object(Invocation)
    if coordinator is not None:
        invocation.coordinator_text, invocation.coordinator_source = coordinator, "--coordinator"
    invocation.coordinator = coordinator_url(
        invocation.coordinator_text, invocation.coordinator_source
    )
    if timeout is not None:
        invocation.timeout_s = timeout
    invocation.verbose = invocation.verbose or verbose
    configure_logging(invocation.verbose)
    return invocation


def with_connection_options(
    func: Callable[..., None], *, takes_extra: bool = False
) -> Callable[..., None]:
    """A command taking ``(invocation, its own options...)`` as a typer command: it gains
    ``--coordinator``, ``--timeout`` and ``-v`` (after the command), merged with the group's
    into the ``Invocation`` it is called with. Arguments after ``--`` are refused unless
    ``takes_extra``."""
    own = list(inspect.signature(func, eval_str=True).parameters.values())[1:]
    keyword = inspect.Parameter.KEYWORD_ONLY
    shared = [
        inspect.Parameter("coordinator", keyword, default=None, annotation=CoordinatorOption),
        inspect.Parameter("timeout", keyword, default=None, annotation=TimeoutOption),
        inspect.Parameter("verbose", keyword, default=False, annotation=VerboseOption),
    ]
    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )

    @functools.wraps(func)
    def command(
        ctx: typer.Context,
        *,
        coordinator: str | None = None,
        timeout: float | None = None,
        verbose: bool = False,
        **options: Any,
    ) -> None:
        invocation = invocation_of(ctx, coordinator, timeout, verbose)
        if invocation.extra and not takes_extra:
            raise UsageError(f"unexpected arguments after --: {' '.join(invocation.extra)}")
        func(invocation, **options)

    parameters = [context, *(p.replace(kind=keyword) for p in own), *shared]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    del command.__wrapped__  # typer reads the signature above, not the function's
    return command
