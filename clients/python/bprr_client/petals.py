"""Run a PETALS server for the agent's span, and restart it when the span changes.

PETALS is not a dependency: ``petals_command`` builds the command line of
``python -m petals.cli.run_server``, and ``ProcessSupervisor`` runs any command built from a
span (tests use a stand-in process).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bprr_client.http import RetryPolicy
from bprr_client.models import Span

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
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            process.terminate()
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.wait()

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
            delay = self._restart_policy.backoff(self.crashes, self._rng)
            self.crashes += 1
            self._next_restart = now + delay
            log.warning(
                "process for blocks %s exited (%s); restart in %.1f s", self._span, code, delay
            )
        if now >= self._next_restart:
            self._spawn(self._span)

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
