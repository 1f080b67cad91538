"""Run a PETALS server for the agent's span.

``PetalsHost`` (the default) runs our launcher (``bprr_client.petals_server``) under the
PETALS interpreter: one long-lived PETALS server that re-spans in process when the
assignment changes and counts a span as loaded when PETALS announced it online.
``petals_command`` + ``ProcessSupervisor`` is the plain CLI path
(``python -m petals.cli.run_server --block_indices``): a restart per span, "loaded" after a
timer. PETALS is not a dependency of this package; ``ProcessSupervisor`` runs any command
built from a span (tests use a stand-in process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bprr_client.http import RetryPolicy
from bprr_client.models import Span


class HostFailed(Exception):
    """The served process exited in a way restarting cannot fix (e.g. PETALS missing)."""


log = logging.getLogger("bprr_client.petals")


@dataclass(frozen=True)
class PetalsOptions:
    """How to start ``petals.cli.run_server``; ``extra_args`` are passed through verbatim."""

    model: str
    python: str = sys.executable
    initial_peers: tuple[str, ...] = ()
    port: int | None = None
    public_ip: str | None = None
    new_swarm: bool = False
    throughput: float | str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model: the PETALS model name must not be empty")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.new_swarm and self.initial_peers:
            raise ValueError("new_swarm: a new swarm has no initial peers")


def petals_command(options: PetalsOptions, span: Span) -> list[str]:
    """``python -m petals.cli.run_server MODEL --block_indices START:END ...`` for ``span``."""
    command = [
        options.python,
        "-m",
        "petals.cli.run_server",
        options.model,
        "--block_indices",
        f"{span.start}:{span.end}",
    ]
    if options.initial_peers:
        command += ["--initial_peers", *options.initial_peers]
    if options.new_swarm:
        command.append("--new_swarm")
    if options.port is not None:
        command += ["--port", str(options.port)]
    if options.public_ip is not None:
        command += ["--public_ip", options.public_ip]
    if options.throughput is not None:
        command += ["--throughput", str(options.throughput)]
    command += list(options.extra_args)
    return command


# A process that ran this long without exiting resets the crash backoff.
STABLE_AFTER_S = 300.0
Popen = Callable[..., "subprocess.Popen[bytes]"]


class ProcessSupervisor:
    """Keeps one process running the command for the current span (a ``SpanHost``).

    ``apply(span)`` stops the running process (SIGTERM to its process group, SIGKILL after
    ``stop_timeout_s``) and starts one for the new span; ``poll()`` restarts a process that
    died, after a jittered exponential backoff; ``loaded_span()`` is the span once its process
    has been alive for ``ready_after_s`` (PETALS needs time to load its blocks).
    """

    def __init__(
        self,
        command: Callable[[Span], Sequence[str]],
        *,
        ready_after_s: float = 0.0,
        stop_timeout_s: float = 10.0,
        restart: RetryPolicy | None = None,
        env: Mapping[str, str] | None = None,
        quiet: bool = False,
        stdout: Path | None = None,
        fatal_exit_codes: frozenset[int] = frozenset(),
        terminate_group: bool = True,
        clock: Callable[[], float] = time.monotonic,
        popen: Popen = subprocess.Popen,
        rng: random.Random | None = None,
    ) -> None:
        self._command = command
        self.ready_after_s = ready_after_s
        self.stop_timeout_s = stop_timeout_s
        self._restart_policy = restart or RetryPolicy(initial_s=1.0, max_s=60.0)
        self._env = None if env is None else {**os.environ, **env}
        self._quiet = quiet
        self._stdout = stdout
        self.fatal_exit_codes = fatal_exit_codes
        self._terminate_group = terminate_group
        self._clock = clock
        self._popen = popen
        self._rng = rng or random.Random()
        self._span: Span | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._next_restart: float | None = None
        self.crashes = 0
        self.starts = 0

    @property
    def span(self) -> Span | None:
        """The span this supervisor is asked to serve (running or not)."""
        return self._span

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _spawn(self, span: Span) -> None:
        argv = list(self._command(span))
        if self._stdout is not None:
            with self._stdout.open("ab") as log_file:
                self._process = self._popen(
                    argv,
                    env=self._env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        else:
            output = subprocess.DEVNULL if self._quiet else None
            self._process = self._popen(
                argv, env=self._env, stdout=output, stderr=output, start_new_session=True
            )
        self._started_at = self._clock()
        self._next_restart = None
        self.starts += 1
        log.info("started %s for blocks %s (pid %s)", argv[0], span, self._process.pid)

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:  # the whole group, or the main process alone (it stops its children)
                if self._terminate_group:
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.terminate()
            except (ProcessLookupError, PermissionError):
                process.terminate()
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group outlived its leader

    def apply(self, span: Span | None) -> None:
        if span == self._span and (self._alive() or self._next_restart is not None):
            return
        self._terminate()
        self._span = span
        self.crashes = 0
        self._next_restart = None
        if span is not None:
            self._spawn(span)

    def poll(self) -> None:
        """Restart the process if it died (with backoff between successive crashes)."""
        now = self._clock()
        if self._span is None:
            return
        if self._alive():
            if now - self._started_at >= STABLE_AFTER_S:
                self.crashes = 0  # it ran long enough: the next crash backs off from scratch
            return
        if self._next_restart is None:
            code = None if self._process is None else self._process.returncode
            if code is not None and code in self.fatal_exit_codes:
                raise HostFailed(f"{self.describe_exit(code)}")
            delay = self._restart_policy.backoff(self.crashes, self._rng)
            self.crashes += 1
            self._next_restart = now + delay
            log.warning(
                "process for blocks %s exited (%s); restart in %.1f s", self._span, code, delay
            )
        if now >= self._next_restart:
            self._spawn(self._span)

    def describe_exit(self, code: int) -> str:
        """The process's last output line (its ``error:`` line), else its exit code."""
        if self._stdout is not None and self._stdout.exists():
            lines = self._stdout.read_text(errors="replace").strip().splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            if errors:
                return errors[-1].removeprefix("error: ")
        return f"the PETALS process exited with status {code}"

    def loaded_span(self) -> Span | None:
        if self._span is None or not self._alive():
            return None
        if self._clock() - self._started_at < self.ready_after_s:
            return None
        return self._span

    def close(self) -> None:
        self._terminate()
        self._span = None
        self._next_restart = None


