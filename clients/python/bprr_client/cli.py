"""``bprr-agent``: run a server agent, or query routes and sessions.

    bprr-agent [--coordinator URL] run --site S --memory-gb G --decode-ms-per-block D \\
        --address HOST:PORT [--site-target SITE=HOST:PORT ...] [-- PETALS ARGS]
        [--petals-model DIR --petals-python .venv-petals/bin/python --petals-port P
         --petals-dht-prefix NAME (--petals-new-swarm | --petals-initial-peer MADDR ...)]
    bprr-agent run ... --speeds-file PROFILE.json   (``bprr profile --json`` output)
    bprr-agent route --client-site S --input-tokens N --output-tokens N
    bprr-agent book  --client-site S --input-tokens N --output-tokens N
    bprr-agent release SESSION_ID [--token SESSION_TOKEN]
    bprr-agent servers

Replies are printed as JSON. Bad arguments or a request the coordinator rejects as invalid:
one ``error:`` line, exit 2; the coordinator unreachable or unable to serve: exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import httpx

from bprr_client.agent import ServerAgent, SpanHost
from bprr_client.http import CoordinatorError, CoordinatorUnreachable, raise_for_status
from bprr_client.models import PrefillSpeed, Server, ServerInfo, Speed, ValidationError, WireModel
from bprr_client.petals import (
    LauncherOptions,
    PetalsHost,
    PetalsOptions,
    ProcessSupervisor,
    petals_command,
    petals_importable,
)
from bprr_client.probes import HttpProber, Prober, TcpProber
from bprr_client.routes import RouteClient

PROG = "bprr-agent"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _number(kind: Callable[[str], Any], low: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


positive = _number(float, 0, strict=True)
non_negative = _number(float, 0, strict=False)
count = _number(int, 0, strict=False)
output_count = _number(int, 1, strict=False)


def _pair(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name or not address:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=HOST:PORT")
    return name, address


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="bprr server agent and route client")
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("BPRR_COORDINATOR", "http://127.0.0.1:8080"),
        help="coordinator URL (BPRR_COORDINATOR; default http://127.0.0.1:8080)",
    )
    parser.add_argument("--timeout", type=positive, default=10.0, help="HTTP timeout (s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a server agent until SIGTERM")
    run.add_argument("--site", required=True)
    run.add_argument("--memory-gb", type=positive, required=True)
    run.add_argument("--decode-ms-per-block", type=positive)
    run.add_argument("--address", required=True, help="public HOST:PORT of this server")
    run.add_argument("--id", help="server id (default: the coordinator names it)")
    run.add_argument("--gpu")
    run.add_argument("--prefill-fixed-ms", type=non_negative)
    run.add_argument("--prefill-per-token-ms", type=non_negative)
    run.add_argument(
        "--speeds-file",
        type=Path,
        metavar="PROFILE.json",
        help="speeds from `bprr profile --json` (instead of --decode-ms-per-block and "
        "--prefill-*); re-read when the file changes and sent with the next heartbeat",
    )
    run.add_argument("--network-mbps", type=positive)
    run.add_argument(
        "--join-token",
        default=os.environ.get("BPRR_JOIN_TOKEN"),
        help="registration token (BPRR_JOIN_TOKEN)",
    )
    run.add_argument(
        "--site-target",
        type=_pair,
        action="append",
        default=[],
        metavar="SITE=HOST:PORT",
        help="a client site and an address to probe for it (repeatable)",
    )
    run.add_argument("--no-peers", action="store_true", help="do not probe the other servers")
    run.add_argument("--probe", choices=["tcp", "http"], default="tcp")
    run.add_argument("--probe-interval", type=positive, default=30.0, help="seconds")
    run.add_argument("--petals-model", help="run a PETALS server for the assigned span")
    run.add_argument(
        "--petals-python",
        default=sys.executable,
        help="the interpreter that has PETALS (default: this one), e.g. .venv-petals/bin/python",
    )
    run.add_argument("--petals-dht-prefix", help="the swarm's DHT prefix (a local model needs one)")
    run.add_argument("--petals-initial-peer", action="append", default=[], metavar="MULTIADDR")
    run.add_argument("--petals-port", type=int, help="PETALS' TCP port (default: any free one)")
    run.add_argument("--petals-host", default="127.0.0.1", help="PETALS' listen address")
    run.add_argument("--petals-public-ip", help="the address announced to peers (default: host)")
    run.add_argument("--petals-identity", help="PETALS identity key file (a stable peer id)")
    run.add_argument("--petals-log", type=Path, help="PETALS' output (default: a temp file)")
    run.add_argument(
        "--petals-state-dir",
        type=Path,
        help="where the launcher's control/status files and hivemind sockets go "
        "(default: a fresh temp folder)",
    )
    run.add_argument("--petals-new-swarm", action="store_true")
    run.add_argument(
        "--petals-cli",
        action="store_true",
        help="run `python -m petals.cli.run_server --block_indices` instead of bprr's "
        "launcher: a restart per span, loaded after --petals-ready-after seconds",
    )
    run.add_argument(
        "--petals-ready-after",
        type=non_negative,
        default=60.0,
        help="with --petals-cli: seconds to load blocks",
    )

    for name, text in (("route", "the best route right now"), ("book", "book a session")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--client-site", required=True)
        sub.add_argument("--input-tokens", type=count, required=True)
        sub.add_argument("--output-tokens", type=output_count, required=True)
    release = commands.add_parser("release", help="release a session")
    release.add_argument("session_id")
    release.add_argument(
        "--token",
        default=os.environ.get("BPRR_SESSION_TOKEN"),
        help="the session's token, from the booking's reply (BPRR_SESSION_TOKEN)",
    )
    commands.add_parser("servers", help="list the registered servers")
    return parser


def _field_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]).replace("_", "-")
    return f"--{field}: {first['msg']}"


def _print(model: WireModel | list[Server]) -> None:
    if isinstance(model, list):
        print(json.dumps([m.to_json() for m in model], indent=2))
    else:
        print(model.dumps(indent=2))


def read_speeds(path: Path) -> Speed:
    """The speeds in a ``bprr profile --json`` report (or any JSON object with
    ``decode_ms_per_block`` and optionally ``prefill_ms_per_block: {fixed, per_token}``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"--speeds-file: cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--speeds-file: {path} does not hold a JSON object")
    try:
        return Speed.parse(
            {k: data[k] for k in ("decode_ms_per_block", "prefill_ms_per_block") if k in data}
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"--speeds-file: {where}: {first['msg']}") from None


