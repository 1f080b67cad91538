"""``bprr-agent run``: from the command line's options to a ``ServerAgent`` and its host.

The ``run`` command lives here, registered by ``bprr_client.cli``, so that each file stays
small. Neither is imported by the PETALS launcher (it runs PETALS' own interpreter).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer

from bprr_client._cli_style import (
    MAX_INTERVAL_S,
    MAX_MEASURE,
    Invocation,
    Probe,
    UsageError,
    bounded,
    exit_status,
    host_port,
    site_target,
)
from bprr_client.agent import Identity, NoHost, ServerAgent, SpanHost
from bprr_client.models import PrefillSpeed, ServerInfo, Speed, ValidationError
from bprr_client.petals import (
    LauncherOptions,
    PetalsHost,
    PetalsOptions,
    ProcessSupervisor,
    petals_command,
    petals_importable,
)
from bprr_client.probes import HttpProber, Prober, TcpProber

log = logging.getLogger("bprr_client.cli")
positive = bounded(0.0, strict=True, high=MAX_MEASURE)
non_negative = bounded(0.0, high=MAX_MEASURE)
MAX_MEMORY_GB = 1e6  # a petabyte: more is a typo
interval = bounded(0.0, strict=True, high=MAX_INTERVAL_S)

NO_HOST_WARNING = (
    "no host: this agent serves no blocks (give --petals-model to run PETALS, or "
    "--simulate-host for a demo); it reports itself draining, so the coordinator places no "
    "blocks on it and never routes through it"
)
SIMULATED_HOST_WARNING = (
    "--simulate-host: assigned spans count as loaded at once and nothing serves them; the "
    "coordinator will route requests to this server (a demo, not a real server)"
)


@dataclass
class RunOptions:
    """The options of ``bprr-agent run`` (the typer command fills it; tests build it)."""

    coordinator: str
    site: str
    memory_gb: float
    address: str
    decode_ms_per_block: float | None = None
    id: str | None = None
    gpu: str | None = None
    prefill_fixed_ms: float | None = None
    prefill_per_token_ms: float | None = None
    speeds_file: Path | None = None
    network_mbps: float | None = None
    join_token: str | None = None
    site_targets: dict[str, str] = field(default_factory=dict)
    probe_peers: bool = True
    probe: str = "tcp"
    probe_interval_s: float = 30.0
    timeout_s: float = 10.0
    simulate_host: bool = False
    petals_model: str | None = None
    petals_python: str = ""
    petals_dht_prefix: str | None = None
    petals_initial_peers: tuple[str, ...] = ()
    petals_port: int | None = None
    petals_host: str = "127.0.0.1"
    petals_public_ip: str | None = None
    petals_identity: str | None = None
    petals_log: Path | None = None
    petals_state_dir: Path | None = None
    petals_new_swarm: bool = False
    petals_cli: bool = False
    petals_ready_after_s: float = 60.0


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
            log.warning("%s", error)
            return None
        self._seen = stamp
        return speed


def _speeds(options: RunOptions) -> tuple[float, PrefillSpeed]:
    prefill_flags = (options.prefill_fixed_ms, options.prefill_per_token_ms)
    if options.speeds_file is not None:
        if options.decode_ms_per_block is not None or prefill_flags != (None, None):
            raise UsageError(
                "--speeds-file: give either a speeds file or --decode-ms-per-block/--prefill-*"
            )
        speed = read_speeds(options.speeds_file)
        return speed.decode_ms_per_block, speed.prefill_ms_per_block or PrefillSpeed()
    if options.decode_ms_per_block is None:
        raise UsageError("--decode-ms-per-block: required (or give --speeds-file)")
    fixed, per_token = (0.0 if v is None else v for v in prefill_flags)
    return options.decode_ms_per_block, PrefillSpeed(fixed=fixed, per_token=per_token)


def _field_error(error: ValidationError) -> str:
    first = error.errors()[0]
    name = ".".join(str(p) for p in first["loc"]).replace("_", "-")
    return f"--{name}: {first['msg']}"


def build_agent(
    options: RunOptions, extra: Sequence[str], transport: httpx.BaseTransport | None = None
) -> ServerAgent:
    """The agent ``bprr-agent run`` runs; its host (PETALS, simulated or none) is started.
    UsageError for inconsistent options (before anything is started)."""
    decode_ms, prefill = _speeds(options)
    try:
        server = ServerInfo(
            id=options.id,
            site=options.site,
            gpu=options.gpu,
            memory_gb=options.memory_gb,
            decode_ms_per_block=decode_ms,
            prefill_ms_per_block=prefill,
            network_mbps=options.network_mbps,
            address=options.address,
        )
    except ValidationError as error:
        raise UsageError(_field_error(error)) from None
    host, identity, hosts_nothing = _host(options, extra)
    prober: Prober = TcpProber(timeout_s=1.0) if options.probe == "tcp" else HttpProber()
    agent = ServerAgent(
        options.coordinator,
        server,
        join_token=options.join_token,
        host=host,
        prober=prober,
        site_targets=options.site_targets,
        probe_peers=options.probe_peers,
        probe_interval_s=options.probe_interval_s,
        speed=None if options.speeds_file is None else SpeedsFile(options.speeds_file),
        timeout=httpx.Timeout(options.timeout_s, connect=min(options.timeout_s, 3.0)),
        transport=transport,
        identity=identity,
        # Draining keeps the planner from placing blocks on a server that would never load
        # them (a "joining" one would hold its span and leave those blocks uncovered); the
        # first heartbeat says so right after the registration.
        draining=hosts_nothing,
    )
    return agent


def _host(
    options: RunOptions, extra: Sequence[str]
) -> tuple[SpanHost | None, Identity | None, bool]:
    """(host, identity hook, hosts nothing); host None: the simulated host (a span counts as
    loaded once assigned)."""
    if options.petals_model is None:
        if extra:
            raise UsageError("arguments after -- are PETALS arguments: give --petals-model too")
        if options.petals_cli:
            raise UsageError("--petals-cli: give --petals-model too")
        if options.simulate_host:
            log.warning("%s", SIMULATED_HOST_WARNING)
            return None, None, False
        log.warning("%s", NO_HOST_WARNING)
        return NoHost(), None, True
    if options.simulate_host:
        raise UsageError("--simulate-host: not with --petals-model (PETALS is the host)")
    problem = petals_importable(options.petals_python)
    if problem is not None:
        raise UsageError(f"--petals-python: {problem}")
    if options.petals_cli:
        return _petals_cli_host(options, extra), None, False
    petals_host = _petals_launcher_host(options, extra)
    petals_host.start()
    return petals_host, petals_host.identity, False


def _petals_port(options: RunOptions) -> int:
    if options.petals_port is not None:
        if not 0 < options.petals_port < 65536:
            raise UsageError(f"--petals-port: {options.petals_port} is not a TCP port")
        return options.petals_port
    with socket.socket() as sock:  # a free port now, fixed for the server's life
        sock.bind((options.petals_host, 0))
        return int(sock.getsockname()[1])


def _petals_launcher_host(options: RunOptions, extra: Sequence[str]) -> PetalsHost:
    assert options.petals_model is not None
    if options.petals_new_swarm and options.petals_initial_peers:
        raise UsageError("--petals-new-swarm: a new swarm has no initial peers")
    if not options.petals_new_swarm and not options.petals_initial_peers:
        raise UsageError(
            "--petals-initial-peer: name the swarm's peers (or --petals-new-swarm); "
            "the public swarm is never joined by default"
        )
    port = _petals_port(options)
    listen = options.petals_host
    announce = options.petals_public_ip or listen
    try:
        launcher = LauncherOptions(
            model=options.petals_model,
            python=options.petals_python,
            dht_prefix=options.petals_dht_prefix or Path(options.petals_model).name,
            host_maddrs=(f"/{'ip6' if ':' in listen else 'ip4'}/{listen}/tcp/{port}",),
            announce_maddrs=(f"/{'ip6' if ':' in announce else 'ip4'}/{announce}/tcp/{port}",),
            initial_peers=options.petals_initial_peers,
            identity_path=options.petals_identity,
            extra_args=tuple(extra),
        )
    except ValueError as error:
        raise UsageError(f"--petals-{str(error).replace('_', '-')}") from None
    return PetalsHost(launcher, state_dir=options.petals_state_dir, log_path=options.petals_log)


def _petals_cli_host(options: RunOptions, extra: Sequence[str]) -> ProcessSupervisor:
    assert options.petals_model is not None
    try:
        petals = PetalsOptions(
            model=options.petals_model,
            python=options.petals_python,
            initial_peers=options.petals_initial_peers,
            port=options.petals_port,
            public_ip=options.petals_public_ip,
            new_swarm=options.petals_new_swarm,
            extra_args=tuple(extra),
        )
    except ValueError as error:
        raise UsageError(f"--petals-{error}") from None
    return ProcessSupervisor(
        lambda span: petals_command(petals, span), ready_after_s=options.petals_ready_after_s
    )


def run_command(
    invocation: Invocation,
    site: Annotated[str, typer.Option("--site", help="The site (region) of this server.")],
    memory_gb: Annotated[
        float,
        typer.Option(
            "--memory-gb",
            callback=bounded(0.0, strict=True, high=MAX_MEMORY_GB),
            help=f"GPU memory for blocks and cache, GB (at most {MAX_MEMORY_GB:g}).",
        ),
    ],
    address: Annotated[
        str,
        typer.Option(
            "--address",
            metavar="HOST:PORT",
            callback=host_port,
            help="Public HOST:PORT of this server (its peers and clients probe it; an IPv6 "
            "host in brackets).",
        ),
    ],
    decode_ms_per_block: Annotated[
        float | None,
        typer.Option(
            "--decode-ms-per-block",
            callback=positive,
            help="Measured decode time of one block for one token, ms (or --speeds-file).",
        ),
    ] = None,
    server_id: Annotated[
        str | None,
        typer.Option("--id", help="Server id (default: the coordinator names it)."),
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="GPU model, for the operator (e.g. A100).")
    ] = None,
    prefill_fixed_ms: Annotated[
        float | None,
        typer.Option(
            "--prefill-fixed-ms",
            callback=non_negative,
            help="Prefill time of one block, fixed part, ms (default 0).",
        ),
    ] = None,
    prefill_per_token_ms: Annotated[
        float | None,
        typer.Option(
            "--prefill-per-token-ms",
            callback=non_negative,
            help="Prefill time of one block per input token, ms (default 0).",
        ),
    ] = None,
    speeds_file: Annotated[
        Path | None,
        typer.Option(
            "--speeds-file",
            metavar="PROFILE.json",
            help="Speeds from `bprr profile --json` (instead of --decode-ms-per-block and "
            "--prefill-*); re-read when the file changes and sent with the next heartbeat.",
        ),
    ] = None,
    network_mbps: Annotated[
        float | None,
        typer.Option("--network-mbps", callback=positive, help="Network bandwidth, Mbit/s."),
    ] = None,
    join_token: Annotated[
        str | None,
        typer.Option(
            "--join-token",
            envvar="BPRR_JOIN_TOKEN",
            help="Registration token (the coordinator's join token).",
            show_default=False,
        ),
    ] = None,
    site_targets: Annotated[
        list[str] | None,
        typer.Option(
            "--site-target",
            metavar="SITE=HOST:PORT",
            callback=site_target,
            help="A client site and an address to probe for it (repeatable).",
        ),
    ] = None,
    no_peers: Annotated[
        bool, typer.Option("--no-peers", help="Do not probe the other servers.")
    ] = False,
    probe: Annotated[
        Probe, typer.Option("--probe", help="How RTTs are measured: TCP connect or HTTP GET.")
    ] = Probe.tcp,
    probe_interval: Annotated[
        float,
        typer.Option(
            "--probe-interval",
            callback=interval,
            help=f"Seconds between two probe rounds (at most {MAX_INTERVAL_S:g}).",
        ),
    ] = 30.0,
    simulate_host: Annotated[
        bool,
        typer.Option(
            "--simulate-host",
            help="Demo only: count each assigned span as loaded at once, with nothing serving "
            "it (without a host and without this, the agent stays unroutable).",
        ),
    ] = False,
    petals_model: Annotated[
        str | None,
        typer.Option(
            "--petals-model",
            metavar="MODEL",
            help="Host the assigned span with a PETALS server of this model (a folder or a "
            "Hugging Face name).",
        ),
    ] = None,
    petals_python: Annotated[
        str,
        typer.Option(
            "--petals-python",
            help="The interpreter that has PETALS, e.g. .venv-petals/bin/python "
            "(default: this one).",
            show_default=False,
        ),
    ] = sys.executable,
    petals_dht_prefix: Annotated[
        str | None,
        typer.Option(
            "--petals-dht-prefix",
            help="The swarm's DHT prefix (default: the model folder's name).",
        ),
    ] = None,
    petals_initial_peers: Annotated[
        list[str] | None,
        typer.Option(
            "--petals-initial-peer",
            metavar="MULTIADDR",
            help="A peer of the PETALS swarm to join (repeatable).",
        ),
    ] = None,
    petals_port: Annotated[
        int | None,
        typer.Option("--petals-port", help="PETALS' TCP port (default: any free one)."),
    ] = None,
    petals_host: Annotated[
        str, typer.Option("--petals-host", help="PETALS' listen address.")
    ] = "127.0.0.1",
    petals_public_ip: Annotated[
        str | None,
        typer.Option(
            "--petals-public-ip", help="The address announced to peers (default: --petals-host)."
        ),
    ] = None,
    petals_identity: Annotated[
        str | None,
        typer.Option("--petals-identity", help="PETALS identity key file (a stable peer id)."),
    ] = None,
    petals_log: Annotated[
        Path | None,
        typer.Option("--petals-log", help="Where PETALS' output goes (default: a temp file)."),
    ] = None,
    petals_state_dir: Annotated[
        Path | None,
        typer.Option(
            "--petals-state-dir",
            help="Where the launcher's control/status files and hivemind sockets go "
            "(default: a fresh temp folder).",
        ),
    ] = None,
    petals_new_swarm: Annotated[
        bool,
        typer.Option(
            "--petals-new-swarm",
            help="Start a new PETALS swarm (the first server; no --petals-initial-peer).",
        ),
    ] = False,
    petals_cli: Annotated[
        bool,
        typer.Option(
            "--petals-cli",
            help="Run `python -m petals.cli.run_server --block_indices` instead of bprr's "
            "launcher: a restart per span, loaded after --petals-ready-after seconds.",
        ),
    ] = False,
    petals_ready_after: Annotated[
        float,
        typer.Option(
            "--petals-ready-after",
            callback=bounded(0.0, high=MAX_INTERVAL_S),
            help="With --petals-cli: seconds PETALS takes to load blocks "
            f"(at most {MAX_INTERVAL_S:g}).",
        ),
    ] = 60.0,
) -> None:
    """Run a server agent until SIGTERM: register, heartbeat, host the assigned span, leave.

    Hosts: PETALS (--petals-model), none (the agent stays unroutable), or --simulate-host."""
    options = RunOptions(
        coordinator=invocation.coordinator,
        site=site,
        memory_gb=memory_gb,
        address=address,
        decode_ms_per_block=decode_ms_per_block,
        id=server_id,
        gpu=gpu,
        prefill_fixed_ms=prefill_fixed_ms,
        prefill_per_token_ms=prefill_per_token_ms,
        speeds_file=speeds_file,
        network_mbps=network_mbps,
        join_token=join_token,
        site_targets=dict(pair.split("=", 1) for pair in site_targets or ()),
        probe_peers=not no_peers,
        probe=probe.value,
        probe_interval_s=probe_interval,
        timeout_s=invocation.timeout_s,
        simulate_host=simulate_host,
        petals_model=petals_model,
        petals_python=petals_python,
        petals_dht_prefix=petals_dht_prefix,
        petals_initial_peers=tuple(petals_initial_peers or ()),
        petals_port=petals_port,
        petals_host=petals_host,
        petals_public_ip=petals_public_ip,
        petals_identity=petals_identity,
        petals_log=petals_log,
        petals_state_dir=petals_state_dir,
        petals_new_swarm=petals_new_swarm,
        petals_cli=petals_cli,
        petals_ready_after_s=petals_ready_after,
    )
    agent = build_agent(options, invocation.extra, invocation.transport)
    agent.install_signal_handlers()
    agent.run()
    if agent.error is not None:
        # Already said, once: the agent logs "agent stopped: ..." at ERROR
        # (``bprr-agent: error: agent stopped: ...``). A refusal (4xx) is the options' fault.
        status = agent.error.status_code
        raise typer.Exit(1 if status is None else exit_status(status))