# The launcher's exit status when PETALS is not importable (bprr_client.petals_server).
PETALS_NOT_INSTALLED = 3
# The supervisor's span key for the launcher: it runs whatever the span (it re-spans itself).
_LAUNCHER = Span(start=0, end=1)


@dataclass(frozen=True)
class LauncherOptions:
    """How to start ``bprr_client.petals_server`` (our launcher around PETALS' Server)."""

    model: str
    dht_prefix: str
    host_maddrs: tuple[str, ...]
    python: str = sys.executable
    initial_peers: tuple[str, ...] = ()
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    throughput: float = 1.0
    device: str = "cpu"
    torch_dtype: str = "float32"
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model: the PETALS model must not be empty")
        if not self.dht_prefix or "." in self.dht_prefix or "[" in self.dht_prefix:
            raise ValueError(f"dht_prefix: {self.dht_prefix!r} (no '.' or '[')")
        if not self.host_maddrs:
            raise ValueError("host_maddrs: give at least one, e.g. /ip4/127.0.0.1/tcp/31337")

    def command(self, control: Path, status: Path) -> list[str]:
        # -P: the working directory stays off sys.path (a folder named petals/ there would
        # shadow PETALS)
        argv = [self.python, "-P", "-m", "bprr_client.petals_server", self.model]
        argv += ["--control", str(control), "--status", str(status)]
        argv += ["--dht-prefix", self.dht_prefix, "--throughput", str(self.throughput)]
        argv += ["--device", self.device, "--torch-dtype", self.torch_dtype]
        for flag, values in (
            ("--host-maddr", self.host_maddrs),
            ("--announce-maddr", self.announce_maddrs),
            ("--initial-peer", self.initial_peers),
        ):
            for value in values:
                argv += [flag, value]
        if self.identity_path:
            argv += ["--identity-path", self.identity_path]
        return argv + list(self.extra_args)