class SpeedsFile:
    """The agent's ``speed`` hook: a fresh measurement whenever the file changes (a new
    ``bprr profile --json > FILE``), else None. A file that turns unreadable is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def __call__(self) -> Speed | None:
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return None
        try:
            speed = read_speeds(self.path)
        except UsageError as error:
            logging.getLogger("bprr_client.cli").warning("%s", error)
            return None
        self._seen = stamp
        return speed


def _speeds(args: argparse.Namespace) -> tuple[float, PrefillSpeed]:
    prefill_flags = (args.prefill_fixed_ms, args.prefill_per_token_ms)
    if args.speeds_file is not None:
        if args.decode_ms_per_block is not None or prefill_flags != (None, None):
            raise UsageError(
                "--speeds-file: give either a speeds file or --decode-ms-per-block/--prefill-*"
            )
        speed = read_speeds(args.speeds_file)
        return speed.decode_ms_per_block, speed.prefill_ms_per_block or PrefillSpeed()
    if args.decode_ms_per_block is None:
        raise UsageError("--decode-ms-per-block: required (or give --speeds-file)")
    fixed, per_token = (0.0 if v is None else v for v in prefill_flags)
    return args.decode_ms_per_block, PrefillSpeed(fixed=fixed, per_token=per_token)


def _agent(
    args: argparse.Namespace, extra: Sequence[str], transport: httpx.BaseTransport | None
) -> ServerAgent:
    decode_ms, prefill = _speeds(args)
    try:
        server = ServerInfo(
            id=args.id,
            site=args.site,
            gpu=args.gpu,
            memory_gb=args.memory_gb,
            decode_ms_per_block=decode_ms,
            prefill_ms_per_block=prefill,
            network_mbps=args.network_mbps,
            address=args.address,
        )
    except ValidationError as error:
        raise UsageError(_field_error(error)) from None
    host: SpanHost | None = None
    identity = None
    if args.petals_model:
        problem = petals_importable(args.petals_python)
        if problem is not None:
            raise UsageError(f"--petals-python: {problem}")
        if args.petals_cli:
            host = _petals_cli_host(args, extra)
        else:
            petals_host = _petals_launcher_host(args, extra)
            petals_host.start()
            host, identity = petals_host, petals_host.identity
    elif extra:
        raise UsageError("arguments after -- are PETALS arguments: give --petals-model too")
    prober: Prober = TcpProber(timeout_s=1.0) if args.probe == "tcp" else HttpProber()
    return ServerAgent(
        args.coordinator,
        server,
        join_token=args.join_token,
        host=host,
        prober=prober,
        site_targets=dict(args.site_target),
        probe_peers=not args.no_peers,
        probe_interval_s=args.probe_interval,
        speed=None if args.speeds_file is None else SpeedsFile(args.speeds_file),
        timeout=httpx.Timeout(args.timeout, connect=min(args.timeout, 3.0)),
        transport=transport,
        identity=identity,
    )


def _petals_port(args: argparse.Namespace) -> int:
    if args.petals_port is not None:
        if not 0 < args.petals_port < 65536:
            raise UsageError(f"--petals-port: {args.petals_port} is not a TCP port")
        return int(args.petals_port)
    import socket

    with socket.socket() as sock:  # a free port now, fixed for the server's life
        sock.bind((args.petals_host, 0))
        return int(sock.getsockname()[1])


def _petals_launcher_host(args: argparse.Namespace, extra: Sequence[str]) -> PetalsHost:
    if args.petals_new_swarm and args.petals_initial_peer:
        raise UsageError("--petals-new-swarm: a new swarm has no initial peers")
    if not args.petals_new_swarm and not args.petals_initial_peer:
        raise UsageError(
            "--petals-initial-peer: name the swarm's peers (or --petals-new-swarm); "
            "the public swarm is never joined by default"
        )
    port = _petals_port(args)
    family = "ip6" if ":" in args.petals_host else "ip4"
    announce = args.petals_public_ip or args.petals_host
    try:
        options = LauncherOptions(
            model=args.petals_model,
            python=args.petals_python,
            dht_prefix=args.petals_dht_prefix or Path(args.petals_model).name,
            host_maddrs=(f"/{family}/{args.petals_host}/tcp/{port}",),
            announce_maddrs=(f"/{'ip6' if ':' in announce else 'ip4'}/{announce}/tcp/{port}",),
            initial_peers=tuple(args.petals_initial_peer),
            identity_path=args.petals_identity,
            extra_args=tuple(extra),
        )
    except ValueError as error:
        raise UsageError(f"--petals-{str(error).replace('_', '-')}") from None
    return PetalsHost(options, state_dir=args.petals_state_dir, log_path=args.petals_log)


def _petals_cli_host(args: argparse.Namespace, extra: Sequence[str]) -> ProcessSupervisor:
    try:
        options = PetalsOptions(
            model=args.petals_model,
            python=args.petals_python,
            initial_peers=tuple(args.petals_initial_peer),
            port=args.petals_port,
            public_ip=args.petals_public_ip,
            new_swarm=args.petals_new_swarm,
            extra_args=tuple(extra),
        )
    except ValueError as error:
        raise UsageError(f"--petals-{error}") from None
    return ProcessSupervisor(
        lambda span: petals_command(options, span), ready_after_s=args.petals_ready_after
    )


def _execute(
    args: argparse.Namespace, extra: Sequence[str], transport: httpx.BaseTransport | None
) -> int:
    if args.command == "run":
        agent = _agent(args, extra, transport)
        agent.install_signal_handlers()
        agent.run()
        if agent.error is not None:
            print(f"error: {agent.error}", file=sys.stderr)
            return 1
        return 0
    if extra:
        raise UsageError(f"unexpected arguments after --: {' '.join(extra)}")
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 3.0))
    with RouteClient(args.coordinator, timeout=timeout, transport=transport) as client:
        if args.command == "route":
            _print(client.route(args.input_tokens, args.output_tokens, args.client_site))
        elif args.command == "book":
            _print(client.book(args.input_tokens, args.output_tokens, args.client_site))
        elif args.command == "release":
            if not client.release(args.session_id, token=args.token):
                print(f"error: session {args.session_id!r} does not exist", file=sys.stderr)
                return 1
            print(json.dumps({"released": args.session_id}))
        else:
            with httpx.Client(base_url=args.coordinator, timeout=timeout, transport=transport) as h:
                try:
                    response = h.get("/v1/servers")
                except httpx.TransportError as error:
                    raise CoordinatorUnreachable(f"GET /v1/servers: {error}") from error
                raise_for_status(response)
                _print([Server.parse(item) for item in response.json()])
    return 0


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Entry point; ``transport`` lets tests talk to an in-process coordinator."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, extra = arguments[:cut], arguments[cut + 1 :]
    try:
        args = build_parser().parse_args(arguments)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return _execute(args, extra, transport)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except CoordinatorError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        if error.status_code in (400, 404, 409, 422):
            return 2
        return 1
    except CoordinatorUnreachable as error:
        print(f"error: coordinator unreachable: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