def petals_importable(python: str, timeout_s: float = 30.0) -> str | None:
    """None when ``python`` can import PETALS, else why not (one line)."""
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('petals') is None)"
    try:
        done = subprocess.run([python, "-P", "-c", probe], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot run {python}: {error}"
    if done.returncode != 0:
        return (
            f"PETALS is not installed for {python} (No module named 'petals'); build it with "
            "`make petals` and pass --petals-python .venv-petals/bin/python"
        )
    return None


# hivemind 1.1.10 puts its sockets here whatever TMPDIR says, and leaves them behind.
HIVEMIND_SOCKETS = "/tmp/hivemind-*.sock"


def remove_stale_hivemind_sockets(pattern: str = HIVEMIND_SOCKETS) -> list[str]:
    """Delete hivemind's socket files that no process listens on any more (a connect is
    refused); live ones (another server on this machine) are kept. Returns those removed."""
    import glob
    import socket

    removed = []
    for path in glob.glob(pattern):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue  # busy or not ours to judge
    return removed


class PetalsHost:
    """A ``SpanHost`` running one PETALS server through our launcher.

    ``apply(span)`` writes the span into the launcher's control file (PETALS re-spans in its
    own process within ~1-3 s); ``loaded_span()`` is the span once the launcher saw PETALS
    announce it ONLINE in the DHT; ``identity()`` is the server's PETALS peer id and
    multiaddrs (for the registration). The launcher is restarted after a crash (backoff);
    an exit saying PETALS is missing raises ``HostFailed`` instead. ``close()`` stops it
    and removes the hivemind socket files no process listens on any more.
    """

    def __init__(
        self,
        options: LauncherOptions,
        *,
        state_dir: Path | None = None,
        log_path: Path | None = None,
        stop_timeout_s: float = 20.0,
        restart: RetryPolicy | None = None,
    ) -> None:
        self.options = options
        self._own_dir = state_dir is None
        self.state_dir = (
            Path(tempfile.mkdtemp(prefix="bprr-petals-")) if state_dir is None else state_dir
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.control = self.state_dir / "control.json"
        self.status = self.state_dir / "status.json"
        self.temp_dir = self.state_dir / "tmp"
        self.temp_dir.mkdir(exist_ok=True)
        self.log_path = log_path or self.state_dir / "petals.log"
        self._wanted: Span | None = None
        self._write_control(None)
        self.supervisor = ProcessSupervisor(
            lambda _span: options.command(self.control, self.status),
            stop_timeout_s=stop_timeout_s,
            restart=restart,
            env={"TMPDIR": str(self.temp_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            stdout=self.log_path,
            fatal_exit_codes=frozenset({PETALS_NOT_INSTALLED, 2}),
            terminate_group=False,  # SIGTERM to the launcher alone: PETALS stops its children
        )

    def start(self) -> None:
        """Start the launcher now (it joins the swarm and waits for a span)."""
        self.supervisor.apply(_LAUNCHER)

    def _write_control(self, span: Span | None) -> None:
        value = {"span": None if span is None else [span.start, span.end]}
        temporary = self.control.with_name(".control.json.tmp")
        temporary.write_text(json.dumps(value), encoding="utf-8")
        os.replace(temporary, self.control)

    def _status(self) -> dict[str, object] | None:
        """The launcher's status, when written by the running launcher process."""
        process = self.supervisor.process
        if process is None or process.poll() is not None:
            return None
        try:
            status = json.loads(self.status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(status, dict) or status.get("pid") != process.pid:
            return None  # a previous launcher's file
        return status

    def apply(self, span: Span | None) -> None:
        if self.supervisor.process is None:
            self.start()
        if span != self._wanted:
            log.info("PETALS: assigned blocks %s", span)
            self._wanted = span
            self._write_control(span)

    def loaded_span(self) -> Span | None:
        status = self._status()
        if status is None or not status.get("online") or self._wanted is None:
            return None
        wanted = self._wanted
        return wanted if status.get("span") == [wanted.start, wanted.end] else None

    def identity(self) -> tuple[str, list[str]] | None:
        """(peer id, multiaddrs) of the running PETALS server, once it started."""
        status = self._status()
        if status is None:
            return None
        peer_id, maddrs = status.get("peer_id"), status.get("multiaddrs")
        if not isinstance(peer_id, str) or not isinstance(maddrs, list):
            return None
        return peer_id, [str(m) for m in maddrs]

    def poll(self) -> None:
        self.supervisor.poll()

    def close(self) -> None:
        self.supervisor.close()
        remove_stale_hivemind_sockets()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
